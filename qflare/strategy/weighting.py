"""How much each update counts in the combination.

:class:`ByExamples` is FedAvg's weighting n_k / n (McMahan et al. 2017); :class:`Uniform` weighs every
device equally, which bounds the influence a device can gain by over-reporting its example count.
"""

from __future__ import annotations

from dataclasses import dataclass

from qflare.errors import ValidationError
from qflare.strategy.base import ClientUpdate

__all__ = ["ByExamples", "Uniform"]


@dataclass(frozen=True)
class ByExamples:
    """Weight = number of local training examples (must be a positive integer; code ``bad_example_count``)."""

    def weight(self, update: ClientUpdate) -> float:
        n = update.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValidationError(
                f"update from {update.device_id}: num_examples must be a positive integer, got {n!r}",
                code="bad_example_count",
            )
        return float(n)


@dataclass(frozen=True)
class Uniform:
    """Weight 1 for every update."""

    def weight(self, update: ClientUpdate) -> float:
        return 1.0
