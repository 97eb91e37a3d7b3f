"""`qflare ledger verify --model` accepts the model file QFLARE writes (`simulate --out`, `models export`):
its own bytes carry extra metadata, so the coordinator's signed blob is rebuilt from its weights and
matched against the ledger; a file whose weights were changed by one byte is refused."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from qflare.cli import app

runner = CliRunner()
SMALL = ["--dataset", "digits", "--model", "mlp", "--devices", "4", "--per-round", "2", "--rounds", "2"]


def test_a_simulated_model_file_is_found_in_the_ledger_and_a_changed_one_is_not(tmp_path: Path) -> None:
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    run = runner.invoke(app, ["simulate", *SMALL, "--workers", "1", "--out", str(out), "--ledger", str(ledger)])
    assert run.exit_code == 0, run.output
    model = out / "model.safetensors"
    ok = runner.invoke(app, ["ledger", "verify", str(ledger), "--model", str(model)])
    assert ok.exit_code == 0, ok.output
    assert "is model version 2 published by entry 2 (round 2)" in " ".join(ok.output.split())

    data = bytearray(model.read_bytes())
    data[-3] ^= 0x01  # one bit of the last weight
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    bad = runner.invoke(app, ["ledger", "verify", str(ledger), "--model", str(changed)])
    assert bad.exit_code == 1 and "ledger_invalid" in bad.output and "Traceback" not in bad.output
