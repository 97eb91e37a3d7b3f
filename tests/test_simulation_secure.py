"""``qflare simulate --secure-aggregation``: the in-process federation with secure rounds."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qflare.cli import app
from qflare.errors import ConfigError
from qflare.federation import FederationSpec
from qflare.secagg import QuantSpec
from qflare.simulation import SimulationConfig, run_simulation
from qflare.strategy import fedavg, register_strategy
from qflare.strategy.combine import WeightedMean
from qflare.training import TrainConfig

BASE = dict(dataset="digits", model="mlp", devices=8, per_round=8, alpha=1.0, seed=3, train=TrainConfig(lr=0.1))


def _plain_weighted_mean(**kw):
    return fedavg(combine=WeightedMean(), **kw)  # what secure aggregation computes, in the clear


plain_weighted_mean = "test-plain-weighted-mean"


@pytest.fixture(autouse=True)
def _plain_strategy_registered() -> None:
    # Registered per test (conftest.py restores the registries after each one): a registration at import
    # time would show in every other test's view of the strategies.
    register_strategy(plain_weighted_mean, _plain_weighted_mean, replace=True)


def run(rounds: int, **kw):
    return run_simulation(SimulationConfig(FederationSpec(rounds=rounds, **BASE, **kw), workers=1, eval_chunks=1))


def test_secure_round_equals_plaintext_within_the_dequantisation_bound():
    plain = run(1, strategy=plain_weighted_mean)
    secure = run(1, secure_aggregation=True)
    assert secure.config["secure_aggregation"] is True and secure.rounds[0].published
    assert plain.model is not None and secure.model is not None
    diff = (plain.model.flat - secure.model.flat).abs().max().item()
    # N / (2 s sum(w)) <= N / (2 s N) with weights >= 1 (the example counts): the quantisation of round
    # 1, where both runs start from the same model and train the same updates; plus float32 rounding
    scale = QuantSpec(1.0, max_devices=8, max_weight=65_536).scale
    assert diff <= 1 / (2 * scale) + 1e-6
    assert secure.model.sha256 != plain.model.sha256  # a different (masked) path, not a copy


def test_secure_federation_over_rounds_tracks_the_plaintext_one():
    plain = run(3, strategy=plain_weighted_mean)
    secure = run(3, secure_aggregation=True)
    assert [r.published for r in secure.rounds] == [True, True, True]
    for p, s in zip(plain.rounds, secure.rounds, strict=True):
        assert abs(p.accuracy - s.accuracy) <= 0.01
    assert (plain.model.flat - secure.model.flat).abs().max().item() <= 1e-3


def test_secure_aggregation_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError):  # needs the protocol
        SimulationConfig(FederationSpec(rounds=1, **BASE, secure_aggregation=True), protocol=False)
    with pytest.raises(ConfigError):  # a robust aggregator reads single updates
        FederationSpec(rounds=1, **BASE, secure_aggregation=True, aggregator="multi-krum").build_strategy()
    with pytest.raises(ConfigError):
        FederationSpec(rounds=1, **BASE, secure_aggregation="yes")  # type: ignore[arg-type]


def test_spec_round_trips_the_flag():
    spec = FederationSpec(rounds=1, **{**BASE, "train": TrainConfig()}, secure_aggregation=True)
    assert FederationSpec.from_json(spec.to_json()) == spec
    assert FederationSpec.from_json({k: v for k, v in spec.to_json().items() if k != "secure_aggregation"}) != spec


def test_cli_simulate_secure_aggregation(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "digits", "--model", "mlp", "--devices", "6", "--per-round", "6",
            "--rounds", "1", "--workers", "1", "--secure-aggregation", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"secure_aggregation": true' in result.output


def test_secure_round_with_colluding_devices_assumed_runs_to_the_end():
    """With 10 devices a round the parameters assume one colluding device (``corrupt`` = 1); the device
    must build the same session as the coordinator (it once left ``corrupt`` out: every round failed)."""
    from qflare.secagg import choose

    assert choose(10, dropout=0.1, corruption=0.1).corrupt >= 1
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "digits", "--model", "mlp", "--devices", "10", "--per-round", "10",
            "--rounds", "1", "--workers", "1", "--secure-aggregation", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"secure_aggregation": true' in result.output
