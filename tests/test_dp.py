"""DP-FedAvg: clipping and noise checked numerically, the accountant against dp_accounting, the budget stop."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from typer.testing import CliRunner

from qflare.cli import app
from qflare.errors import ConfigError, TrainingError, ValidationError
from qflare.federation import FederationSpec
from qflare.simulation import SimulationConfig, run_simulation
from qflare.strategy import (
    ByExamples,
    ClientUpdate,
    DPFedAvg,
    Pipeline,
    PrivacyAccountant,
    Uniform,
    build_strategy,
    calibrate_noise_multiplier,
    dp_fedavg,
    privacy_of,
)
from qflare.strategy.state import encode_pipeline_state, load_pipeline_state
from qflare.training import TrainConfig


def _mech(**kw: object) -> DPFedAvg:
    args: dict[str, object] = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "expected_participants": 4,
        "sampling_rate": 0.1,
        "delta": 1e-5,
        "target_quantile": None,
        "seed": 7,
    }
    args.update(kw)
    return DPFedAvg(**args)  # type: ignore[arg-type]


def _release(mech: DPFedAvg, deltas: list[torch.Tensor]) -> torch.Tensor:
    acc = mech.start(deltas[0].numel())
    for d in deltas:
        acc.add(d, 1.0)
    return acc.result()


def test_each_update_is_clipped_to_the_norm_and_the_sum_is_divided_by_expected_participants() -> None:
    torch.manual_seed(0)
    dim, clip, m = 50, 0.7, 4
    deltas = [torch.randn(dim) * s for s in (0.01, 0.5, 3.0, 40.0)]  # two under the norm, two over
    noised = _release(_mech(clip_norm=clip, expected_participants=m), deltas)
    noise_only = _release(_mech(clip_norm=clip, expected_participants=m), [torch.zeros(dim)])  # same seed
    clipped_sum = (noised - noise_only) * m
    expected = sum(d * min(1.0, clip / float(d.norm())) for d in deltas)
    assert torch.allclose(clipped_sum, expected, atol=1e-5)
    for d in deltas:  # one update alone: its contribution has norm <= C and the update's direction
        alone = (_release(_mech(clip_norm=clip), [d]) - noise_only) * m
        assert float(alone.norm()) <= clip * (1 + 1e-5)
        assert torch.allclose(alone / alone.norm(), d / d.norm(), atol=1e-5)
    assert float(((noised - noise_only) * 2).norm()) > 0  # the denominator is m, not the count that arrived


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_standard_deviation_is_z_times_clip_over_m(adaptive: bool) -> None:
    dim, z, clip, m = 400_000, 1.3, 0.5, 8
    mech = _mech(clip_norm=clip, noise_multiplier=z, expected_participants=m, target_quantile=0.5 if adaptive else None)
    out = _release(mech, [torch.zeros(dim)]).double()
    z_sum = z
    if adaptive:  # Andrew et al. 2021: the count's noise takes its share, z_sum = (z^-2 - (2 sigma_b)^-2)^-1/2
        sigma_b = max(m / 20, z)
        z_sum = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
        assert mech.sum_noise_multiplier == pytest.approx(z_sum)
    expected = z_sum * clip / m
    # the sample std of n normal values has relative standard error 1/sqrt(2n) = 0.11 %: 1 % is ~9 sigma
    assert float(out.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(out.mean())) < 5 * expected / math.sqrt(dim)
    assert mech.last is not None and mech.last.applied_stddev == pytest.approx(expected)


def test_unseeded_noise_differs_between_mechanisms() -> None:
    a = _release(_mech(seed=None), [torch.zeros(100)])
    b = _release(_mech(seed=None), [torch.zeros(100)])
    assert not torch.equal(a, b)


def test_a_round_is_released_once() -> None:
    mech = _mech()
    acc = mech.start(10)
    acc.add(torch.ones(10), 1.0)
    first, second = acc.result(), acc.result()
    assert torch.equal(first, second) and mech.accountant.rounds == 1


def test_adaptive_clip_norm_moves_to_the_target_quantile() -> None:
    gen = torch.Generator().manual_seed(3)
    norms = torch.linspace(1.0, 10.0, 100)  # the median norm is 5.5
    for start in (0.3, 80.0):
        mech = _mech(clip_norm=start, noise_multiplier=0.5, expected_participants=100, target_quantile=0.5, clip_lr=0.2)
        for _ in range(90):
            directions = torch.randn(100, 5, generator=gen)
            deltas = list(directions / directions.norm(dim=1, keepdim=True) * norms[:, None])
            _release(mech, deltas)
        assert 4.0 < mech.clip_norm < 7.5, (start, mech.clip_norm)
    low = _mech(clip_norm=5.5, noise_multiplier=0.5, expected_participants=100, target_quantile=0.1)
    for _ in range(60):
        _release(low, [torch.ones(5) / math.sqrt(5) * n for n in norms])
    assert low.clip_norm < 3.0  # the 10 % quantile is 1.9


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_matches_dp_accounting(kind: str) -> None:
    z, q, delta = 1.1, 0.01, 1e-5
    acc = PrivacyAccountant(z, delta, kind)
    for _ in range(100):
        acc.record(q)
    direct = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 100)
    assert acc.epsilon() == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    plain = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    plain.compose(dp_accounting.GaussianDpEvent(z), 100)
    assert acc.epsilon(unsampled=True) == pytest.approx(plain.get_epsilon(delta), rel=1e-9)


def test_accountant_composes_rounds_of_different_rates_and_hypothetical_ones() -> None:
    acc = PrivacyAccountant(1.0, 1e-6)
    for q in (0.1, 0.1, 0.2, 0.1):
        acc.record(q)
    assert acc.state() == [[0.1, 2], [0.2, 1], [0.1, 1]] and acc.rounds == 4
    direct = dp_accounting.rdp.RdpAccountant()
    for q in (0.1, 0.1, 0.2, 0.1, 0.3):
        direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)))
    assert acc.epsilon(then=[0.3]) == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)
    assert acc.epsilon() < acc.epsilon(then=[0.3])
    with pytest.raises(ValueError):
        acc.load([[0.1, 0]])
    with pytest.raises(ValueError):
        acc.load([[1.5, 2]])


def test_calibration_reaches_the_budget() -> None:
    eps, delta, rounds, q = 2.0, 1e-5, 30, 0.1
    z = calibrate_noise_multiplier(eps, delta, rounds, q)

    def spent(mult: float) -> float:
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(mult)), rounds)
        return float(acc.get_epsilon(delta))

    assert spent(z) <= eps < spent(z * 0.97)
    pipeline = dp_fedavg(devices=100, per_round=10, rounds=rounds, epsilon=eps, delta=delta)
    mech = privacy_of(pipeline)
    assert mech is not None and mech.noise_multiplier == pytest.approx(z)


def test_the_preset_fixes_uniform_weighting_and_refuses_bad_configurations() -> None:
    pipeline = build_strategy("dp-fedavg", devices=10, per_round=5, rounds=3, noise_multiplier=1.0)
    assert isinstance(pipeline.weighting, Uniform) and privacy_of(pipeline) is not None
    mech = privacy_of(pipeline)
    assert mech is not None and mech.sampling_rate == 0.5 and mech.expected_participants == 5
    with pytest.raises(ConfigError, match="fixes weighting"):
        dp_fedavg(devices=10, per_round=5, rounds=3, noise_multiplier=1.0, weighting=ByExamples())
    with pytest.raises(ConfigError, match="not Uniform"):
        Pipeline(weighting=ByExamples(), combine=_mech())
    with pytest.raises(ConfigError, match="fixes secure_aggregation"):
        dp_fedavg(devices=10, per_round=5, rounds=3, noise_multiplier=1.0, secure_aggregation=True)
    with pytest.raises(ConfigError, match="needs individual updates"):  # the server clips each update
        Pipeline(checks=(), weighting=Uniform(), combine=_mech(), secure_aggregation=True)
    with pytest.raises(ConfigError, match="noise multiplier or a privacy budget"):
        dp_fedavg(devices=10, per_round=5, rounds=3)
    with pytest.raises(ConfigError, match="not even one round"):
        dp_fedavg(devices=10, per_round=5, rounds=3, noise_multiplier=0.3, epsilon=0.1)
    with pytest.raises(ConfigError, match="count_stddev"):
        _mech(noise_multiplier=3.0, target_quantile=0.5, count_stddev=1.0)
    with pytest.raises(ConfigError, match="federation's own"):
        FederationSpec(strategy="dp-fedavg", strategy_args={"devices": 5, "noise_multiplier": 1.0}).build_strategy()
    # a device's claimed example count changes nothing
    a, b = (_mech(seed=1), _mech(seed=1))
    ra = Pipeline(weighting=Uniform(), combine=a).begin(torch.zeros(6))
    rb = Pipeline(weighting=Uniform(), combine=b).begin(torch.zeros(6))
    ra.add(ClientUpdate("x", torch.ones(6) * 0.1, 1))
    rb.add(ClientUpdate("x", torch.ones(6) * 0.1, 1_000_000))
    assert torch.equal(ra.finish(), rb.finish())


def test_state_keeps_clip_norm_and_accounted_rounds_never_the_noise() -> None:
    pipeline = dp_fedavg(devices=20, per_round=5, rounds=10, noise_multiplier=1.0, seed=3)
    mech = privacy_of(pipeline)
    assert mech is not None
    agg = pipeline.begin(torch.zeros(8))
    agg.add(ClientUpdate("a", torch.ones(8), 3))
    agg.finish()
    blob = encode_pipeline_state(pipeline)
    assert blob is not None and b"generator" not in blob
    fresh = dp_fedavg(devices=20, per_round=5, rounds=10, noise_multiplier=1.0)
    load_pipeline_state(fresh, blob)
    restored = privacy_of(fresh)
    assert restored is not None
    assert restored.clip_norm == mech.clip_norm != 1.0 and restored.accountant.state() == [[0.25, 1]]
    assert restored.spent().epsilon == pytest.approx(mech.spent().epsilon)


def _spec(rounds: int, **args: object) -> FederationSpec:
    return FederationSpec(
        dataset="digits",
        model="mlp",
        devices=8,
        per_round=4,
        rounds=rounds,
        alpha=1.0,
        seed=3,
        train=TrainConfig(lr=0.1),
        strategy="dp-fedavg",
        strategy_args={"noise_multiplier": 1.0, "clip_norm": 0.5, **args},
    )


def _rdp_epsilon(rounds: int, q: float = 0.5, z: float = 1.0, delta: float = 1e-5) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("protocol", [True, False])
def test_the_budget_stops_training_before_the_round_that_would_exceed_it(protocol: bool, tmp_path) -> None:
    budget = (_rdp_epsilon(3) + _rdp_epsilon(4)) / 2  # rounds 1-3 fit, round 4 would exceed it
    ledger = tmp_path / "ledger.jsonl" if protocol else None
    result = run_simulation(
        SimulationConfig(_spec(8, epsilon=budget, seed=5), workers=1, protocol=protocol, ledger_out=ledger)
    )
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.stop_reason is not None and "privacy budget" in result.stop_reason
    for r in result.rounds:
        assert r.epsilon == pytest.approx(_rdp_epsilon(r.round), rel=1e-9)
        assert r.epsilon_unsampled == pytest.approx(_rdp_epsilon(r.round, q=1.0), rel=1e-9)
        assert r.delta == 1e-5
    assert result.to_json()["stop_reason"] == result.stop_reason
    if ledger is not None:  # each round's ledger entry carries the (epsilon, delta) spent after it
        entries = [json.loads(line) for line in ledger.read_text().splitlines()[1:]]
        dps = [e["body"]["dp"] for e in entries if e["body"].get("kind") == "round"]
        assert [float(d["epsilon"]) for d in dps] == pytest.approx([r.epsilon for r in result.rounds])
        assert {d["delta"] for d in dps} == {"1e-05"} and [d["rounds_accounted"] for d in dps] == [1, 2, 3]


def test_cli_dp_options(tmp_path) -> None:
    runner = CliRunner()
    base = ["simulate", "--dataset", "digits", "--model", "mlp", "--devices", "8", "--per-round", "4"]
    wrong = runner.invoke(app, [*base, "--dp-epsilon", "2"])
    assert wrong.exit_code != 0 and "--dp-epsilon does not apply to --strategy fedavg" in wrong.output
    missing = runner.invoke(app, [*base, "--strategy", "dp-fedavg"])
    assert missing.exit_code != 0 and "needs --noise-multiplier" in missing.output
    assert "Traceback" not in wrong.output + missing.output
    budget = (_rdp_epsilon(1) + _rdp_epsilon(2)) / 2
    out = tmp_path / "run"
    ok = runner.invoke(
        app,
        [
            *base,
            *("--rounds", "5", "--strategy", "dp-fedavg", "--noise-multiplier", "1.0", "--dp-epsilon", str(budget)),
            *("--dp-quantile", "0", "--workers", "1", "--out", str(out)),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "privacy budget reached" in ok.output
    history = json.loads((out / "history.json").read_text())
    assert len(history["rounds"]) == 1 and history["rounds"][0]["epsilon"] == pytest.approx(_rdp_epsilon(1))
    assert "privacy budget" in history["stop_reason"]
    assert "epsilon" in (out / "history.csv").read_text().splitlines()[0]


def test_bench_dp_refuses_bad_budgets_and_plots(tmp_path) -> None:
    from qflare.bench.dp import plot_dp, run_dp_bench, write_dp_bench

    with pytest.raises(ConfigError):
        run_dp_bench([0.0])
    bad = CliRunner().invoke(app, ["bench", "dp", "--epsilons", "two", "--out", str(tmp_path / "o")])
    assert bad.exit_code != 0 and "--epsilons" in bad.output and "Traceback" not in bad.output
    result = {
        "workload": "fmnist-dir05",
        "devices": 100,
        "per_round": 10,
        "rounds": 2,
        "delta": 1e-5,
        "runs": [
            {"run": "fedavg (no DP)", "final_accuracy": 0.7, "epsilon_spent": None},
            {"run": "a", "epsilon_budget": 2.0, "epsilon_spent": 1.9, "final_accuracy": 0.2, "noise_multiplier": 1.5},
            {"run": "b", "epsilon_budget": 8.0, "epsilon_spent": 7.9, "final_accuracy": 0.4, "noise_multiplier": 0.7},
            {"run": "c", "epsilon_budget": 1.0, "epsilon_spent": None, "final_accuracy": None, "error": "nan"},
        ],
    }
    assert plot_dp(result).startswith(b"\x89PNG")
    paths = write_dp_bench(result, tmp_path / "out")
    assert json.loads(paths[0].read_text())["runs"][1]["epsilon_spent"] == 1.9


# ------------------------------------------------------------------ why small federations diverge under DP
def test_noise_to_signal_is_the_noise_norm_on_the_mean_in_clip_norms() -> None:
    mech = _mech(clip_norm=0.5, noise_multiplier=2.0, expected_participants=4)
    dim = 40_000
    mean = _release(mech, [torch.zeros(dim)])  # no signal: the published mean is the noise / m
    assert float(mean.norm()) / 0.5 == pytest.approx(mech.noise_to_signal(dim), rel=0.02)
    with pytest.raises(ConfigError):
        mech.noise_to_signal(0)
    # The root cause of the NaN runs of `qflare bench dp` at epsilon 8: fmnist-dir05's CNN (1,663,370
    # parameters), 10 devices a round.  The noise on each round's mean is ~80 clip norms, the signal at most 1.
    spec = FederationSpec(
        devices=100, per_round=10, rounds=2, strategy="dp-fedavg", strategy_args={"epsilon": 8.0, "delta": 1e-5}
    )
    dp = privacy_of(spec.build_strategy())
    assert dp is not None and 70 < dp.noise_to_signal(1_663_370) < 90


def _diverging(rounds: int = 3) -> FederationSpec:
    # digits + MLP, 2 devices a round and z = 20: the noise on a round's mean is ~2,700 clip norms, the weights
    # blow up and the next round's local training produces an update far out of bounds (or a NaN loss)
    return FederationSpec(
        dataset="digits",
        model="mlp",
        devices=20,
        per_round=2,
        rounds=rounds,
        strategy="dp-fedavg",
        strategy_args={"noise_multiplier": 20.0, "seed": 0},
    )


def test_a_run_destroyed_by_dp_noise_fails_saying_why() -> None:
    with pytest.raises((TrainingError, ValidationError)) as info:
        run_simulation(SimulationConfig(_diverging(), workers=1, protocol=False))
    text = str(info.value)
    assert "round 2" in text and "DP-FedAvg adds noise of norm about" in text and "clip norms" in text


def test_bench_dp_keeps_the_rounds_a_failed_run_finished() -> None:
    from qflare.bench.dp import _simulate_private

    row = _simulate_private(_diverging(), workers=1)
    assert row["failed_in_round"] == 2 and row["final_accuracy"] is None and len(row["accuracy"]) == 1
    assert row["noise_to_signal"] > 1000 and "DP-FedAvg adds noise" in row["error"]
    assert row["error"].startswith("error [")
