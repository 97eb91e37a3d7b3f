"""The coordinator's root update for FLTrust: the server trains the round's global model on a small
clean data set of its own (:class:`~qflare.strategy.fltrust.RootUpdate`)."""

from __future__ import annotations

import torch

from ..training import LocalTrainer

__all__ = ["ROOT_EXAMPLES", "TrainedRoot", "root_indices"]

ROOT_EXAMPLES = 100
"""The root data set's size: FLTrust's paper uses 100 examples."""


def root_indices(n: int, size: int = ROOT_EXAMPLES, *, seed: int = 0) -> torch.Tensor:
    """A seeded choice of ``min(size, n)`` indices of an ``n``-example split."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]


class TrainedRoot:
    """Root updates from local training (the devices' :class:`LocalTrainer` settings) on ``inputs``."""

    def __init__(self, trainer: LocalTrainer, inputs: torch.Tensor, targets: torch.Tensor, *, seed: int) -> None:
        self._trainer, self._x, self._y, self._seed = trainer, inputs, targets, seed
        self._rounds = 0

    def __repr__(self) -> str:
        return f"TrainedRoot(examples={int(self._y.shape[0])})"

    def update(self, global_flat: torch.Tensor) -> torch.Tensor:
        self._rounds += 1
        return self._trainer.train(global_flat, self._x, self._y, seed=self._seed + self._rounds).delta
