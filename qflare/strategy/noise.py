"""Noise on the combined delta for central differential privacy.

The Gaussian mechanism as used by DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"): clip each update to norm S (:class:`~qflare.strategy.transforms.ClipNorm`),
sum, add N(0, σ²) with σ = z·S, divide by the number of updates.

**No calibration or privacy accounting happens here.**  The caller chooses ``stddev`` (σ) from its
noise multiplier and clipping bound and tracks (ε, δ) with an accountant of its own; the accounted
mechanism is :mod:`qflare.strategy.dp` (``--strategy dp-fedavg``).  The guarantee of
DP-FedAvg holds for uniform weighting with a fixed number of updates per round; with example-count
weighting a device's influence on the mean is not bounded by S/n and σ must be chosen accordingly.
"""

from __future__ import annotations

import math

import torch

from qflare.errors import ConfigError, ValidationError

__all__ = ["GaussianNoise"]


class GaussianNoise:
    """Add i.i.d. Gaussian noise to Δ, reproducibly.

    ``stddev`` is σ, the standard deviation of the noise on the *sum* of updates; with
    ``divide_by_count`` (the default, DP-FedAvg's convention) the mean Δ receives σ / num_updates.
    With ``divide_by_count=False`` σ is added to Δ as is.  The generator is seeded once, so a given
    seed produces the same sequence of noise vectors round after round (never the same vector twice).
    """

    def __init__(self, stddev: float, seed: int, *, divide_by_count: bool = True) -> None:
        if not (math.isfinite(stddev) and stddev >= 0):
            raise ConfigError(f"GaussianNoise.stddev must be a non-negative finite number, got {stddev}")
        self.stddev = float(stddev)
        self.seed = int(seed)
        self.divide_by_count = divide_by_count
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def __repr__(self) -> str:
        return f"GaussianNoise(stddev={self.stddev}, seed={self.seed}, divide_by_count={self.divide_by_count})"

    def apply(self, delta: torch.Tensor, num_updates: int) -> torch.Tensor:
        if num_updates < 1:
            raise ValidationError("noise needs at least one update", code="no_updates")
        std = self.stddev / num_updates if self.divide_by_count else self.stddev
        noise = torch.randn(delta.shape, generator=self._generator, dtype=torch.float32)
        return delta.add(noise.to(delta.device), alpha=std)

    def state_dict(self) -> dict[str, object]:
        """The generator state, so a restored server continues the same noise sequence."""
        return {"seed": self.seed, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor):
            raise ValidationError("GaussianNoise state: generator must be a tensor")
        self._generator.set_state(generator)
