"""An aggregation strategy as a pipeline of small parts, the named presets and the registry.

A round runs: per update — shape check, configured checks, weighting, transforms, accumulate; at the
end — combine, noise, server optimiser.  Presets:

====================  =====================================================================
``fedavg``            weighted mean + x + Δ (McMahan et al. 2017)
``fedavgm``           weighted mean + server momentum (Hsu et al. 2019)
``fedadam``           weighted mean + server Adam (Reddi et al. 2021)
``fedyogi``           weighted mean + server Yogi (Reddi et al. 2021)
``fedadagrad``        weighted mean + server Adagrad (Reddi et al. 2021)
``fedmedian``         coordinate-wise median (Yin et al. 2018)
``fedtrimmedmean``    coordinate-wise β-trimmed mean (Yin et al. 2018)
``krum``              Krum / Multi-Krum (Blanchard et al. 2017)
====================  =====================================================================

Robust combines (Bulyan, FLTrust, adaptive norm bounding, ...) are composed onto any preset by name
with :func:`qflare.strategy.aggregators.apply_aggregator` (``--aggregator``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qflare.errors import ConfigError, RoundError, ValidationError
from qflare.registry import RegisteredNames, Registry
from qflare.strategy.base import (
    Accumulator,
    ClientUpdate,
    Combine,
    Noise,
    ServerOptimizer,
    Transform,
    UpdateCheck,
    Weighting,
)
from qflare.strategy.checks import DEFAULT_MAX_ABS, ExampleCountCheck, FiniteCheck, MaxAbsBound, ShapeCheck, max_abs
from qflare.strategy.combine import CoordinateMedian, Krum, ShareCappedMean, TrimmedMean, WeightedMean
from qflare.strategy.fltrust import RootUpdate
from qflare.strategy.server_opt import ServerAdagrad, ServerAdam, ServerMomentum, ServerSGD, ServerYogi
from qflare.strategy.weighting import ByExamples, Uniform

__all__ = [
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_MAX_MODEL_ABS",
    "STRATEGIES",
    "Pipeline",
    "PreparedUpdate",
    "RoundAggregation",
    "StrategyFactory",
    "build_strategy",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedmedian",
    "fedtrimmedmean",
    "fedyogi",
    "krum",
    "register_strategy",
    "strategy_factory",
]

_SHAPE = ShapeCheck()

DEFAULT_MAX_EXAMPLES = 10_000_000
"""The default cap on the example count one update may claim (:class:`ExampleCountCheck`)."""
DEFAULT_MAX_MODEL_ABS = 1e6
"""The default bound on any weight of an aggregated model (:attr:`Pipeline.max_model_abs`)."""


@dataclass(frozen=True, eq=False)
class Pipeline:
    """The parts of one aggregation strategy, validated together at construction.

    ``secure_aggregation=True`` declares that the server will only ever see sums of masked updates
    (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"), so
    nothing that must read an individual update's values may be configured: no value-inspecting checks,
    no per-update transforms, no combine that needs individual updates.  Structural checks (shape,
    example count) stay allowed.

    The defaults bound what one device can do to a round (docs/protocol.md, threat model): a claimed
    example count of at most :data:`DEFAULT_MAX_EXAMPLES`, every coordinate finite and at most
    :data:`~qflare.strategy.checks.DEFAULT_MAX_ABS` (:class:`MaxAbsBound`), no update more than a bounded
    share of the round's weight (:class:`ShareCappedMean`), and an aggregated model whose every weight is
    finite and at most ``max_model_abs`` -- else the round fails and the previous model stays.
    """

    checks: tuple[UpdateCheck, ...] = (
        ShapeCheck(),
        ExampleCountCheck(DEFAULT_MAX_EXAMPLES),
        FiniteCheck(),
        MaxAbsBound(DEFAULT_MAX_ABS),
    )
    weighting: Weighting = field(default_factory=ByExamples)
    transforms: tuple[Transform, ...] = ()
    combine: Combine = field(default_factory=ShareCappedMean)
    noise: Noise | None = None
    server_opt: ServerOptimizer = field(default_factory=ServerSGD)
    secure_aggregation: bool = False
    max_model_abs: float = DEFAULT_MAX_MODEL_ABS
    """:meth:`RoundAggregation.finish` refuses a new global model with a weight beyond this (or not finite)."""
    root: RootUpdate | None = None
    """The server's own update on its root data, for a combine that needs one (FLTrust): attach it with
    :meth:`with_root`; without it such a pipeline refuses to open a round (code ``no_root_data``)."""

    @property
    def needs_root(self) -> bool:
        """True when the combine needs a root update (:class:`~qflare.strategy.fltrust.FLTrust`)."""
        return bool(getattr(self.combine, "needs_root_update", False))

    def with_root(self, root: RootUpdate) -> Pipeline:
        """This pipeline (the same parts) with ``root`` as its root-update source."""
        return dataclasses.replace(self, root=root)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", tuple(self.checks))
        object.__setattr__(self, "transforms", tuple(self.transforms))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` explaining why these parts cannot work together."""
        bound = self.max_model_abs
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound > 0):
            raise ConfigError(f"max_model_abs must be a positive finite number, got {bound!r}")
        kinds: list[tuple[str, object, type]] = [
            *(("check", c, UpdateCheck) for c in self.checks),
            ("weighting", self.weighting, Weighting),
            *(("transform", t, Transform) for t in self.transforms),
            ("combine", self.combine, Combine),
            ("server optimizer", self.server_opt, ServerOptimizer),
        ]
        if self.noise is not None:
            kinds.append(("noise", self.noise, Noise))
        if self.root is not None:
            kinds.append(("root update", self.root, RootUpdate))
        for role, part, protocol in kinds:
            if not isinstance(part, protocol):
                raise ConfigError(f"{part!r} cannot serve as the {role}: it does not implement {protocol.__name__}")
        if getattr(self.combine, "uniform_weights_only", False) and not isinstance(self.weighting, Uniform):
            raise ConfigError(
                f"{self.combine!r} weighs every update equally (its privacy guarantee depends on it); "
                f"weighting {self.weighting!r} is not Uniform()"
            )
        if not self.secure_aggregation:
            return
        inspecting = [c for c in self.checks if c.inspects_values]
        if inspecting:
            raise ConfigError(
                f"per-update inspection cannot follow secure aggregation: {inspecting!r} read individual "
                "update values, which secure aggregation hides from the server; run them on the device"
            )
        if self.transforms:
            raise ConfigError(
                f"per-update transforms {list(self.transforms)!r} cannot follow secure aggregation: the server "
                "never sees an individual update; apply them on the device before masking"
            )
        if self.combine.needs_individual_updates:
            raise ConfigError(
                f"{self.combine!r} needs individual updates, but secure aggregation only reveals their sum; "
                "use WeightedMean"
            )

    def check_round_size(self, n: int) -> None:
        """Raise :class:`ConfigError` (code ``too_few_updates``) when a round of ``n`` updates cannot be
        combined: Krum's n > 2f + 2, a trimmed mean that would trim nothing, a median of nothing.

        A combine states its need through an optional ``round_size_problem(n) -> str | None`` method
        (the reason, or None); one without it is taken to work with any n >= 1.  Call this at start-up
        with the fewest updates a round may aggregate (``min_participants``, else ``per_round``), so a
        run that could never aggregate is refused instead of failing every round."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError(f"a round size is an integer, got {n!r}")
        problem: Callable[[int], str | None] | None = getattr(self.combine, "round_size_problem", None)
        reason = problem(n) if problem is not None else (None if n >= 1 else "a round needs at least 1 update")
        if reason is not None:
            raise ConfigError(f"a round of {n} update(s) is too few: {reason}", code="too_few_updates")

    def begin(self, global_flat: torch.Tensor) -> RoundAggregation:
        """Open a round on top of ``global_flat`` (copied: the caller may keep using its tensor)."""
        if not isinstance(global_flat, torch.Tensor) or global_flat.dtype != torch.float32 or global_flat.dim() != 1:
            raise ValidationError("the global model must be a 1-D float32 tensor", code="bad_shape")
        return RoundAggregation(self, global_flat.detach().clone())


@dataclass(frozen=True)
class PreparedUpdate:
    """A checked, weighted, transformed update that :meth:`RoundAggregation.commit` folds in."""

    device_id: str
    delta: torch.Tensor
    weight: float
    num_examples: int
    largest: float = 0.0
    """The largest coordinate magnitude of the delta (NaN if any is NaN): names a culprit if the round fails."""


class RoundAggregation:
    """One round in progress.  Refused updates raise and leave the round exactly as it was."""

    def __init__(self, pipeline: Pipeline, global_flat: torch.Tensor) -> None:
        self._pipeline = pipeline
        self._global = global_flat
        self._dim = global_flat.numel()
        self._acc: Accumulator = self._start(pipeline, global_flat)
        self._devices: set[str] = set()
        self._order: list[str] = []
        self._total_examples = 0
        self._finished = False
        self._largest: tuple[float, str] | None = None  # (largest |Δ_i|, device) over committed updates

    @staticmethod
    def _start(pipeline: Pipeline, global_flat: torch.Tensor) -> Accumulator:
        dim = global_flat.numel()
        if not pipeline.needs_root:
            return pipeline.combine.start(dim)
        if pipeline.root is None:
            raise ConfigError(
                f"{pipeline.combine!r} needs the server's root update, but this pipeline has no root data source",
                code="no_root_data",
            )
        root = pipeline.root.update(global_flat)
        start: Callable[..., Accumulator] = pipeline.combine.start
        return start(dim, root_update=root)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def committed(self) -> tuple[str, ...]:
        """The devices whose updates were folded in, in commit order (the accumulator's indices)."""
        return tuple(self._order)

    @property
    def left_out(self) -> frozenset[str]:
        """After :meth:`finish`: committed devices the combine did not use (its ``selected`` leaves them
        out: Krum, Bulyan, FLTrust's zero-trust updates); empty for combines that use every update."""
        chosen = getattr(self._acc, "selected", None)
        if not self._finished or not isinstance(chosen, tuple):
            return frozenset()
        used = {self._order[i] for i in chosen if 0 <= i < len(self._order)}
        return frozenset(self._order) - used

    @property
    def count(self) -> int:
        return self._acc.count

    @property
    def total_examples(self) -> int:
        return self._total_examples

    @property
    def device_ids(self) -> frozenset[str]:
        return frozenset(self._devices)

    @property
    def accumulator(self) -> Accumulator:
        """The combine's accumulator (e.g. Krum's ``selected`` after :meth:`finish`)."""
        return self._acc

    def check(self, update: ClientUpdate) -> PreparedUpdate:
        """Run every per-update check and transform without changing the round.

        Raises like :meth:`add`; pass the result to :meth:`commit` to fold it in (this lets a caller
        persist an update between validation and aggregation without validating twice).
        """
        if self._finished:
            raise RoundError("this round is already finished", code="round_closed")
        if update.device_id in self._devices:
            raise ValidationError(
                f"device {update.device_id} already contributed to this round", code="duplicate_update"
            )
        n = update.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValidationError(
                f"update from {update.device_id}: num_examples must be a non-negative integer, got {n!r}",
                code="bad_example_count",
            )
        _SHAPE.check(update, self._dim)
        for check in self._pipeline.checks:
            check.check(update, self._dim)
        weight = float(self._pipeline.weighting.weight(update))
        if not (math.isfinite(weight) and weight > 0):
            raise ValidationError(f"update from {update.device_id}: weight {weight} is not positive", code="bad_weight")
        delta = update.delta.detach()
        for transform in self._pipeline.transforms:
            delta = transform.apply(delta)
            if delta.dtype != torch.float32 or delta.shape != (self._dim,):
                raise ValidationError(f"{transform!r} changed the delta's shape or dtype", code="bad_shape")
        largest = max_abs(delta)
        return PreparedUpdate(update.device_id, delta, weight, n, largest)

    def commit(self, prepared: PreparedUpdate) -> None:
        """Fold in an update returned by :meth:`check` on this round."""
        if self._finished:
            raise RoundError("this round is already finished", code="round_closed")
        if prepared.device_id in self._devices:
            raise ValidationError(
                f"device {prepared.device_id} already contributed to this round", code="duplicate_update"
            )
        self._acc.add(prepared.delta, prepared.weight)
        self._devices.add(prepared.device_id)
        self._order.append(prepared.device_id)
        self._total_examples += prepared.num_examples
        if self._largest is None or not prepared.largest <= self._largest[0]:  # NaN wins
            self._largest = (prepared.largest, prepared.device_id)

    def add(self, update: ClientUpdate) -> None:
        """Check and fold in one update; a refused update raises and leaves the round unchanged."""
        self.commit(self.check(update))

    def finish(self) -> torch.Tensor:
        """Combine, add noise, take the server step; return the new global vector (round closes).

        The new model is checked before anyone signs it: a weight that is not finite raises
        ``aggregate_non_finite``, one beyond ``max_model_abs`` ``aggregate_out_of_bounds``; the server
        optimiser's state is then restored (the noise generator is not: noise is never reused) and the
        round stays unfinished.  The error names the device whose update had the largest coordinate when
        that coordinate alone is beyond the bound.
        """
        if self._finished:
            raise RoundError("this round is already finished", code="round_closed")
        combined = self._acc.result()
        if self._pipeline.noise is not None:
            combined = self._pipeline.noise.apply(combined, self._acc.count)
        server_opt = self._pipeline.server_opt
        saved = server_opt.state_dict()
        new_global = server_opt.step(self._global, combined)
        try:
            self._check_model(new_global)
        except ValidationError:
            server_opt.load_state_dict(saved)
            raise
        self._finished = True
        return new_global

    def _check_model(self, flat: torch.Tensor) -> None:
        if flat.dtype != torch.float32 or flat.shape != (self._dim,):
            raise ValidationError("the server step changed the model's shape or dtype", code="bad_shape")
        largest = max_abs(flat)
        bound = self._pipeline.max_model_abs
        if largest <= bound:
            return
        code = "aggregate_out_of_bounds" if math.isfinite(largest) else "aggregate_non_finite"
        exc = ValidationError(
            f"the aggregated model's largest weight is {largest:.6g} (bound {bound:.6g}); it is not published",
            code=code,
        )
        if self._largest is not None and not self._largest[0] <= bound:
            exc.device_id = self._largest[1]
            exc.args = (f"{exc.message}; update from {self._largest[1]} had a coordinate of {self._largest[0]:.6g}",)
        raise exc


# ---------------------------------------------------------------------- presets
def _pipeline(defaults: dict[str, Any], overrides: dict[str, Any]) -> Pipeline:
    unknown = set(overrides) - set(Pipeline.__dataclass_fields__)
    if unknown:
        valid = sorted(Pipeline.__dataclass_fields__)
        raise ConfigError(f"unknown pipeline option(s) {sorted(unknown)}; valid: {valid}")
    merged = {**defaults, **overrides}
    if "checks" not in overrides and merged.get("secure_aggregation"):
        merged["checks"] = (ShapeCheck(),)  # value checks belong on the device under secure aggregation
    if "combine" not in merged and merged.get("secure_aggregation"):
        merged["combine"] = WeightedMean()  # the share cap reads individual updates, which are masked
    return Pipeline(**merged)


def fedavg(**overrides: Any) -> Pipeline:
    """FedAvg (McMahan et al. 2017): example-weighted mean, unit server step."""
    return _pipeline({"server_opt": ServerSGD(1.0)}, overrides)


def fedavgm(server_lr: float = 1.0, momentum: float = 0.9, **overrides: Any) -> Pipeline:
    """FedAvgM (Hsu et al. 2019): weighted mean then server momentum."""
    return _pipeline({"server_opt": ServerMomentum(server_lr, momentum)}, overrides)


def fedadam(
    server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **overrides: Any
) -> Pipeline:
    """FedAdam (Reddi et al. 2021)."""
    return _pipeline({"server_opt": ServerAdam(server_lr, beta1, beta2, tau)}, overrides)


def fedyogi(
    server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **overrides: Any
) -> Pipeline:
    """FedYogi (Reddi et al. 2021)."""
    return _pipeline({"server_opt": ServerYogi(server_lr, beta1, beta2, tau)}, overrides)


def fedadagrad(server_lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3, **overrides: Any) -> Pipeline:
    """FedAdagrad (Reddi et al. 2021)."""
    return _pipeline({"server_opt": ServerAdagrad(server_lr, beta1, tau)}, overrides)


def fedmedian(**overrides: Any) -> Pipeline:
    """Coordinate-wise median (Yin et al. 2018), unweighted."""
    return _pipeline({"weighting": Uniform(), "combine": CoordinateMedian()}, overrides)


def fedtrimmedmean(beta: float = 0.1, **overrides: Any) -> Pipeline:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018), unweighted."""
    return _pipeline({"weighting": Uniform(), "combine": TrimmedMean(beta)}, overrides)


def krum(f: int = 1, m: int = 1, **overrides: Any) -> Pipeline:
    """Krum (m = 1) or Multi-Krum (m > 1) tolerating f Byzantine devices (Blanchard et al. 2017)."""
    return _pipeline({"weighting": Uniform(), "combine": Krum(f, m)}, overrides)


StrategyFactory = Callable[..., Pipeline]
"""Builds a :class:`Pipeline` from keyword options (``build_strategy``'s ``**kwargs``)."""

_REGISTRY: Registry[StrategyFactory] = Registry("strategy")
STRATEGIES: Sequence[str] = RegisteredNames(_REGISTRY)
"""Every registered strategy name, built-in presets first; follows later registrations (plugins)."""


def register_strategy(name: str, factory: StrategyFactory, *, replace: bool = False) -> None:
    """Register ``factory(**options) -> Pipeline`` under ``name`` (case-insensitive).

    A name that is taken raises :class:`ConfigError` unless ``replace=True``.
    """
    if not callable(factory):
        raise ConfigError(f"strategy {name!r}: the factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, factory, replace=replace)


def strategy_factory(name: str) -> StrategyFactory:
    """The factory registered under ``name`` (ConfigError listing the registered names otherwise)."""
    return _REGISTRY.get(name)


def build_strategy(strategy: str | StrategyFactory, **kwargs: Any) -> Pipeline:
    """Build a pipeline from a registered name or a factory; unknown names and bad options raise
    :class:`ConfigError`.  Every call builds fresh parts (server optimisers hold per-run state)."""
    if isinstance(strategy, str):
        factory, label = _REGISTRY.get(strategy), strategy
    elif callable(strategy):
        factory, label = strategy, getattr(strategy, "__name__", repr(strategy))
    else:
        raise ConfigError(f"a strategy is a registered name or a factory, got {type(strategy).__name__}")
    try:
        pipeline = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for strategy {label!r}: {exc}") from None
    if not isinstance(pipeline, Pipeline):
        raise ConfigError(f"strategy {label!r}: the factory returned a {type(pipeline).__name__}, not a Pipeline")
    return pipeline


for _name, _factory in (
    ("fedavg", fedavg),
    ("fedavgm", fedavgm),
    ("fedadam", fedadam),
    ("fedyogi", fedyogi),
    ("fedadagrad", fedadagrad),
    ("fedmedian", fedmedian),
    ("fedtrimmedmean", fedtrimmedmean),
    ("krum", krum),
):
    register_strategy(_name, _factory)
