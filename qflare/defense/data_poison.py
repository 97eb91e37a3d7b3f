"""Data-poisoning attacks, applied to an attacker device's own examples before it trains.

* Label flipping (Fang et al. 2020, "Local Model Poisoning Attacks to Byzantine-Robust Federated
  Learning"; Tolpegin et al. 2020): every label y becomes C − 1 − y.
* Backdoor (Gu et al. 2017, "BadNets"; Bagdasaryan et al. 2020, "How To Backdoor Federated
  Learning"): a fraction of the attacker's examples get a trigger — a 4×4 square at the image's
  bottom-right corner set to the brightest value of the input — and the target label.  Its success
  rate is the share of test examples of other classes that, with the trigger, the model classifies as
  the target (:func:`backdoor_success`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..training import evaluate

__all__ = ["TRIGGER_SIZE", "add_trigger", "backdoor_success", "flip_labels", "poison_backdoor"]

TRIGGER_SIZE = 4


def flip_labels(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y -> num_classes − 1 − y."""
    return (num_classes - 1) - targets


def add_trigger(inputs: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``inputs`` ([n, C, H, W]) with the trigger square set to ``value``."""
    out = inputs.clone()
    out[..., -TRIGGER_SIZE:, -TRIGGER_SIZE:] = value
    return out


def poison_backdoor(
    inputs: torch.Tensor, targets: torch.Tensor, *, target: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs``/``targets`` with a seeded ``fraction`` of the examples triggered and relabelled ``target``."""
    n = int(targets.shape[0])
    k = max(1, round(fraction * n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    x, y = inputs.clone(), targets.clone()
    x[chosen] = add_trigger(inputs[chosen], float(inputs.max()))
    y[chosen] = target
    return x, y


def backdoor_success(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, target: int, channels_last: bool = True
) -> float:
    """The share of ``inputs`` not of class ``target`` that, triggered, ``model`` classifies as ``target``."""
    keep = targets != target
    x = add_trigger(inputs[keep], float(inputs.max()))
    y = torch.full((int(keep.sum()),), target, dtype=targets.dtype)
    _, accuracy = evaluate(model, x, y, channels_last=channels_last)
    return accuracy
