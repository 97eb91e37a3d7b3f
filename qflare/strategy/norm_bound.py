"""Adaptive norm bounding: clip every update of a round to a bound taken from the round itself.

A fixed norm bound (Sun et al. 2019, "Can You Really Backdoor Federated Learning?") must be calibrated
to the model and the training; FLAME (Nguyen et al. 2022, "FLAME: Taming Backdoors in Federated
Learning", USENIX Security) instead clips each update to the *median* of the round's update norms, so
the bound follows the honest updates as training converges while a boosted (scaled) update is cut back
to an honest size.  :class:`AdaptiveNormBound` does that with bound = ``multiplier`` × median norm and
hands the clipped updates, with their weights, to an inner combine (``ShareCappedMean`` by default;
``median``, ``multi-krum``, ... via ``--aggregator norm-bound+NAME``).

After ``result()`` the accumulator's ``bound`` is the round's bound and ``clipped`` the indices of the
updates it scaled down; ``selected`` is the inner combine's (e.g. Multi-Krum's picks) when it has one.
Clipping leaves every update in: it bounds, it does not detect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from qflare.errors import ConfigError
from qflare.strategy.base import Accumulator, Combine
from qflare.strategy.combine import ShareCappedMean, _check_input, _no_updates

__all__ = ["AdaptiveNormBound"]


class _NormBoundAccumulator:
    def __init__(self, dim: int, rule: AdaptiveNormBound) -> None:
        self._dim = dim
        self._rule = rule
        self._items: list[tuple[torch.Tensor, float]] = []
        self._inner: Accumulator | None = None
        self.bound = math.nan
        self.clipped: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def selected(self) -> tuple[int, ...] | None:
        chosen = getattr(self._inner, "selected", None)
        return chosen if isinstance(chosen, tuple) else None

    def add(self, delta: torch.Tensor, weight: float) -> None:
        w = _check_input(delta, weight, self._dim)
        self._items.append((delta.detach().clone(), w))

    def result(self) -> torch.Tensor:
        if not self._items:
            raise _no_updates()
        norms = torch.tensor([float(torch.linalg.vector_norm(d)) for d, _ in self._items], dtype=torch.float64)
        self.bound = float(norms.median()) * self._rule.multiplier  # the lower median for an even count
        inner = self._rule.inner.start(self._dim)
        clipped = []
        for i, ((delta, weight), norm) in enumerate(zip(self._items, norms.tolist(), strict=True)):
            if norm > self.bound:
                scale = self.bound / norm if self.bound > 0 else 0.0
                delta = delta * scale
                clipped.append(i)
            inner.add(delta, weight)
        self.clipped = tuple(clipped)
        self._inner = inner
        return inner.result()


def _default_inner() -> Combine:
    return ShareCappedMean()


@dataclass(frozen=True)
class AdaptiveNormBound:
    """Clip each update to ``multiplier`` × the round's median update norm, then combine with ``inner``."""

    inner: Combine = field(default_factory=_default_inner)
    multiplier: float = 1.0
    streaming: ClassVar[bool] = False
    needs_individual_updates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Combine):
            raise ConfigError(f"AdaptiveNormBound.inner must be a Combine, got {self.inner!r}")
        if getattr(self.inner, "needs_root_update", False):
            raise ConfigError("AdaptiveNormBound cannot wrap a combine that needs a root update (FLTrust)")
        m = self.multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
            raise ConfigError(f"AdaptiveNormBound.multiplier must be a positive finite number, got {m!r}")

    def start(self, dim: int) -> _NormBoundAccumulator:
        return _NormBoundAccumulator(dim, self)

    def round_size_problem(self, n: int) -> str | None:
        """The inner combine's requirement (clipping itself needs one update)."""
        if n < 1:
            return "norm bounding needs at least 1 update"
        problem = getattr(self.inner, "round_size_problem", None)
        return problem(n) if problem is not None else None
