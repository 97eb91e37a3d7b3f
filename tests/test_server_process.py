"""The one launcher of ``qflare server`` child processes: spec file, readiness, pin and stop."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from qflare.device import pin_server_key
from qflare.errors import QflareError
from qflare.federation import FederationSpec
from qflare.server.process import ServerProcess

SPEC = FederationSpec(dataset="digits", model="mlp", devices=2, per_round=2, rounds=1, round_timeout_s=60.0)


def test_command_names_the_spec_file_and_no_workload_option(tmp_path: Path) -> None:
    server = ServerProcess(SPEC, data_dir=tmp_path / "srv", args=["--no-eval"])
    try:
        argv = server.command()
        assert argv[argv.index("--federation") + 1] == str(tmp_path / "srv" / "federation.json")
        assert argv[argv.index("--min-devices") + 1] == "2" and argv[-1] == "--no-eval"
        assert not {"--dataset", "--rounds", "--per-round", "--seed"} & set(argv)
        assert server.stop() is None  # never started: nothing to stop
        with pytest.raises(QflareError):
            server.wait_ready()
    finally:
        server.close()


@pytest.mark.slow
def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    with ServerProcess(SPEC.replace(dataset="no-such-dataset"), data_dir=tmp_path / "srv") as server:
        with pytest.raises(QflareError) as info:
            server.wait_ready(timeout_s=90.0)
    assert info.value.code == "server_exited" and "no-such-dataset" in str(info.value)


@pytest.mark.slow
def test_start_pin_and_stop(tmp_path: Path) -> None:
    # kill -9 and a restart on the same data dir (same identity, nothing lost): tests/test_crash.py
    with ServerProcess(SPEC) as server:
        server.wait_ready()
        assert FederationSpec.load(server.federation_file) == SPEC
        key, _ = pin_server_key(server.api.get_json("/v1/identity"), server.key_id())
        assert key.key_id == server.key_id()
        assert len(server.tokens(2)) == 2 and server.status()["state"] == "waiting"
        temp_root = server.data_dir.parent
        assert server.stop(timeout_s=15.0) in (0, -signal.SIGTERM)
        assert "shutdown complete" in server.log_tail().lower()
    assert not temp_root.exists()  # a temporary data dir goes with the launcher
