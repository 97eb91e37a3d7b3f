"""Rules that combine one round's deltas into a single pseudo-gradient Δ.

* :class:`WeightedMean` — FedAvg's Σ w_k Δ_k / Σ w_k (McMahan et al. 2017), streaming in O(model) memory.
* :class:`ShareCappedMean` — the same with no update weighing more than a bounded share of the round
  (the default: example counts are self-reported), streaming in O(model) memory.
* :class:`CoordinateMedian`, :class:`TrimmedMean` — coordinate-wise median and β-trimmed mean
  (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").
* :class:`Krum` — Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent").

The robust rules are unweighted, as in their papers: the weights passed to ``add`` are validated but do
not enter the result (a device cannot buy influence by over-reporting its example count).  They buffer
every delta (a private copy), so memory grows with the number of updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from qflare.errors import ConfigError, ValidationError

__all__ = [
    "CoordinateMedian",
    "Krum",
    "ShareCappedMean",
    "TrimmedMean",
    "WeightedMean",
    "krum_scores",
    "pairwise_sq_distances",
]

_CHUNK_ELEMENTS = 1 << 24  # bound on the (n × columns) block the buffering rules sort at once


def _check_input(delta: torch.Tensor, weight: float, dim: int) -> float:
    if delta.dtype != torch.float32 or delta.dim() != 1 or delta.numel() != dim:
        raise ValidationError(
            f"expected a float32 vector of shape ({dim},), got {delta.dtype} of shape {tuple(delta.shape)}",
            code="bad_shape",
        )
    w = float(weight)
    if not (math.isfinite(w) and w > 0):
        raise ValidationError(f"update weight must be positive and finite, got {weight}", code="bad_weight")
    return w


def _no_updates() -> ValidationError:
    return ValidationError("no updates were added to this round", code="no_updates")


class _MeanAccumulator:
    """Σ w_k Δ_k in one float64 vector (``add_`` with ``alpha``, cast on the fly), Σ w_k in a double.

    float64 because the terms are hostile: a float32 sum of finite updates overflows to Inf (every
    coordinate 3e38 times a weight of 2 does), a float64 one cannot (|w Δ_i| < 2^31 · 3.4e38 ≈ 7e47).
    """

    def __init__(self, dim: int) -> None:
        self._dim = dim
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def add(self, delta: torch.Tensor, weight: float) -> None:
        w = _check_input(delta, weight, self._dim)
        self._sum.add_(delta, alpha=w)
        self._total_weight += w
        self._count += 1

    def result(self) -> torch.Tensor:
        if self._count == 0:
            raise _no_updates()
        return (self._sum / self._total_weight).to(torch.float32)


@dataclass(frozen=True)
class WeightedMean:
    """Σ w_k Δ_k / Σ w_k; with example-count weights and a unit server step this is FedAvg exactly.

    Uncapped: a device that claims a huge example count owns the round.  The default pipeline uses
    :class:`ShareCappedMean`; this one is what secure aggregation (which only reveals sums) can run.
    """

    streaming: ClassVar[bool] = True
    needs_individual_updates: ClassVar[bool] = False

    def start(self, dim: int) -> _MeanAccumulator:
        return _MeanAccumulator(dim)


def _share_cap(weights: list[float], rest_total: float, rest_max: float, cap: float) -> float:
    """The cut τ of water-filling: min(w_k, τ) / Σ_j min(w_j, τ) <= ``cap`` for every k.

    ``weights`` are the largest weights, descending; ``rest_total``/``rest_max`` the sum and maximum of
    all the others.  Returns ``math.inf`` when nothing needs capping.  ``cap * n >= 1`` is assumed (an
    equal share always satisfies it) and at most ``len(weights)`` weights end up capped.
    """
    total = sum(weights) + rest_total
    if not weights or weights[0] <= cap * total:
        return math.inf
    remaining = total
    for c in range(1, len(weights) + 1):
        remaining -= weights[c - 1]  # the weights below the c largest
        if c * cap >= 1.0:
            break
        tau = cap * remaining / (1.0 - c * cap)
        below = weights[c] if c < len(weights) else rest_max
        if below <= tau * (1.0 + 1e-12):
            return tau
    return weights[-1] if rest_max <= 0.0 else min(weights[-1], rest_max)  # only by rounding when cap * n == 1


class _CappedAccumulator:
    """The ``buffered`` largest-weight deltas kept aside (private copies), every other one folded into a
    float64 running sum; at the end the kept ones are weighed by min(w, τ) (:func:`_share_cap`)."""

    def __init__(self, dim: int, spec: ShareCappedMean) -> None:
        self._dim = dim
        self._spec = spec
        self._top: list[tuple[float, int, torch.Tensor]] = []  # (weight, arrival, delta), weight descending
        self._rest = torch.zeros(dim, dtype=torch.float64)
        self._rest_weight = 0.0
        self._rest_max = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def _fold(self, delta: torch.Tensor, weight: float) -> None:
        self._rest.add_(delta, alpha=weight)
        self._rest_weight += weight
        self._rest_max = max(self._rest_max, weight)

    def add(self, delta: torch.Tensor, weight: float) -> None:
        w = _check_input(delta, weight, self._dim)
        if len(self._top) < self._spec.buffered or (self._top and w > self._top[-1][0]):
            entry = (w, self._count, delta.detach().clone())
            if len(self._top) == self._spec.buffered:
                evicted_w, _, evicted = self._top.pop()
                self._fold(evicted, evicted_w)
            self._top.append(entry)
            self._top.sort(key=lambda e: (-e[0], e[1]))
        else:
            self._fold(delta, w)
        self._count += 1

    def cap(self) -> float:
        """The share any one update may hold in this round: max(multiple / n, 1 / (buffered + 1))."""
        return min(1.0, max(self._spec.max_multiple / max(self._count, 1), 1.0 / (self._spec.buffered + 1)))

    def effective_weights(self) -> list[tuple[float, float]]:
        """(claimed, effective) weight of each kept update, largest first (the others are never capped)."""
        tau = _share_cap([e[0] for e in self._top], self._rest_weight, self._rest_max, self.cap())
        return [(w, min(w, tau)) for w, _, _ in self._top]

    def result(self) -> torch.Tensor:
        if self._count == 0:
            raise _no_updates()
        total = self._rest.clone()
        total_weight = self._rest_weight
        for (_, effective), (_, _, delta) in zip(self.effective_weights(), self._top, strict=True):
            total.add_(delta, alpha=effective)
            total_weight += effective
        return (total / total_weight).to(torch.float32)


@dataclass(frozen=True)
class ShareCappedMean:
    """A weighted mean in which no update holds more than a bounded share of the round's weight.

    Weights (example counts) are self-reported, so plain FedAvg lets one device own a round by claiming
    2^31 examples.  Here each weight is cut to min(w_k, τ), with τ the water-filling cut that leaves no
    update more than ``max(max_multiple / n, 1 / (buffered + 1))`` of the total, n the round's updates:
    at most ``max_multiple`` equal shares, and never less than 1/(``buffered`` + 1), which is what keeps
    it streaming.  Honest rounds whose largest share is under the cap get exactly FedAvg.

    Streaming: at most ⌈1/cap⌉ − 1 <= ``buffered`` updates can be capped, and they are among the largest
    weights, so the accumulator keeps the ``buffered`` largest-weight deltas aside and folds every other
    one into a float64 sum as it arrives: memory (``buffered`` float32 + 1 float64) × the model, whatever
    the number of updates, and the result is exact.  Each kept delta is a private copy: it is read from
    the individual update, so this cannot follow secure aggregation (use :class:`WeightedMean`).
    """

    max_multiple: float = 3.0
    buffered: int = 4
    streaming: ClassVar[bool] = True
    needs_individual_updates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_multiple) and self.max_multiple >= 1.0):
            raise ConfigError(f"ShareCappedMean.max_multiple must be a finite number >= 1, got {self.max_multiple}")
        if isinstance(self.buffered, bool) or not isinstance(self.buffered, int) or self.buffered < 1:
            raise ConfigError(f"ShareCappedMean.buffered must be a positive integer, got {self.buffered!r}")

    def start(self, dim: int) -> _CappedAccumulator:
        return _CappedAccumulator(dim, self)


class _BufferAccumulator:
    """Keeps a private copy of every delta; ``result`` applies ``reduce`` to the (n, dim) stack."""

    def __init__(self, dim: int, reduce: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        self._dim = dim
        self._reduce = reduce
        self._deltas: list[torch.Tensor] = []

    @property
    def count(self) -> int:
        return len(self._deltas)

    def add(self, delta: torch.Tensor, weight: float) -> None:
        _check_input(delta, weight, self._dim)
        self._deltas.append(delta.detach().clone())

    def result(self) -> torch.Tensor:
        if not self._deltas:
            raise _no_updates()
        return self._reduce(self._deltas)


def _by_column_blocks(deltas: list[torch.Tensor], reduce_block: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``reduce_block`` ((n, c) -> (c,)) over column blocks, bounding the temporary memory."""
    dim = deltas[0].numel()
    out = torch.empty(dim, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // len(deltas))
    for start in range(0, dim, step):
        stop = min(dim, start + step)
        out[start:stop] = reduce_block(torch.stack([d[start:stop] for d in deltas]))
    return out


def _median_block(block: torch.Tensor) -> torch.Tensor:
    n = block.shape[0]
    ordered = block.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) * 0.5


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018); for an even count, the mean of the two middle values."""

    streaming: ClassVar[bool] = False
    needs_individual_updates: ClassVar[bool] = True

    def start(self, dim: int) -> _BufferAccumulator:
        return _BufferAccumulator(dim, lambda deltas: _by_column_blocks(deltas, _median_block))

    def round_size_problem(self, n: int) -> str | None:
        """Why ``n`` updates are too few for this rule, or None (a median needs one)."""
        return None if n >= 1 else "the coordinate-wise median needs at least 1 update"


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018).

    For each coordinate, drop the ⌊βn⌋ largest and ⌊βn⌋ smallest values and average the rest;
    ``0 <= beta < 0.5`` so at least one value always remains.
    """

    beta: float = 0.1
    streaming: ClassVar[bool] = False
    needs_individual_updates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"TrimmedMean.beta must be in [0, 0.5), got {self.beta}")

    def _reduce(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        n = len(deltas)
        k = math.floor(self.beta * n)
        return _by_column_blocks(deltas, lambda block: block.sort(dim=0).values[k : n - k].mean(dim=0))

    def start(self, dim: int) -> _BufferAccumulator:
        return _BufferAccumulator(dim, self._reduce)

    def round_size_problem(self, n: int) -> str | None:
        """Why ``n`` updates are too few, or None: with ``beta > 0`` at least one value must be trimmed
        from each end (else the rule is a plain mean that tolerates nobody)."""
        if n < 1:
            return "the trimmed mean needs at least 1 update"
        if self.beta > 0 and math.floor(self.beta * n) == 0:
            need = next(k for k in range(n + 1, n + 10_000) if math.floor(self.beta * k) >= 1)
            return (
                f"the {self.beta:g}-trimmed mean of {n} updates trims floor({self.beta:g}*{n}) = 0 from each end, "
                f"so it would be a plain mean; it needs at least {need} updates"
            )
        return None


def pairwise_sq_distances(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The (n, n) float64 matrix of squared L2 distances between the deltas, from their Gram matrix
    accumulated over column blocks (bounded temporary memory); the diagonal is 0."""
    n = len(deltas)
    gram = torch.zeros(n, n, dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, deltas[0].numel(), step):
        block = torch.stack([d[start : start + step] for d in deltas]).double()
        gram.addmm_(block, block.T)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each of the n updates whose squared distances are ``dist``: the sum of its
    squared distances to its n - f - 2 nearest other updates (at least 1, Blanchard et al. 2017)."""
    n = dist.shape[0]
    others = dist.clone()
    others.fill_diagonal_(math.inf)
    neighbours = max(1, min(n - 1, n - f - 2))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


class _KrumAccumulator(_BufferAccumulator):
    def __init__(self, dim: int, krum: Krum) -> None:
        super().__init__(dim, self._select_and_average)
        self._krum = krum
        self.selected: tuple[int, ...] = ()
        self.scores: tuple[float, ...] = ()

    def _select_and_average(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        f, m, n = self._krum.f, self._krum.m, len(deltas)
        if n <= 2 * f + 2:
            raise ValidationError(
                f"Krum with f={f} needs more than 2f+2={2 * f + 2} updates, got {n}", code="too_few_updates"
            )
        if m > n - f:
            raise ValidationError(
                f"Multi-Krum with m={m}, f={f} needs at least m+f={m + f} updates, got {n}", code="too_few_updates"
            )
        dist = pairwise_sq_distances(deltas)
        scores = krum_scores(dist, f)
        order = torch.sort(scores, stable=True).indices[:m]
        self.selected = tuple(int(i) for i in order)
        self.scores = tuple(float(s) for s in scores)
        if m == 1:
            return deltas[self.selected[0]].clone()
        return torch.stack([deltas[i] for i in self.selected]).mean(dim=0)


@dataclass(frozen=True)
class Krum:
    """Krum (``m == 1``) and Multi-Krum (``m > 1``), Blanchard et al. 2017.

    Each update is scored by the sum of squared distances to its n − f − 2 nearest other updates; Krum
    returns the best-scored update, Multi-Krum the mean of the ``m`` best.  Tolerates ``f`` Byzantine
    updates and needs n > 2f + 2 (checked when the round finishes; code ``too_few_updates``).  After
    ``result()``, the accumulator's ``selected`` holds the chosen indices in the order updates were added.
    """

    f: int = 1
    m: int = 1
    streaming: ClassVar[bool] = False
    needs_individual_updates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0:
            raise ConfigError(f"Krum.f must be a non-negative integer, got {self.f!r}")
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ConfigError(f"Krum.m must be a positive integer, got {self.m!r}")

    def start(self, dim: int) -> _KrumAccumulator:
        return _KrumAccumulator(dim, self)

    def round_size_problem(self, n: int) -> str | None:
        """Why ``n`` updates are too few (the checks :meth:`_KrumAccumulator.result` makes), or None."""
        f, m = self.f, self.m
        if n <= 2 * f + 2:
            return f"Krum with f={f} needs more than 2f+2 = {2 * f + 2} updates, so at least {2 * f + 3}"
        if m > n - f:
            return f"Multi-Krum with m={m}, f={f} needs at least m+f = {m + f} updates"
        return None
