"""Robust aggregation rules by name: what ``--aggregator`` selects, composed onto a ``--strategy`` preset.

``--strategy`` picks the pipeline (checks, weighting, combine, server optimiser); ``--aggregator NAME``
then replaces its *combine* with a robust rule (and, for the unweighted rules, its weighting with
:class:`~qflare.strategy.weighting.Uniform`), keeping the server optimiser: ``--strategy fedadam
--aggregator multi-krum`` is Multi-Krum's pseudo-gradient stepped by server Adam.  ``none`` keeps the
strategy's own combine.

Names combine with ``+``, outermost first: ``norm-bound+multi-krum`` clips every update to the round's
median norm, then runs Multi-Krum on the clipped updates.  Only *wrappers* (registered with
``wraps=True``: ``norm-bound``, ...) may stand left of a ``+``; the rightmost name is the base rule, and
a wrapper that stands last wraps the strategy's own combine.

Each factory is given an :class:`AggregatorContext`: the fewest updates a round aggregates and ``f``,
the Byzantine updates per round the rule must tolerate.  A rule whose requirement (Krum's n > 2f + 2,
Bulyan's n >= 4f + 3, ...) that round size cannot meet is refused when the pipeline is built
(:meth:`~qflare.strategy.pipeline.Pipeline.check_round_size`, code ``too_few_updates``).

Built-in names: ``none``, ``median``, ``trimmed-mean``, ``krum``, ``multi-krum``, ``bulyan``, ``fltrust``,
``norm-bound``, ``reputation``.  :func:`register_aggregator` adds more (a plugin, or another QFLARE module).

``reputation`` is a wrapper that leaves the combine as it is and turns on adaptive threat detection
(:mod:`qflare.protocol.detection`: per-round anomaly scores, reputation, quarantine): the round manager
judges a round's updates when it closes and folds in only the ones it keeps, so ``reputation+multi-krum``
runs Multi-Krum on the updates the detector kept.  Being a filter ahead of any combine, a detection rule
may stand anywhere in the expression: ``multi-krum+reputation`` is the same.  :func:`aggregator_detection` says whether an
expression asks for it (a rule registered with ``detection=True``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qflare.errors import ConfigError
from qflare.registry import RegisteredNames, Registry
from qflare.strategy.base import Combine
from qflare.strategy.bulyan import Bulyan
from qflare.strategy.combine import CoordinateMedian, Krum, TrimmedMean
from qflare.strategy.fltrust import FLTrust
from qflare.strategy.norm_bound import AdaptiveNormBound
from qflare.strategy.pipeline import Pipeline
from qflare.strategy.weighting import Uniform

__all__ = [
    "AGGREGATORS",
    "DEFAULT_BYZANTINE_FRACTION",
    "AggregatorContext",
    "AggregatorEntry",
    "AggregatorFactory",
    "aggregator_combine",
    "aggregator_detection",
    "apply_aggregator",
    "default_byzantine",
    "register_aggregator",
]

DEFAULT_BYZANTINE_FRACTION = 0.2
"""Without ``--byzantine``, rules tolerate ⌈0.2 n⌉ Byzantine updates per round of n (the design point)."""


def default_byzantine(round_size: int) -> int:
    """⌈:data:`DEFAULT_BYZANTINE_FRACTION` × ``round_size``⌉."""
    return math.ceil(DEFAULT_BYZANTINE_FRACTION * round_size - 1e-9)


@dataclass(frozen=True)
class AggregatorContext:
    """What a rule's factory may size itself by."""

    round_size: int
    """The fewest updates a round aggregates (``min_participants``, else ``per_round``)."""
    byzantine: int
    """f: the Byzantine updates per round the rule must tolerate."""

    def __post_init__(self) -> None:
        for name in ("round_size", "byzantine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


AggregatorFactory = Callable[[AggregatorContext, Combine], Combine]
"""``factory(context, inner) -> Combine``; ``inner`` is what a wrapper wraps (a base rule ignores it)."""


@dataclass(frozen=True)
class AggregatorEntry:
    factory: AggregatorFactory
    wraps: bool
    """True: the rule wraps ``inner`` and may stand left of a ``+``."""
    uniform: bool
    """True: the rule is unweighted, so the pipeline's weighting becomes ``Uniform``."""
    detection: bool = False
    """True: the rule asks the round manager for adaptive threat detection (``reputation``)."""


_REGISTRY: Registry[AggregatorEntry] = Registry("aggregator")
AGGREGATORS: Sequence[str] = RegisteredNames(_REGISTRY)
"""Every registered aggregator name, built-in ones first (follows later registrations)."""


def register_aggregator(
    name: str,
    factory: AggregatorFactory,
    *,
    wraps: bool = False,
    uniform: bool = True,
    detection: bool = False,
    replace: bool = False,
) -> None:
    """Register ``factory`` under ``name`` (case-insensitive); see the module docstring for ``wraps`` and
    ``detection``."""
    if not callable(factory):
        raise ConfigError(f"aggregator {name!r}: the factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, AggregatorEntry(factory, wraps, uniform, detection), replace=replace)


def _parts(expr: str) -> list[tuple[str, AggregatorEntry]]:
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigError(f"an aggregator is a registered name (or names joined by '+'), got {expr!r}")
    names = [n.strip() for n in expr.split("+")]
    parts = [(_REGISTRY.canonical(n), _REGISTRY.get(n)) for n in names]
    if len(parts) > 1 and any(name == "none" for name, _ in parts):
        raise ConfigError(f"aggregator {expr!r}: 'none' cannot be combined with other rules")
    combines = [(name, entry) for name, entry in parts if not entry.detection]  # detection filters stand anywhere
    for name, entry in combines[:-1]:
        if not entry.wraps:
            raise ConfigError(
                f"aggregator {expr!r}: {name!r} is a base rule, so it can only stand last; "
                f"rules that wrap another: {', '.join(n for n in AGGREGATORS if _REGISTRY.get(n).wraps)}"
            )
    return parts


def aggregator_combine(expr: str, context: AggregatorContext, base: Combine) -> tuple[Combine, bool]:
    """The combine ``expr`` names, built right to left on top of ``base``; and whether it is unweighted."""
    combine, uniform = base, False
    for _, entry in reversed(_parts(expr)):
        built = entry.factory(context, combine)
        if not isinstance(built, Combine):
            raise ConfigError(f"aggregator {expr!r}: a factory returned {built!r}, which is not a Combine")
        combine, uniform = built, uniform or entry.uniform
    return combine, uniform


def aggregator_detection(expr: str) -> bool:
    """Whether ``expr`` names a rule that turns on adaptive threat detection (``reputation``)."""
    return any(entry.detection for _, entry in _parts(expr))


def apply_aggregator(pipeline: Pipeline, expr: str, context: AggregatorContext) -> Pipeline:
    """``pipeline`` with the combine (and weighting) ``expr`` names; ``none`` returns it unchanged."""
    parts = _parts(expr)
    if [name for name, _ in parts] == ["none"]:
        return pipeline
    combine, uniform = aggregator_combine(expr, context, pipeline.combine)
    weighting = Uniform() if uniform else pipeline.weighting
    return dataclasses.replace(pipeline, combine=combine, weighting=weighting)


def _f(context: AggregatorContext) -> int:
    return context.byzantine


def _trimmed(context: AggregatorContext, _: Combine) -> Combine:
    n, f = context.round_size, context.byzantine
    if n and 2 * f >= n:
        raise ConfigError(
            f"trimmed-mean cannot tolerate f={f} of {n} updates per round: it trims f from each end",
            code="too_few_updates",
        )
    beta = f / n if n else 0.0
    return TrimmedMean(min(beta + 1e-9, 0.499999) if f else 0.0)  # floor(beta * n) == f exactly


def _multi_krum(context: AggregatorContext, _: Combine) -> Combine:
    return Krum(context.byzantine, max(1, context.round_size - context.byzantine))


for _name, _factory, _wraps, _uniform, _detection in (
    ("none", lambda c, inner: inner, False, False, False),
    ("median", lambda c, _: CoordinateMedian(), False, True, False),
    ("trimmed-mean", _trimmed, False, True, False),
    ("krum", lambda c, _: Krum(_f(c), 1), False, True, False),
    ("multi-krum", _multi_krum, False, True, False),
    ("bulyan", lambda c, _: Bulyan(_f(c)), False, True, False),
    ("fltrust", lambda c, _: FLTrust(), False, True, False),
    ("norm-bound", lambda c, inner: AdaptiveNormBound(inner), True, False, False),
    # the detector filters the round's updates before the combine runs; the combine itself is unchanged
    ("reputation", lambda c, inner: inner, True, False, True),
):
    register_aggregator(_name, _factory, wraps=_wraps, uniform=_uniform, detection=_detection)
