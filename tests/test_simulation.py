"""`qflare simulate` end to end on a real small data set, in seconds."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qflare.cli import app
from qflare.errors import ConfigError
from qflare.federation import FederationSpec
from qflare.simulation import SimulationConfig, run_simulation
from qflare.training import TrainConfig

runner = CliRunner()
ARGS = [
    "simulate",
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--devices",
    "8",
    "--per-round",
    "4",
    "--rounds",
    "4",
    "--partition",
    "dirichlet",
    "--alpha",
    "1.0",
    "--lr",
    "0.1",
    "--seed",
    "3",
]


def test_simulate_cli_writes_history(tmp_path):
    result = runner.invoke(app, [*ARGS, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    hist = json.loads((tmp_path / "history.json").read_text())
    assert set(hist) >= {"rounds", "config", "wall_s"}
    rounds = hist["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert {"round", "accuracy", "loss", "seconds"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] > 0
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert (tmp_path / "history.csv").read_text().startswith("round,")
    assert (tmp_path / "history.png").stat().st_size > 1000
    assert hist["config"]["devices"] == 8 and hist["config"]["suite"].startswith("v1:ML-DSA-65")


SPEC = FederationSpec(
    dataset="digits", model="mlp", devices=8, per_round=4, rounds=3, alpha=1.0, seed=3, train=TrainConfig(lr=0.1)
)


def _cfg(seed: int = 3, **kw):
    return SimulationConfig(SPEC.replace(seed=seed), **kw)


def test_same_seed_same_numbers_and_protocol_costs_nothing_in_accuracy():
    a = run_simulation(_cfg())
    b = run_simulation(_cfg())
    direct = run_simulation(_cfg(protocol=False))
    acc = [r.accuracy for r in a.rounds]
    assert acc == [r.accuracy for r in b.rounds]
    assert [r.loss for r in a.rounds] == [r.loss for r in b.rounds]
    # The secure protocol carries the exact same update bytes: identical results without it.
    assert acc == [r.accuracy for r in direct.rounds]
    other = run_simulation(_cfg(seed=4))
    assert acc != [r.accuracy for r in other.rounds]


def test_sequential_and_threaded_workers_agree_closely():
    seq = run_simulation(_cfg(workers=1))
    par = run_simulation(_cfg(workers=2))
    for x, y in zip(seq.rounds, par.rounds):
        assert abs(x.accuracy - y.accuracy) < 0.02


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["simulate", "--dataset", "mnist", "--data-root", str(tmp_path), "--rounds", "1"])
    assert result.exit_code == 2
    assert "dataset_missing" in result.output or "dataset_missing" in (result.stderr or "")


def test_data_stats_cli(tmp_path):
    png = tmp_path / "heat.png"
    result = runner.invoke(
        app,
        [
            "data",
            "stats",
            "--dataset",
            "digits",
            "--devices",
            "6",
            "--partition",
            "shards",
            "--rows",
            "0",
            "--heatmap",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000
    assert "1438" in result.output  # every training example of digits is on some device


def test_spec_file_runs_the_same_federation_as_the_options(tmp_path):
    spec = SPEC.replace(rounds=2)
    args = list(ARGS)
    args[args.index("--rounds") + 1] = "2"
    by_options = runner.invoke(app, [*args, "--json"])
    assert by_options.exit_code == 0, by_options.output
    path = FederationSpec(
        dataset="digits", model="mlp", devices=8, per_round=4, rounds=2, alpha=1.0, seed=3, train=TrainConfig(lr=0.1)
    ).save(tmp_path / "federation.json")
    assert FederationSpec.load(path) == spec
    by_file = runner.invoke(app, ["simulate", "--federation", str(path), "--json"])
    assert by_file.exit_code == 0, by_file.output
    rounds = [json.loads(out.output.strip().splitlines()[-1])["rounds"] for out in (by_options, by_file)]
    assert [r["accuracy"] for r in rounds[0]] == [r["accuracy"] for r in rounds[1]]
    assert [r["model_sha256"] for r in rounds[0]] == [r["model_sha256"] for r in rounds[1]]


def test_spec_file_and_workload_options_together_are_refused(tmp_path):
    path = SPEC.save(tmp_path / "federation.json")
    result = runner.invoke(app, ["simulate", "--federation", str(path), "--rounds", "2", "--seed", "1"])
    assert result.exit_code == 2
    assert "--rounds, --seed" in result.output


def test_simulation_writes_a_ledger_that_verifies_and_names_its_models(tmp_path):
    from qflare.ledger import verify_export

    out = tmp_path / "ledger.jsonl"
    result = run_simulation(_cfg(ledger_out=out))
    report = verify_export(out, workers=1)
    assert (report.entries, report.rounds, report.device_signatures, report.missing_envelopes) == (3, 3, 12, 0)
    lines = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert [x["body"]["model"] for x in lines] == [r.model_sha256 for r in result.rounds]
    with pytest.raises(ConfigError):
        _cfg(protocol=False, ledger_out=out)
    cli = runner.invoke(app, ["ledger", "verify", str(out), "--pin", report.coordinator_key_id, "--workers", "1"])
    assert cli.exit_code == 0 and "ok: 3 entries" in cli.output, cli.output
