"""Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML).

Two stages over the n updates of a round, tolerating ``f`` Byzantine ones when n >= 4f + 3:

1. *Selection*: θ = n − 2f updates are chosen one at a time by Krum (Blanchard et al. 2017) over the
   updates not chosen yet (each pick re-scores the remaining set).
2. *Aggregation*: per coordinate, of the θ chosen values the β = θ − 2f closest to their median are
   averaged (a coordinate-wise trimmed mean around the median).

Unweighted, as in the paper.  After ``result()`` the accumulator's ``selected`` holds the θ chosen
indices (in the order updates were added to the round), which the ledger records as combined; the
others are left out (``not_combined``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qflare.errors import ConfigError, ValidationError
from qflare.strategy.combine import (
    _BufferAccumulator,
    _by_column_blocks,
    _median_block,
    krum_scores,
    pairwise_sq_distances,
)

__all__ = ["Bulyan"]


def _closest_to_median_mean(block: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column of ``block`` (θ, c): the mean of the ``beta`` values closest to the column's median."""
    median = _median_block(block)
    distance = (block - median).abs()
    nearest = distance.topk(beta, dim=0, largest=False, sorted=False).indices
    return block.gather(0, nearest).mean(dim=0)


class _BulyanAccumulator(_BufferAccumulator):
    def __init__(self, dim: int, rule: Bulyan) -> None:
        super().__init__(dim, self._aggregate)
        self._rule = rule
        self.selected: tuple[int, ...] = ()

    def _aggregate(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        f, n = self._rule.f, len(deltas)
        problem = self._rule.round_size_problem(n)
        if problem is not None:
            raise ValidationError(problem, code="too_few_updates")
        theta, beta = n - 2 * f, n - 4 * f
        dist = pairwise_sq_distances(deltas)
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(theta):
            sub = dist[remaining][:, remaining]
            scores = krum_scores(sub, f)
            best = int(torch.sort(scores, stable=True).indices[0])
            chosen.append(remaining.pop(best))
        self.selected = tuple(chosen)
        picked = [deltas[i] for i in chosen]
        return _by_column_blocks(picked, lambda block: _closest_to_median_mean(block, beta))


@dataclass(frozen=True)
class Bulyan:
    """Bulyan tolerating ``f`` Byzantine updates; needs n >= 4f + 3 (checked when the pipeline is built
    for a round size, and again when a round finishes; code ``too_few_updates``)."""

    f: int = 1
    streaming: ClassVar[bool] = False
    needs_individual_updates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0:
            raise ConfigError(f"Bulyan.f must be a non-negative integer, got {self.f!r}")

    def start(self, dim: int) -> _BulyanAccumulator:
        return _BulyanAccumulator(dim, self)

    def round_size_problem(self, n: int) -> str | None:
        """Why ``n`` updates are too few for Bulyan with this ``f`` (n >= 4f + 3), or None."""
        if n < 4 * self.f + 3:
            return f"Bulyan with f={self.f} needs n >= 4f+3 = {4 * self.f + 3} updates"
        return None
