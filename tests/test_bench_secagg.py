"""`qflare bench secagg`: the figures it prints come from a real round (small vectors here)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qflare.bench.secagg import fedavg_cnn_size, run_secagg_bench, run_secagg_scaling, write_secagg_scaling
from qflare.cli.bench import app


def test_bench_round_matches_and_reports_every_figure() -> None:
    out = run_secagg_bench(8, 0.25, length=2000, seed=3)
    assert out["exact_match"] is True
    assert out["dropped"] == 2
    assert out["max_abs_error_vs_plaintext_mean"] <= out["error_bound"]
    for key in ("bytes_ratio", "device_s", "coordinator_s", "plaintext_coordinator_s"):
        assert out[key] > 0
    assert out["bytes_sent_per_device"] > out["plaintext_bytes_per_device"]


def test_fedavg_cnn_size_is_the_model_registry_count() -> None:
    assert fedavg_cnn_size() == 1_663_370


def test_cli_refuses_a_bad_dropout() -> None:
    result = CliRunner().invoke(app, ["secagg", "--devices", "5", "--dropout", "1.5", "--json"])
    assert result.exit_code != 0


def test_cli_refuses_too_few_devices() -> None:
    result = CliRunner().invoke(app, ["secagg", "--devices", "2", "--json"])
    assert result.exit_code != 0
    assert "{" not in result.stdout


def test_scaling_writes_json_and_png(tmp_path: Path) -> None:
    result = run_secagg_scaling([4, 6], [0.0, 0.25], length=500)
    assert [(r["devices"], r["dropout"]) for r in result["runs"]] == [(4, 0.0), (6, 0.0), (4, 0.25), (6, 0.25)]
    assert all(r["exact_match"] for r in result["runs"])
    paths = write_secagg_scaling(result, tmp_path / "out")
    assert json.loads(paths[0].read_text())["runs"] == result["runs"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_cli_refuses_bad_lists(tmp_path: Path) -> None:
    for args in (["--devices", "x"], ["--devices", "2"], ["--dropouts", "1.5"]):
        result = CliRunner().invoke(app, ["secagg-scaling", *args, "--out", str(tmp_path)])
        assert result.exit_code != 0
