"""The layering the architecture promises: a device process loads nothing of the coordinator."""

from __future__ import annotations

import json
import subprocess
import sys

COORDINATOR_ONLY = (
    "sqlalchemy",
    "alembic",
    "fastapi",
    "uvicorn",
    "qflare.simulation",
    "qflare.storage",
    "qflare.server",
)


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_device_package_imports_no_coordinator_code():
    loaded = _loaded_after("import qflare.device; import qflare.cli.client")
    leaked = [m for m in loaded if m.split(".")[0] in COORDINATOR_ONLY or m.startswith(COORDINATOR_ONLY)]
    assert leaked == [], f"importing the device side loaded {leaked}"


def test_protocol_imports_no_storage_implementation():
    loaded = _loaded_after("import qflare.protocol")
    assert not [m for m in loaded if m.startswith(("sqlalchemy", "qflare.storage", "qflare.server"))]


def test_top_level_package_still_offers_the_simulation():
    import qflare

    assert callable(qflare.run_simulation) and qflare.SimulationConfig is not None
