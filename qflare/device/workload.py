"""A device's local work: its model, trainer and slice of the data.

:func:`load_workload` draws partition ``index`` exactly as ``qflare simulate`` does for the same seed,
so a fleet of ``qflare client`` processes reproduces a simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import load_dataset, partition
from ..errors import ConfigError
from ..models import create_model
from ..training import LocalTrainer, TrainConfig, TrainResult, client_seed
from ..wire import ParamLayout

__all__ = ["Workload", "load_workload"]


@dataclass
class Workload:
    """One device's local training: a trainer and its partition of the data (normalised inputs)."""

    trainer: LocalTrainer
    inputs: torch.Tensor
    targets: torch.Tensor
    index: int
    seed: int

    @property
    def layout(self) -> ParamLayout:
        return self.trainer.layout

    def train(self, global_flat: torch.Tensor, rnd: int) -> TrainResult:
        """Train with the shuffle seed the simulation gives device ``index`` in round ``rnd``."""
        return self.trainer.train(global_flat, self.inputs, self.targets, seed=client_seed(self.seed, rnd, self.index))


def load_workload(
    *,
    dataset: str,
    model: str,
    index: int,
    devices: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    train: TrainConfig | None = None,
    data_root: str | None = None,
) -> Workload:
    """Partition ``index`` of ``devices`` exactly as ``qflare simulate`` draws it for the same seed."""
    if not 0 <= index < devices:
        raise ConfigError(f"--index must be in 0..{devices - 1}, got {index}", code="bad_index")
    data = load_dataset(dataset, "train", root=data_root)
    parts = partition(scheme, data.labels.numpy(), devices, seed=seed, alpha=alpha, shards_per_device=shards_per_device)
    idx = torch.from_numpy(parts[index])
    torch.manual_seed(seed)
    net = create_model(model, data.input_shape, data.num_classes)
    trainer = LocalTrainer(net, train or TrainConfig(), ParamLayout.from_module(net))
    return Workload(trainer, data.normalized(idx), data.labels[idx].clone(), index, seed)
