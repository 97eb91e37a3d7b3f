"""Per-update rewrites applied between weighting and combining."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qflare.errors import ConfigError

__all__ = ["ClipNorm"]


@dataclass(frozen=True)
class ClipNorm:
    """Scale the delta down so its L2 norm is at most ``max_norm`` (never scales up).

    Per-update clipping bounds each device's contribution: the sensitivity that the Gaussian mechanism
    of DP-FedAvg is calibrated against (McMahan et al. 2018, "Learning Differentially Private Recurrent
    Language Models"), and a norm-bounding defence against backdoors (Sun et al. 2019).
    """

    max_norm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"ClipNorm.max_norm must be a positive finite number, got {self.max_norm}")

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        norm = float(torch.linalg.vector_norm(delta))
        if norm <= self.max_norm:
            return delta
        return delta * (self.max_norm / norm)
