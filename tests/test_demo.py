"""``qflare demo``: a small federation end to end, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

import qflare
from qflare.demo import DemoConfig, DemoError
from qflare.federation import FederationSpec
from qflare.model_file import read_model_info
from qflare.processes import ChildProcesses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SMALL = ["--devices", "3", "--per-round", "2", "--rounds", "2", "--dataset", "digits", "--model", "mlp"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("QFLARE_DATABASE_URL", "QFLARE_ADMIN_TOKEN")} | {
        "COLUMNS": "200"
    }


def test_small_demo_runs_to_the_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qflare", "demo", *SMALL, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=150,
        env=_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "final accuracy" in out.stdout and "round   2  accuracy" in out.stdout
    assert "/metrics" in out.stdout
    effective = tomllib.loads((tmp_path / "config.toml").read_text(encoding="utf-8"))
    assert (effective["devices"], effective["per-round"], effective["strategy"]) == (3, 2, "fedavg")
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [h["round"] for h in history["rounds"]] == [1, 2] and history["interrupted"] is False
    info = read_model_info(tmp_path / "o" / "model.safetensors")  # the coordinator's last model, checked
    assert info.provenance["round"] == "2" and info.provenance["model_sha256"] == history["rounds"][-1]["model_sha256"]
    qflare.load_model(tmp_path / "o" / "model.safetensors")
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["device-0.log", "device-1.log", "device-2.log", "server.log"]
    assert (
        "acknowledged"
        in (tmp_path / "logs" / "device-0.log").read_text() + (tmp_path / "logs" / "device-1.log").read_text()
    )
    for i in range(3):
        state = tmp_path / "devices" / f"device-{i}"
        assert (state / "key.pem").stat().st_mode & 0o077 == 0 and (state / "enrollment.record").exists()


def test_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [
            *(sys.executable, "-m", "qflare", "demo", *SMALL, "--rounds", "50"),
            *("--data-dir", str(tmp_path), "--out", str(tmp_path / "o")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 90
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and len(children) < 4:  # the server and three devices
            time.sleep(0.5)  # real time: the demo starts real child processes
            children = psutil.Process(demo.pid).children(recursive=True)
            assert demo.poll() is None, demo.stdout.read().decode() if demo.stdout else ""
        assert len(children) >= 4
        while time.monotonic() < deadline and not (tmp_path / "o" / "history.json").exists():
            time.sleep(0.2)  # real time: round 1 finishes in the child processes
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 130
        output = demo.stdout.read().decode() if demo.stdout else ""
        assert "interrupted" in output and "Traceback" not in output
        history = json.loads((tmp_path / "o" / "history.json").read_text())
        assert history["interrupted"] is True and history["rounds"][0]["round"] == 1
        assert int(read_model_info(tmp_path / "o" / "model.safetensors").provenance["round"]) >= 1
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_child_processes_kill_what_ignores_sigterm(tmp_path: Path) -> None:
    children = ChildProcesses()
    stubborn = children.start(
        "stubborn",
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)",
        ],
        tmp_path / "stubborn.log",
        os.environ,
    )
    deadline = time.monotonic() + 10
    while "up" not in (tmp_path / "stubborn.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)  # real time: polling a real child process's log
    t0 = time.monotonic()
    children.stop(timeout_s=1.0)
    assert stubborn.returncode == -signal.SIGKILL and 0.9 < time.monotonic() - t0 < 5
    children.close()


def test_demo_config_is_checked() -> None:
    with pytest.raises(DemoError):
        DemoConfig(FederationSpec(devices=2, per_round=3))
