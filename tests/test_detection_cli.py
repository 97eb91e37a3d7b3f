"""``--aggregator reputation``: threat detection as an aggregator preset, through the CLI, the simulation
and its ``history.json`` defence record (docs/defences.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fixtures import make_runtime
from typer.testing import CliRunner

from qflare.cli import app
from qflare.data import load_dataset
from qflare.data.partition import partition
from qflare.defense import AttackConfig
from qflare.defense.record import DefenceLog
from qflare.errors import ConfigError
from qflare.federation import FederationSpec
from qflare.simulation import SimulationConfig
from qflare.strategy import AGGREGATORS, Krum, ShareCappedMean, aggregator_detection

SMALL = ["--dataset", "digits", "--model", "mlp", "--workers", "2"]
# The seeded scenario of the reputation target: 20 digits devices with Dirichlet(0.1) labels (strongly
# non-IID: most devices hold one or two classes, sizes spread > 10x), every device selected every round, 20%
# of them persistent attackers.
SCENARIO = [*SMALL, "--devices", "20", "--per-round", "20", "--alpha", "0.1", "--seed", "0", "--malicious", "0.2"]


def run(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error [")]
    assert len(lines) == 1, result.output
    return str(lines[0])


# ----------------------------------------------------------------------------- the preset
@pytest.mark.parametrize(
    ("expr", "combine"),
    [
        ("reputation", ShareCappedMean),
        ("reputation+multi-krum", Krum),
        ("multi-krum+reputation", Krum),  # a filter ahead of every combine: its place does not matter
        ("norm-bound+reputation+multi-krum", None),
    ],
)
def test_reputation_turns_detection_on_and_keeps_the_combine(expr: str, combine: type | None) -> None:
    assert "reputation" in AGGREGATORS and aggregator_detection(expr)
    spec = FederationSpec(aggregator=expr)
    assert spec.detection_config() is not None
    if combine is not None:
        assert type(spec.build_strategy().combine) is combine
    tuned = FederationSpec(aggregator=expr, detection={"k": 4.0}).detection_config()
    assert tuned is not None and tuned.k == 4.0  # explicit options win over the preset's defaults


def test_without_reputation_detection_stays_off() -> None:
    assert FederationSpec(aggregator="multi-krum").detection_config() is None
    assert not aggregator_detection("norm-bound+median")
    with pytest.raises(ConfigError, match="base rule"):
        FederationSpec(aggregator="median+reputation+krum").build_strategy()


@pytest.mark.parametrize(
    ("aggregator", "detection"), [("reputation", None), ("median", None), ("none", {}), ("norm-bound", None)]
)
def test_dp_fedavg_refuses_robust_rules_and_detection(aggregator: str, detection: dict | None) -> None:
    # replacing DP-FedAvg's combine, or leaving updates out by comparing them with the others', would drop
    # or break the privacy guarantee silently
    spec = FederationSpec(
        strategy="dp-fedavg", strategy_args={"noise_multiplier": 1.0}, aggregator=aggregator, detection=detection
    )
    with pytest.raises(ConfigError, match="dp-fedavg cannot be combined"):
        spec.build_strategy()


def test_detection_needs_the_protocol() -> None:
    spec = FederationSpec(dataset="digits", model="mlp", devices=10, per_round=10, aggregator="reputation")
    with pytest.raises(ConfigError, match="no-protocol"):
        SimulationConfig(spec, protocol=False)


def test_the_cli_options_reach_the_spec(tmp_path: Path) -> None:
    for command in ("simulate", "server", "demo"):
        extra = ["--data-dir", str(tmp_path / command)] if command == "server" else []
        line = one_error(
            run(command, *extra, "--aggregator", "reputation", "--strategy", "dp-fedavg", "--dp-epsilon", "8")
        )
        assert "dp-fedavg cannot be combined with --aggregator reputation" in line, (command, line)
        line = one_error(run(command, *extra, "--aggregator", "multi-krum+reputations"))
        assert "reputations" in line and "reputation" in line  # unknown names list the choices
    runtime = make_runtime(tmp_path / "srv", aggregator="reputation+median")
    try:  # the server's coordinator holds a detector
        assert runtime.coordinator.rounds.detector is not None
    finally:
        runtime.stop()


def test_defence_log_records_quarantines() -> None:
    log = DefenceLog(frozenset({1, 2}))
    log.record(1, [0, 1, 2, 3], {1: "anomalous", 3: "anomalous"})
    rec = log.record(2, [0, 1, 2, 3], {1: "quarantined"}, quarantined=[1])
    assert rec.quarantined == [1] and rec.true_positives == 1 and rec.false_negatives == 1
    summary = log.summary()
    assert summary["quarantined"] == {"1": 2}
    assert (summary["quarantined_attackers"], summary["quarantined_honest"]) == (1, 0)
    assert summary["false_positives"] == 1


# ----------------------------------------------------------------------------- the seeded scenario
def test_the_scenario_is_strongly_non_iid() -> None:
    labels = load_dataset("digits", "train").labels.numpy()
    parts = partition("dirichlet", labels, 20, seed=0, alpha=0.1)
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    sizes = [len(p) for p in parts]
    assert sum(s > 0.8 for s in shares) >= 5 and max(sizes) > 10 * min(sizes)
    assert AttackConfig("scale", malicious=0.2, seed=0).attackers(20) == frozenset({0, 1, 5, 11})


@pytest.mark.parametrize("attack", ["scale", "gaussian"])
def test_persistent_attackers_are_quarantined_by_round_10_and_no_honest_device(attack: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(
        "simulate", *SCENARIO, "--rounds", "10", "--attack", attack, "--aggregator", "reputation", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "history.json").read_text())
    defence = doc["defence"]
    attackers = set(defence["attackers"])
    assert len(attackers) == 4
    summary = defence["detection"]
    assert {int(d) for d in summary["quarantined"]} == attackers and max(summary["quarantined"].values()) <= 10
    assert summary["quarantined_honest"] == 0 and summary["false_positives"] == 0
    quarantined_so_far: set[int] = set()
    for rnd in defence["rounds"]:  # per round: what was left out and why, who was quarantined, TP/FP
        selected_attackers = set(rnd["attackers"])
        assert not selected_attackers & quarantined_so_far  # a quarantined device is never selected again
        assert {int(d) for d in rnd["left_out"]} <= attackers
        assert set(rnd["left_out"].values()) <= {"anomalous", "quarantined"}
        assert {int(d) for d, why in rnd["left_out"].items() if why == "quarantined"} == set(rnd["quarantined"])
        assert rnd["true_positives"] == len(rnd["left_out"]) and rnd["false_positives"] == 0
        quarantined_so_far |= set(rnd["quarantined"])
    assert quarantined_so_far == attackers


def test_no_honest_non_iid_device_is_quarantined_without_attackers(tmp_path: Path) -> None:
    out = tmp_path / "clean"
    result = run("simulate", *SCENARIO[:-2], "--rounds", "10", "--aggregator", "reputation", "--out", str(out))
    assert result.exit_code == 0, result.output
    defence = json.loads((out / "history.json").read_text())["defence"]
    assert defence["attackers"] == [] and defence["detection"]["quarantined"] == {}
    left_out = sum(len(r["left_out"]) for r in defence["rounds"])
    assert left_out <= 0.05 * 20 * 10, left_out  # an honest outlier may be left out now and then, rarely
