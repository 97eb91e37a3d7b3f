"""Tests for qflare.strategy.  Expected numbers are literals worked out by hand / plain-float arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare.bench.aggregation import copy_bandwidth, fedavg_bandwidth
from qflare.errors import ConfigError, QflareError, ValidationError
from qflare.strategy import (
    STRATEGIES,
    ClientUpdate,
    ClipNorm,
    CoordinateMedian,
    ExampleCountCheck,
    FiniteCheck,
    GaussianNoise,
    Krum,
    MaxAbsBound,
    NormBound,
    Pipeline,
    ServerAdagrad,
    ServerAdam,
    ServerMomentum,
    ServerSGD,
    ServerYogi,
    ShapeCheck,
    ShareCappedMean,
    TrimmedMean,
    WeightedMean,
    build_strategy,
    fedavg,
    fedavgm,
    fedmedian,
    fedtrimmedmean,
    krum,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def upd(device: str, *values: float, n: int = 1) -> ClientUpdate:
    return ClientUpdate(device, t(*values), n)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def run_round(pipeline: Pipeline, global_flat: torch.Tensor, *updates: ClientUpdate) -> torch.Tensor:
    agg = pipeline.begin(global_flat)
    for u in updates:
        agg.add(u)
    return agg.finish()


# ---------------------------------------------------------------------- FedAvg family
def test_fedavg_weighted_by_examples() -> None:
    # (1*[1,0] + 2*[0,3] + 3*[2,-1]) / 6 = [7/6, 1/2]
    agg = fedavg().begin(t(10.0, 20.0))
    agg.add(upd("a", 1.0, 0.0, n=1))
    agg.add(upd("b", 0.0, 3.0, n=2))
    agg.add(upd("c", 2.0, -1.0, n=3))
    assert agg.count == 3 and agg.total_examples == 6
    close(agg.finish(), [11.166667, 20.5])


def test_fedavg_does_not_mutate_global() -> None:
    g = t(1.0, 2.0)
    out = run_round(fedavg(), g, upd("a", 1.0, 1.0))
    assert torch.equal(g, t(1.0, 2.0)) and torch.equal(out, t(2.0, 3.0))


def test_fedavgm_two_rounds() -> None:
    # lr 0.5, beta 0.9: v1 = [0.2, 0.4], x1 = [1.1, -0.8]; v2 = 0.9 v1 + [-0.1, 0.2] = [0.08, 0.56], x2 = [1.14, -0.52]
    p = fedavgm(server_lr=0.5, momentum=0.9)
    x1 = run_round(p, t(1.0, -1.0), upd("a", 0.2, 0.4))
    close(x1, [1.1, -0.8])
    x2 = run_round(p, x1, upd("a", -0.1, 0.2))
    close(x2, [1.14, -0.52])


ADAPTIVE_KW = {"lr": 0.1, "beta1": 0.9, "tau": 0.01}


@pytest.mark.parametrize(
    ("opt", "x1", "x2", "v2"),
    [
        (
            ServerAdam(beta2=0.99, **ADAPTIVE_KW),
            [0.081993574, 0.93815385],
            [0.10375407, 0.88543874],
            [0.00347301, 0.00049501],
        ),
        (ServerYogi(beta2=0.99, **ADAPTIVE_KW), [0.08198039, 0.9381966], [0.10366898, 0.88562737], [0.0035, 0.000499]),
        (ServerAdagrad(**ADAPTIVE_KW), [0.0098020, 0.99048751], [0.012330739, 0.98241147], [0.3401, 0.0402]),
    ],
    ids=["adam", "yogi", "adagrad"],
)
def test_adaptive_two_rounds(opt: ServerAdam, x1: list[float], x2: list[float], v2: list[float]) -> None:
    # x0 = [0, 1], v0 = tau^2 = 1e-4, Δ1 = [0.5, -0.2], Δ2 = [-0.3, 0.01] (Yogi: coordinate 2 has v > Δ² in round 2)
    p = Pipeline(server_opt=opt)
    got1 = run_round(p, t(0.0, 1.0), upd("a", 0.5, -0.2))
    close(got1, x1)
    got2 = run_round(p, got1, upd("a", -0.3, 0.01))
    close(got2, x2)
    close(opt.v, v2)  # type: ignore[arg-type]
    close(opt.m, [0.015, -0.017])  # type: ignore[arg-type]  # 0.9*0.1*Δ1 + 0.1*Δ2


def test_adaptive_state_round_trips() -> None:
    a, b = ServerAdam(lr=0.1), ServerAdam(lr=0.1)
    x = a.step(t(0.0, 1.0), t(0.5, -0.2))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.step(x, t(-0.3, 0.01)), b.step(x, t(-0.3, 0.01)))
    with pytest.raises(ValidationError):
        b.step(t(0.0, 1.0, 2.0), t(0.0, 0.0, 0.0))  # state has 2 values, model now 3
    m = ServerMomentum()
    m.step(t(0.0), t(1.0))
    m2 = ServerMomentum()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.velocity, t(1.0))  # type: ignore[arg-type]


def test_server_sgd_scales_step() -> None:
    close(ServerSGD(0.5).step(t(1.0, 1.0), t(2.0, -4.0)), [2.0, -1.0])
    with pytest.raises(ConfigError):
        ServerSGD(0.0)
    with pytest.raises(ConfigError):
        ServerAdam(beta2=1.0)


# ---------------------------------------------------------------------- robust combines
def test_coordinate_median_even_and_odd() -> None:
    rows = [(1.0, 5.0, -1.0), (2.0, 6.0, 100.0), (3.0, -7.0, 0.0), (1000.0, 8.0, 1.0)]
    zero = torch.zeros(3)
    weighted = [upd(str(i), *r, n=1000 * i + 1) for i, r in enumerate(rows)]  # weights must not matter
    close(run_round(fedmedian(), zero, *weighted), [2.5, 5.5, 0.5])
    rows.append((-5.0, 0.0, 2.0))
    close(run_round(fedmedian(), zero, *(upd(str(i), *r) for i, r in enumerate(rows))), [2.0, 5.0, 1.0])


def test_trimmed_mean_drops_extremes() -> None:
    rows = [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0), (4.0, -1000.0), (100.0, 40.0)]
    updates = [upd(str(i), *r) for i, r in enumerate(rows)]
    close(run_round(fedtrimmedmean(beta=0.2), torch.zeros(2), *updates), [3.0, 20.0])
    with pytest.raises(ConfigError):
        TrimmedMean(0.5)


def test_column_blocks_cover_every_coordinate(monkeypatch: pytest.MonkeyPatch) -> None:
    import qflare.strategy.combine as combine

    monkeypatch.setattr(combine, "_CHUNK_ELEMENTS", 7)  # force many small blocks, including a ragged last one
    torch.manual_seed(1)
    data = torch.randn(5, 23)
    acc = CoordinateMedian().start(23)
    for row in data:
        acc.add(row, 1.0)
    assert torch.equal(acc.result(), data.median(dim=0).values)


KRUM_ROWS = [(100.0, -100.0, 50.0), (1.1, 1.0, 1.0), (1.0, 1.0, 1.0), (0.85, 1.0, 1.0), (1.0, 1.2, 1.0)]


def test_krum_rejects_outlier_and_picks_most_central() -> None:
    # scores (2 nearest, squared): outlier huge, [1,1,1] 0.0325, [1.1,1,1] 0.06, [0.85,..] 0.085, [1,1.2,1] 0.09
    p = krum(f=1)
    agg = p.begin(torch.zeros(3))
    for i, r in enumerate(KRUM_ROWS):
        agg.add(upd(str(i), *r))
    assert torch.equal(agg.finish(), t(1.0, 1.0, 1.0))
    assert agg.accumulator.selected == (2,)  # type: ignore[attr-defined]
    assert agg.accumulator.scores[0] > 1000  # type: ignore[attr-defined]


def test_multi_krum_averages_best_m() -> None:
    out = run_round(krum(f=1, m=2), torch.zeros(3), *(upd(str(i), *r) for i, r in enumerate(KRUM_ROWS)))
    close(out, [1.05, 1.0, 1.0])


def test_krum_needs_more_than_2f_plus_2() -> None:
    agg = krum(f=1).begin(torch.zeros(3))
    for i, r in enumerate(KRUM_ROWS[1:]):
        agg.add(upd(str(i), *r))
    with pytest.raises(ValidationError) as info:
        agg.finish()
    assert info.value.code == "too_few_updates"


@pytest.mark.parametrize("combine", [WeightedMean(), CoordinateMedian(), TrimmedMean(0.1), Krum(1)])
def test_empty_accumulator_refused(combine: WeightedMean) -> None:
    with pytest.raises(ValidationError) as info:
        combine.start(4).result()
    assert info.value.code == "no_updates"


def test_streaming_weighted_mean_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    deltas = torch.randn(40, 5000, generator=gen)
    weights = torch.randint(1, 500, (40,), generator=gen).double()
    acc = WeightedMean().start(5000)
    for d, w in zip(deltas, weights):
        acc.add(d, float(w))
    reference = (deltas.double() * weights[:, None]).sum(0) / weights.sum()
    assert (acc.result().double() - reference).abs().max() < 1e-6
    assert WeightedMean.streaming and not WeightedMean.needs_individual_updates
    assert not Krum.streaming and Krum.needs_individual_updates


# ---------------------------------------------------------------------- checks
def test_refused_updates_leave_round_unchanged() -> None:
    p = fedavg(checks=(ShapeCheck(), FiniteCheck(), NormBound(10.0), ExampleCountCheck(1000)))
    agg = p.begin(torch.zeros(3))
    agg.add(upd("good", 1.0, 2.0, 3.0, n=4))
    bad = {
        "non_finite": [
            upd("nan", float("nan"), 0.0, 0.0),
            upd("inf", 0.0, float("inf"), 0.0),
            upd("ninf", 0.0, 0.0, -float("inf")),
        ],
        "bad_shape": [
            upd("short", 1.0, 2.0),
            ClientUpdate("f64", torch.zeros(3, dtype=torch.float64), 1),
            ClientUpdate("2d", torch.zeros(1, 3), 1),
            ClientUpdate("list", [0.0, 0.0, 0.0], 1),  # type: ignore[arg-type]
        ],
        "norm_exceeded": [upd("big", 10.0, 0.1, 0.0)],
        "bad_example_count": [upd("zero", 0.0, 0.0, 0.0, n=0), upd("many", 0.0, 0.0, 0.0, n=1001)],
        "duplicate_update": [upd("good", 0.0, 0.0, 0.0)],
    }
    for code, updates in bad.items():
        for u in updates:
            with pytest.raises(ValidationError) as info:
                agg.add(u)
            assert info.value.code == code, (u.device_id, info.value.code)
    assert agg.count == 1 and agg.total_examples == 4 and agg.device_ids == {"good"}
    assert torch.equal(agg.finish(), t(1.0, 2.0, 3.0))
    with pytest.raises(QflareError):
        agg.finish()


def test_structure_checked_even_without_configured_checks() -> None:
    agg = fedmedian(checks=()).begin(torch.zeros(3))
    with pytest.raises(ValidationError):
        agg.add(upd("a", 1.0))
    with pytest.raises(ValidationError) as info:
        agg.add(ClientUpdate("b", torch.zeros(3), None))  # type: ignore[arg-type]
    assert info.value.code == "bad_example_count"
    assert agg.count == 0 and agg.total_examples == 0


def test_clip_norm_transform() -> None:
    assert torch.equal(ClipNorm(10.0).apply(t(3.0, 4.0)), t(3.0, 4.0))
    close(ClipNorm(1.0).apply(t(3.0, 4.0)), [0.6, 0.8])
    out = run_round(fedavg(transforms=(ClipNorm(1.0),)), torch.zeros(2), upd("a", 3.0, 4.0), upd("b", 0.0, 0.5))
    close(out, [0.3, 0.65])


# ---------------------------------------------------------------------- noise
def test_gaussian_noise_deterministic_by_seed() -> None:
    d = torch.zeros(10_000)
    a, b, c = GaussianNoise(0.5, seed=7), GaussianNoise(0.5, seed=7), GaussianNoise(0.5, seed=8)
    first = a.apply(d, 1)
    assert torch.equal(first, b.apply(d, 1))
    assert not torch.equal(first, c.apply(d, 1))
    assert not torch.equal(first, a.apply(d, 1))  # the sequence advances round to round
    assert 0.0045 < float(GaussianNoise(0.5, 1).apply(torch.zeros(100_000), 100).std()) < 0.0055  # σ / n
    assert 0.49 < float(GaussianNoise(0.5, 1, divide_by_count=False).apply(torch.zeros(100_000), 100).std()) < 0.51


def test_gaussian_noise_state_restores_sequence() -> None:
    d = torch.zeros(100)
    a = GaussianNoise(1.0, seed=3)
    a.apply(d, 1)
    saved = a.state_dict()
    expected = a.apply(d, 1)
    restored = GaussianNoise(1.0, seed=99)
    restored.load_state_dict(saved)
    assert torch.equal(restored.apply(d, 1), expected)


def test_noise_in_pipeline_reproducible() -> None:
    outs = [
        run_round(fedavg(noise=GaussianNoise(1.0, seed=5)), torch.zeros(50), upd("a", *[1.0] * 50)) for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], torch.ones(50))


# ---------------------------------------------------------------------- configuration
def test_incompatible_pipelines_refused() -> None:
    with pytest.raises(ConfigError, match="per-update inspection cannot follow secure aggregation"):
        Pipeline(checks=(ShapeCheck(), NormBound(1.0)), secure_aggregation=True)
    with pytest.raises(ConfigError, match="needs individual updates"):
        Pipeline(checks=(), combine=Krum(1), secure_aggregation=True)
    with pytest.raises(ConfigError, match="secure aggregation"):
        fedmedian(secure_aggregation=True)
    with pytest.raises(ConfigError, match="transforms"):
        fedavg(secure_aggregation=True, transforms=(ClipNorm(1.0),))
    with pytest.raises(ConfigError):
        Pipeline(combine="mean")  # type: ignore[arg-type]
    sa = fedavg(secure_aggregation=True, checks=(ShapeCheck(), ExampleCountCheck(10)))
    assert sa.secure_aggregation
    assert fedavg(secure_aggregation=True).checks == (ShapeCheck(),)


def test_registry() -> None:
    expected = (
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedmean",
        "krum",
        "dp-fedavg",
    )
    assert expected == STRATEGIES
    for name in STRATEGIES:
        shape = {"devices": 10, "per_round": 5, "rounds": 3, "noise_multiplier": 1.0} if name == "dp-fedavg" else {}
        assert isinstance(build_strategy(name, **shape), Pipeline)
    assert build_strategy("fedadam", server_lr=0.5).server_opt.lr == 0.5  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="fedavg, fedavgm"):
        build_strategy("fedprox")
    with pytest.raises(ConfigError):
        build_strategy("fedavg", bogus=1)
    with pytest.raises(ConfigError):
        build_strategy("krum", f=-1)


def test_bench_helpers_report_positive_bandwidth() -> None:
    fed = fedavg_bandwidth(n_updates=3, dim=1000, repeats=1)
    assert fed["gb_per_s"] > 0 and fed["bytes"] == 12_000
    assert copy_bandwidth(nbytes=1 << 20, repeats=1)["gb_per_s"] > 0


# ---------------------------------------------------------------------- overflow and influence (hardening)
def test_finite_huge_updates_cannot_overflow_the_mean() -> None:
    """Every coordinate 3e38 is finite; twice it overflowed the float32 running sum to Inf."""
    acc = WeightedMean().start(3)
    acc.add(t(3e38, -3e38, 1.0), 2.0)
    acc.add(t(3e38, -3e38, 3.0), 1.0)
    close(acc.result(), [3e38, -3e38, 5 / 3])


def test_default_pipeline_refuses_huge_coordinates() -> None:
    agg = fedavg().begin(torch.zeros(3))
    with pytest.raises(ValidationError) as info:
        agg.add(upd("evil", 3e38, 0.0, 0.0))
    assert info.value.code == "norm_exceeded" and agg.count == 0
    agg.add(upd("ok", 1e4, -1e4, 0.5))  # the bound itself is allowed
    with pytest.raises(ValidationError) as info:
        agg.add(upd("over", 0.0, -10001.0, 0.0))
    assert info.value.code == "norm_exceeded" and agg.count == 1
    with pytest.raises(ValidationError) as info:
        agg.add(upd("claims", 1.0, 1.0, 1.0, n=10_000_001))
    assert info.value.code == "bad_example_count" and agg.count == 1


def _reference_capped_mean(deltas: list[torch.Tensor], weights: list[float], cap: float) -> torch.Tensor:
    """Non-streaming reference: bisect for the largest cut τ with every share <= cap."""
    ws = torch.tensor(weights, dtype=torch.float64)
    if float(ws.max() / ws.sum()) <= cap:
        eff = ws
    else:
        lo, hi = 0.0, float(ws.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            capped = ws.clamp(max=mid)
            lo, hi = (mid, hi) if float(capped.max() / capped.sum()) <= cap + 1e-15 else (lo, mid)
        eff = ws.clamp(max=lo)
    stacked = torch.stack(deltas).double()
    return ((stacked * eff[:, None]).sum(0) / eff.sum()).float()


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10**7), min_size=1, max_size=14),
    buffered=st.integers(1, 5),
    multiple=st.sampled_from([1.0, 1.5, 3.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_share_capped_mean_is_exact_and_caps_every_share(weights, buffered, multiple, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(6, generator=gen) for _ in weights]
    acc = ShareCappedMean(max_multiple=multiple, buffered=buffered).start(6)
    for d, w in zip(deltas, weights, strict=True):
        acc.add(d, float(w))
    n = len(weights)
    cap = min(1.0, max(multiple / n, 1 / (buffered + 1)))
    expected = _reference_capped_mean(deltas, [float(w) for w in weights], cap)
    torch.testing.assert_close(acc.result(), expected, rtol=1e-5, atol=1e-5)
    effective = [e for _, e in acc.effective_weights()]
    total = sum(effective) + sum(float(w) for w in weights) - sum(w for w, _ in acc.effective_weights())
    assert max(effective) / total <= cap * (1 + 1e-9)


def test_share_cap_leaves_honest_rounds_exactly_fedavg() -> None:
    # Shares 1/6, 2/6, 3/6 with n = 3: the cap is max(3/3, 1/5) = 1, nothing is cut.
    rows = [(1.0, 0.0), (0.0, 3.0), (2.0, -1.0)]
    capped = run_round(fedavg(), t(10.0, 20.0), *(upd(str(i), *r, n=i + 1) for i, r in enumerate(rows)))
    plain = run_round(
        fedavg(combine=WeightedMean()), t(10.0, 20.0), *(upd(str(i), *r, n=i + 1) for i, r in enumerate(rows))
    )
    torch.testing.assert_close(capped, plain)


def test_share_cap_bounds_a_huge_claim() -> None:
    # 9 honest updates of weight 5 and one claiming 10^7: the claim is cut to τ = 0.3·45/0.7 (share 0.3).
    agg = fedavg().begin(torch.zeros(1))
    for i in range(9):
        agg.add(upd(f"h{i}", 0.0, n=5))
    agg.add(upd("evil", 1.0, n=10**7))
    close(agg.finish(), [0.3])


def test_share_capped_mean_refuses_bad_configuration() -> None:
    for bad in ({"max_multiple": 0.5}, {"max_multiple": math.inf}, {"buffered": 0}, {"buffered": True}):
        with pytest.raises(ConfigError):
            ShareCappedMean(**bad)
    with pytest.raises(ConfigError):
        MaxAbsBound(0.0)
    with pytest.raises(ConfigError):
        fedavg(max_model_abs=math.nan)
    assert fedavg(secure_aggregation=True).combine == WeightedMean()  # the cap reads individual updates


@pytest.mark.parametrize(
    ("value", "lr", "code"), [(5e6, 1.0, "aggregate_out_of_bounds"), (3e38, 4.0, "aggregate_non_finite")]
)
def test_unsafe_aggregate_is_refused_and_changes_nothing(value: float, lr: float, code: str) -> None:
    """Without the per-update bound the new model is still checked: the optimiser state is restored and
    the round can neither publish nor be finished by a retry."""
    pipeline = fedavgm(server_lr=lr, checks=(ShapeCheck(), FiniteCheck()))
    first = pipeline.begin(torch.zeros(2))
    first.add(upd("a", 1.0, 1.0))
    first.finish()
    velocity = pipeline.server_opt.state_dict()["velocity"]
    agg = pipeline.begin(torch.zeros(2))
    agg.add(upd("honest", 0.1, 0.1))
    agg.add(upd("evil", value, 0.0))
    with pytest.raises(ValidationError) as info:
        agg.finish()
    assert info.value.code == code and info.value.device_id == "evil"
    assert torch.equal(pipeline.server_opt.state_dict()["velocity"], velocity)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        agg.finish()
