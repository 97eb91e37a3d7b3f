"""`qflare bench ledger` at a small size: it builds a real export, verifies it and reports its figures."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qflare.bench.ledger import build_export, run_ledger_bench
from qflare.cli import app
from qflare.ledger import LedgerVerifyError, verify_export


def test_bench_ledger_small() -> None:
    out = run_ledger_bench(12, 5, workers=1, envelope_rounds=1)
    assert (out["rounds"], out["updates_per_round"], out["workers"]) == (12, 5, 1)
    assert out["verify_s"] > 0 and abs(out["verify_s_per_1000_entries"] - out["verify_s"] * 1000 / 12) < 0.1
    assert out["meets_target"] == (out["verify_s_per_1000_entries"] * 10 <= 5.0)
    assert out["envelope_sample"]["device_signatures"] == 5


def test_bench_export_is_a_real_ledger(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    key = build_export(path, 4, 3, workers=2)
    assert verify_export(path, pin=key.key_id, workers=2).entries == 4
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], lines[1], lines[2], lines[4]]) + b"\n")
    try:
        verify_export(path, workers=2)
    except LedgerVerifyError as exc:
        assert exc.seq == 3
    else:
        raise AssertionError("a missing entry went unnoticed")


def test_bench_ledger_cli_json() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "ledger", "--rounds", "3", "--updates", "2", "--envelope-rounds", "0", "--workers", "1", "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rounds"] == 3
