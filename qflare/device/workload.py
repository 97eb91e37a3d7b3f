"""A device's local work: its model, trainer and slice of the data.

:func:`load_workload` draws partition ``index`` exactly as ``qflare simulate`` does for the same seed,
so a fleet of ``qflare client`` processes reproduces a simulation; :func:`local_workload` trains on a
device's own examples instead (:func:`qflare.data.load_local_data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import ArrayDataset, load_dataset
from ..errors import ConfigError
from ..federation import FederationSpec
from ..models import create_model
from ..training import LocalTrainer, TrainResult, client_seed
from ..wire import ParamLayout

__all__ = ["Workload", "load_workload", "local_workload"]


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


def load_workload(spec: FederationSpec, index: int) -> Workload:
    """Device ``index``'s partition of ``spec``'s data set, exactly as ``qflare simulate`` draws it."""
    if not 0 <= index < spec.devices:
        raise ConfigError(f"--index must be in 0..{spec.devices - 1}, got {index}", code="bad_index")
    data = load_dataset(spec.dataset, "train", root=spec.data_root)
    parts = spec.partitions(data.labels.numpy())
    idx = torch.from_numpy(parts[index])
    torch.manual_seed(spec.seed)
    net = create_model(spec.model, data.input_shape, data.num_classes)
    trainer = LocalTrainer(net, spec.train, ParamLayout.from_module(net))
    return Workload(trainer, data.normalized(idx), data.labels[idx].clone(), index, spec.seed)


def local_workload(spec: FederationSpec, data: ArrayDataset, index: int) -> Workload:
    """A device training on all of ``data``, its own examples (``qflare client --data``), with ``spec``'s
    model and training settings; the model is built for ``data``'s input shape and class count."""
    torch.manual_seed(spec.seed)
    net = create_model(spec.model, data.input_shape, data.num_classes)
    trainer = LocalTrainer(net, spec.train, ParamLayout.from_module(net))
    return Workload(trainer, data.normalized(), data.labels.clone(), index, spec.seed)
