"""Bulyan, FLTrust, adaptive norm bounding and the ``--aggregator`` registry.  Expected numbers are
worked out by hand in the comments; each rule's breakdown point is exercised on both sides."""

from __future__ import annotations

import math

import pytest
import torch

from qflare.errors import ConfigError, ValidationError
from qflare.federation import FederationSpec
from qflare.strategy import (
    AGGREGATORS,
    AdaptiveNormBound,
    AggregatorContext,
    Bulyan,
    ClientUpdate,
    Combine,
    CoordinateMedian,
    FLTrust,
    Krum,
    Pipeline,
    ServerAdam,
    TrimmedMean,
    Uniform,
    WeightedMean,
    apply_aggregator,
    build_strategy,
    register_aggregator,
)
from qflare.strategy.combine import ShareCappedMean


def _combine(rule: object, values: list[list[float]], root: list[float] | None = None) -> tuple[torch.Tensor, object]:
    dim = len(values[0])
    acc = rule.start(dim) if root is None else rule.start(dim, root_update=torch.tensor(root))  # type: ignore[attr-defined]
    for v in values:
        acc.add(torch.tensor(v, dtype=torch.float32), 1.0)
    return acc.result(), acc


# ---------------------------------------------------------------------------------------- Bulyan
def test_bulyan_hand_computed() -> None:
    # n = 7, f = 1: θ = 5 picked by repeated Krum, β = 3 closest to the median averaged.
    # Krum picks, in order: 2 (score 10), 3 (9 among the rest), 1 (10, before 4 by order), 4, 0.
    # Chosen {0,1,2,3,4}: median 2, the 3 closest are 1, 2, 3 -> mean 2.0.  5 and 100 are left out.
    out, acc = _combine(Bulyan(1), [[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])
    assert acc.selected == (2, 3, 1, 4, 0)  # type: ignore[attr-defined]
    assert out.tolist() == [2.0]


def test_bulyan_requires_4f_plus_3_when_the_pipeline_is_built() -> None:
    assert Bulyan(1).round_size_problem(6) is not None
    assert Bulyan(1).round_size_problem(7) is None
    assert Bulyan(2).round_size_problem(10) is not None and Bulyan(2).round_size_problem(11) is None
    pipeline = Pipeline(weighting=Uniform(), combine=Bulyan(1))
    with pytest.raises(ConfigError) as info:
        pipeline.check_round_size(6)
    assert info.value.code == "too_few_updates"
    with pytest.raises(ValidationError) as again:  # and again when a round finishes short
        _combine(Bulyan(1), [[float(i)] for i in range(6)])
    assert again.value.code == "too_few_updates"
    with pytest.raises(ConfigError):
        Bulyan(-1)


def test_bulyan_breakdown_point() -> None:
    honest = [[0.1 * i, -0.2 * i] for i in range(6)]
    # f = 1 attacker anywhere: every coordinate stays inside the honest values' range.
    for evil in ([1e4, 1e4], [-1e4, 3.0], [0.25, 1e4]):
        out, _ = _combine(Bulyan(1), [*honest, evil])
        for k in range(2):
            column = [h[k] for h in honest]
            assert min(column) <= float(out[k]) <= max(column)
    # Beyond its breakdown point (4 colluding attackers of 7) the attackers own the result.
    out, _ = _combine(Bulyan(1), [*honest[:3], *([[1e4, 1e4]] * 4)])
    assert float(out[0]) == pytest.approx(1e4)


# --------------------------------------------------------------------------------------- FLTrust
def test_fltrust_hand_computed() -> None:
    # g0 = [1, 0].  a = [2, 0]: trust 1, rescaled to [1, 0].  b = [1, 1]: trust 1/√2, rescaled to
    # [1/√2, 1/√2].  c = [-3, 0]: trust 0 (left out).  Δ = ([1, 0] + 1/√2·[1/√2, 1/√2]) / (1 + 1/√2).
    out, acc = _combine(FLTrust(), [[2.0, 0.0], [1.0, 1.0], [-3.0, 0.0]], root=[1.0, 0.0])
    s = 1 / math.sqrt(2)
    expected = [(1 + s * s) / (1 + s), (s * s) / (1 + s)]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)
    assert acc.selected == (0, 1)  # type: ignore[attr-defined]
    assert acc.trust[2] == 0.0  # type: ignore[attr-defined]


def test_fltrust_bounds_a_scaled_update_and_refuses_all_untrusted_rounds() -> None:
    # A scaled attacker along the root direction is cut back to ‖g0‖: the aggregate's norm <= ‖g0‖.
    out, _ = _combine(FLTrust(), [[1e4, 0.0], [0.5, 0.5]], root=[0.0, 2.0])
    assert float(torch.linalg.vector_norm(out)) <= 2.0 + 1e-6
    with pytest.raises(ValidationError) as info:
        _combine(FLTrust(), [[-1.0, 0.0], [0.0, -1.0]], root=[1.0, 1.0])
    assert info.value.code == "no_trusted_updates"


class _Root:
    def __init__(self, value: list[float]) -> None:
        self.value = torch.tensor(value)
        self.calls: list[list[float]] = []

    def update(self, global_flat: torch.Tensor) -> torch.Tensor:
        self.calls.append(global_flat.tolist())
        return self.value.clone()


def test_fltrust_gets_its_root_update_through_the_pipeline() -> None:
    pipeline = Pipeline(weighting=Uniform(), combine=FLTrust())
    assert pipeline.needs_root
    with pytest.raises(ConfigError) as info:
        pipeline.begin(torch.zeros(2))
    assert info.value.code == "no_root_data"
    root = _Root([1.0, 0.0])
    agg = pipeline.with_root(root).begin(torch.tensor([5.0, 6.0]))
    assert root.calls == [[5.0, 6.0]]  # trained from the round's global model
    for name, v in (("a", [2.0, 0.0]), ("b", [-1.0, 0.0])):
        agg.add(ClientUpdate(name, torch.tensor(v), 1))
    assert agg.finish().tolist() == [6.0, 6.0]
    assert agg.left_out == frozenset({"b"})
    with pytest.raises(ConfigError):
        Pipeline(combine=FLTrust(), root=object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- adaptive norm bound
def test_adaptive_norm_bound_hand_computed() -> None:
    # Norms 1, 2, 3, 4, 100 -> median 3: the last two are clipped to 3; mean (1+2+3+3+3)/5 = 2.4.
    out, acc = _combine(AdaptiveNormBound(WeightedMean()), [[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert float(out[0]) == pytest.approx(2.4)
    assert acc.bound == 3.0 and acc.clipped == (3, 4)  # type: ignore[attr-defined]
    # multiplier 2: bound 6, only 100 is clipped -> (1+2+3+4+6)/5 = 3.2
    out, _ = _combine(AdaptiveNormBound(WeightedMean(), 2.0), [[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert float(out[0]) == pytest.approx(3.2)


def test_adaptive_norm_bound_breakdown_and_inner_requirements() -> None:
    # A minority of boosted updates is cut to the median norm whatever their size ...
    small, _ = _combine(AdaptiveNormBound(WeightedMean()), [[1.0]] * 3 + [[1e4]] * 2)
    assert float(small[0]) == pytest.approx(1.0)
    # ... a majority moves the median itself: beyond half, the bound is theirs.
    big, _ = _combine(AdaptiveNormBound(WeightedMean()), [[1.0]] * 2 + [[1e4]] * 3)
    assert float(big[0]) > 1e3
    wrapped = AdaptiveNormBound(Krum(1, 1))
    assert wrapped.round_size_problem(4) is not None and wrapped.round_size_problem(5) is None
    with pytest.raises(ConfigError):
        AdaptiveNormBound(FLTrust())
    with pytest.raises(ConfigError):
        AdaptiveNormBound(WeightedMean(), 0.0)


# ---------------------------------------------------------------------------------- the registry
def test_aggregator_keeps_the_strategy_server_optimiser() -> None:
    base = build_strategy("fedadam", server_lr=0.1)
    built = apply_aggregator(base, "multi-krum", AggregatorContext(round_size=10, byzantine=2))
    assert isinstance(built.server_opt, ServerAdam) and built.server_opt is base.server_opt
    assert built.combine == Krum(2, 8) and isinstance(built.weighting, Uniform)
    assert apply_aggregator(base, "none", AggregatorContext(10, 2)) is base
    stacked = apply_aggregator(base, "norm-bound+median", AggregatorContext(10, 2))
    assert stacked.combine == AdaptiveNormBound(CoordinateMedian())
    alone = apply_aggregator(build_strategy("fedavg"), "norm-bound", AggregatorContext(10, 2))
    assert alone.combine == AdaptiveNormBound(ShareCappedMean())  # wraps the strategy's own combine
    trimmed = apply_aggregator(base, "trimmed-mean", AggregatorContext(10, 2)).combine
    assert isinstance(trimmed, TrimmedMean) and math.floor(trimmed.beta * 10) == 2


@pytest.mark.parametrize("expr", ["median+krum", "none+median", "nope", "", "norm-bound+fltrust"])
def test_bad_aggregator_expressions_are_refused(expr: str) -> None:
    with pytest.raises(ConfigError):
        apply_aggregator(build_strategy("fedavg"), expr, AggregatorContext(10, 2))


def test_spec_checks_each_rule_requirement_and_travels() -> None:
    with pytest.raises(ConfigError) as info:
        FederationSpec(aggregator="bulyan").build_strategy()  # f = ceil(0.2*10) = 2 needs n >= 11
    assert info.value.code == "too_few_updates"
    assert FederationSpec(aggregator="bulyan", byzantine=1).build_strategy().combine == Bulyan(1)
    with pytest.raises(ConfigError):
        FederationSpec(aggregator="krum", byzantine=4).build_strategy()  # n > 2f + 2 fails at 10
    with pytest.raises(ConfigError):
        FederationSpec(byzantine=10)
    spec = FederationSpec(aggregator="norm-bound+multi-krum", byzantine=1)
    assert FederationSpec.from_json(spec.to_json()) == spec


def test_other_modules_can_register_a_wrapper_by_name() -> None:
    seen: list[AggregatorContext] = []

    def factory(ctx: AggregatorContext, inner: Combine) -> Combine:
        seen.append(ctx)
        return AdaptiveNormBound(inner, 3.0)

    register_aggregator("test-wrapper", factory, wraps=True, uniform=False, replace=True)
    assert "test-wrapper" in AGGREGATORS
    built = apply_aggregator(build_strategy("fedavg"), "test-wrapper+median", AggregatorContext(10, 2))
    assert built.combine == AdaptiveNormBound(CoordinateMedian(), 3.0)
    assert isinstance(built.weighting, Uniform)  # median is unweighted
    assert seen == [AggregatorContext(10, 2)]
