"""Over HTTP API v1, a device's work loop fetches the receipt proof of each round it contributed to once
the round is over, verifies it, keeps it next to its receipt, and ``verify-receipts`` re-checks it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_fixtures import SPEC, AppTransport, make_runtime
from typer.testing import CliRunner

from qflare.cli import app
from qflare.device import DeviceClient, DeviceState, load_workload
from qflare.device.proofs import PROOFS_FILE
from qflare.protocol import Route
from qflare.server import create_app

pytestmark = pytest.mark.timeout(240)
ONE = {"per_round": 1, "min_participants": 1, "min_devices": 1, "round_loop": True, "step_interval_s": 0.05}


def test_the_device_loop_fetches_and_keeps_its_proofs_over_http(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path / "server", **ONE)
    state = DeviceState(tmp_path / "device")
    state.pin(runtime.identity.key_id)
    with TestClient(create_app(runtime)) as client:
        transport = AppTransport(client)
        dc = DeviceClient(
            transport=transport, state=state, server_key=runtime.identity.public, workload=load_workload(SPEC, 0)
        )
        assert dc.ensure_enrolled(runtime.coordinator.create_tokens(1)[0])
        summary = dc.run(poll_interval=0.05, give_up_after_s=60)  # both rounds, then "finished"
        assert summary.reason == "finished" and summary.rounds_trained == [1, 2]
        assert summary.proofs == [1, 2] and summary.proof_failures == []
        proofs = [json.loads(x) for x in (state.dir / PROOFS_FILE).read_text().splitlines()]
        assert [(p["round"], p["included"], p["outcome"]) for p in proofs] == [(1, True, "closed"), (2, True, "closed")]
        assert proof_requests(runtime.metrics.render()) == 2  # one request per round, no polling for proofs
        # the same request from an unauthenticated sender (no session) is refused with a typed error
        resp = client.post("/v1/proof", content=b"\x00" * 40, headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 401 and resp.json()["code"] == "unknown_session"
    runner = CliRunner()
    ok = runner.invoke(app, ["client", "verify-receipts", "--state-dir", str(state.dir)])
    assert ok.exit_code == 0, ok.output
    assert "2 of 2 receipts verify" in ok.output and "2 of 2 inclusion proofs verify" in ok.output
    # a tampered stored proof fails verify-receipts, naming the line
    path = state.dir / PROOFS_FILE
    lines = path.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["examples"] += 1
    path.write_text(lines[0] + "\n" + json.dumps(doc) + "\n")
    bad = runner.invoke(app, ["client", "verify-receipts", "--state-dir", str(state.dir)])
    assert bad.exit_code == 1 and "proofs.jsonl line 2" in bad.output and "bad_inclusion_proof" in bad.output


def proof_requests(metrics: bytes) -> int:
    """POST /v1/proof requests the server's metrics counted."""
    count = 0
    for line in metrics.decode().splitlines():
        if line.startswith("qflare_http_requests_total{") and f'route="/v1/{Route.PROOF.value}"' in line:
            count += int(float(line.rsplit(" ", 1)[1]))
    return count
