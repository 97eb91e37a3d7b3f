"""Every command checks its output paths before any work, and says what is wrong in one line (no traceback);
Ctrl-C during `qflare simulate` keeps the rounds finished so far (history and model) and exits 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qflare
from qflare.cli import app
from qflare.model_file import read_model_info

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--model", "mlp", "--devices", "4", "--per-round", "2", "--rounds", "2"]


def _commands(bad: str) -> list[tuple[str, list[str]]]:
    return [
        ("--out", ["simulate", *SMALL, "--out", bad]),
        ("--out", ["demo", "--dataset", "digits", "--model", "mlp", "--out", bad]),
        ("--data-dir", ["demo", "--dataset", "digits", "--model", "mlp", "--data-dir", bad]),
        ("--data-dir", ["server", "--dataset", "digits", "--model", "mlp", "--data-dir", bad]),
        ("--data-dir", ["token", "create", "--data-dir", bad]),
        ("--state-dir", ["client", "--server", "http://127.0.0.1:9", "--server-key-id", "00", "--state-dir", bad]),
        ("--heatmap", ["data", "stats", "--dataset", "digits", "--heatmap", bad + "/h.png"]),
        ("--dest", ["data", "download", "mnist", "--dest", bad]),
        ("--out", ["models", "export", "latest", "--out", bad + "/m.safetensors"]),
    ]


@pytest.mark.parametrize("kind", ["parent-is-a-file", "proc"])
def test_bad_output_paths_are_refused_before_any_work(tmp_path: Path, kind: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = str(blocker / "sub") if kind == "parent-is-a-file" else "/proc/qflare-not-here/x"
    for option, argv in _commands(bad):
        result = runner.invoke(app, argv)
        out = " ".join(result.output.split())
        assert result.exit_code == 2, (argv, result.output)
        assert f"[bad_path] {option} " in out and "Traceback" not in result.output, (argv, out)
        assert "round" not in out.replace("--rounds", "")  # nothing was trained
    assert blocker.read_text() == "x"


def test_an_output_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("x")
    result = runner.invoke(app, ["simulate", *SMALL, "--out", str(blocker)])
    assert result.exit_code == 2 and "exists and is not a folder" in " ".join(result.output.split())


def test_simulate_out_writes_history_and_a_loadable_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", *SMALL, "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2] and history["interrupted"] is False
    assert (tmp_path / "o" / "history.png").read_bytes().startswith(b"\x89PNG")
    assert len((tmp_path / "o" / "history.csv").read_text().splitlines()) == 3
    info = read_model_info(tmp_path / "o" / "model.safetensors")
    assert info.provenance["round"] == "2" and info.provenance["model_sha256"] == history["rounds"][-1]["model_sha256"]
    net = qflare.load_model(tmp_path / "o" / "model.safetensors")
    assert sum(p.numel() for p in net.parameters()) > 0


def _start(out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    argv = [
        sys.executable,
        "-m",
        "qflare",
        "simulate",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--devices",
        "4",
        "--per-round",
        "4",
        "--rounds",
        "500",
        "--epochs",
        "10",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _interrupt(out: Path, times: int) -> tuple[int, str]:
    proc = _start(out)
    deadline = time.monotonic() + 120
    while not (out / "history.json").exists():  # round 1 finished and written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, " ".join(err.split())


def test_first_ctrl_c_stops_after_the_current_step_and_keeps_the_finished_rounds(tmp_path: Path) -> None:
    rc, err = _interrupt(tmp_path / "o", 1)
    assert rc == 130, err
    assert "interrupted: stopping after the current step" in err and "Traceback" not in err
    assert "terminate called" not in err and "stopped after" in err
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert history["interrupted"] is True and len(history["rounds"]) >= 1
    assert (tmp_path / "o" / "history.png").exists()  # the plot is drawn when the run stops
    rounds = [r["round"] for r in history["rounds"]]
    assert rounds == list(range(1, len(rounds) + 1))
    info = read_model_info(tmp_path / "o" / "model.safetensors")
    assert info.provenance["round"] == str(rounds[-1])  # the latest model is the last finished round's
    assert qflare.load_model(tmp_path / "o" / "model.safetensors") is not None


def test_second_ctrl_c_stops_at_once_without_an_abort(tmp_path: Path) -> None:
    rc, err = _interrupt(tmp_path / "o", 2)
    assert rc == 130, err
    assert "interrupted again: stopping now" in err and "terminate called" not in err and "Traceback" not in err
    history = json.loads((tmp_path / "o" / "history.json").read_text())  # whole, never torn
    assert len(history["rounds"]) >= 1
    qflare.load_model(tmp_path / "o" / "model.safetensors")
