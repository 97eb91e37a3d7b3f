"""One pinning rule on every path: a coordinator key is accepted only when its own SHA-256 is the pin.

A forged ``/v1/identity`` document claims the pinned key id but serves another public key.  The device
function, the ``qflare client`` process and the benchmarks' remote devices must all refuse it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import qflare.bench.ingest
import qflare.bench.remote
from qflare.bench.remote import RemoteFederation
from qflare.crypto import DEFAULT_SUITE, SigningKey
from qflare.device import pin_server_key
from qflare.errors import AuthError
from qflare.federation import FederationSpec
from qflare.processes import child_environment
from qflare.simulation import SimulationConfig
from qflare.wire import ParamLayout

PINNED = SigningKey.generate().public
IMPOSTOR = SigningKey.generate().public
FORGED = {
    "alg": IMPOSTOR.alg,
    "public_key": IMPOSTOR.raw.hex(),
    "key_id": PINNED.key_id,  # the claim matches the pin; the key does not
    "suite": DEFAULT_SUITE.name,
}


@pytest.fixture(scope="module")
def forged_server() -> Iterator[str]:
    """An HTTP server answering every GET with the forged identity document."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(FORGED).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_device_rule_hashes_the_key_not_the_claim() -> None:
    with pytest.raises(AuthError) as info:
        pin_server_key(FORGED, PINNED.key_id)
    assert info.value.code == "server_key_mismatch"
    genuine = FORGED | {"public_key": PINNED.raw.hex(), "key_id": "00" * 32}  # a wrong claim is not needed either
    assert pin_server_key(genuine, PINNED.key_id)[0] == PINNED


def test_benchmarks_have_no_pinning_rule_of_their_own() -> None:
    assert qflare.bench.remote.pin_server_key is pin_server_key
    assert qflare.bench.ingest.pin_server_key is pin_server_key


def test_bench_remote_devices_refuse_the_forged_server(forged_server: str) -> None:
    cfg = SimulationConfig(FederationSpec(dataset="digits", model="mlp", devices=2, per_round=2))
    layout = ParamLayout.from_module(torch.nn.Linear(2, 2))
    with pytest.raises(AuthError) as info:
        RemoteFederation(
            cfg, layout, torch.zeros(layout.numel), url=forged_server, tokens=["a", "b"], key_id=PINNED.key_id
        )
    assert info.value.code == "server_key_mismatch"


@pytest.mark.slow
def test_client_process_refuses_the_forged_server(forged_server: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qflare",
            "client",
            "--server",
            forged_server,
            "--server-key-id",
            PINNED.key_id,
            "--state-dir",
            str(tmp_path / "device"),
            "--dataset",
            "digits",
            "--model",
            "mlp",
        ],
        env=child_environment({"QFLARE_ENROLL_TOKEN": "t" * 32, "COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "server_key_mismatch" in out.stderr
    assert not (tmp_path / "device" / "key.pem").exists()  # refused before the device did anything


def test_a_mistyped_key_id_pins_nothing(tmp_path: Path) -> None:
    """Only a verified key is pinned: the rerun with the right id works in the same state dir (the CLI
    run of this is in tests/test_device_config.py)."""
    from qflare.device import DeviceState

    genuine = {"alg": PINNED.alg, "public_key": PINNED.raw.hex(), "suite": DEFAULT_SUITE.name}
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(AuthError) as info:
        pin_server_key(genuine, state.pin(IMPOSTOR.key_id))  # the operator typed another id
    assert info.value.code == "server_key_mismatch" and IMPOSTOR.key_id in str(info.value)
    assert not (tmp_path / "dev" / "server.keyid").exists()
    key, _ = pin_server_key(genuine, DeviceState(tmp_path / "dev").pin(PINNED.key_id))
    state.save_server_key(key)
    assert DeviceState(tmp_path / "dev").pin(None) == PINNED.key_id
