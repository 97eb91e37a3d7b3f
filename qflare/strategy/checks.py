"""Per-update admission checks.  Each raises :class:`~qflare.errors.ValidationError` with its own code.

Bounding the norm of accepted updates is the usual first line of defence against model-replacement
attacks (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning"; Sun et al. 2019, "Can You
Really Backdoor Federated Learning?").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from qflare.errors import ConfigError, ValidationError
from qflare.strategy.base import ClientUpdate

__all__ = ["DEFAULT_MAX_ABS", "ExampleCountCheck", "FiniteCheck", "MaxAbsBound", "NormBound", "ShapeCheck", "max_abs"]

DEFAULT_MAX_ABS = 1e4
"""The default bound on any one coordinate of an update (see :class:`MaxAbsBound`)."""


def max_abs(t: torch.Tensor) -> float:
    """The largest magnitude in ``t`` (NaN if any is NaN) without a tensor-sized temporary: on a server
    thread pool every temporary of a 6.65 MB update stays in its thread's malloc arena."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return float(torch.maximum(-lo, hi))


@dataclass(frozen=True)
class ShapeCheck:
    """The delta is a 1-D float32 tensor of length ``dim`` (code ``bad_shape``)."""

    inspects_values: ClassVar[bool] = False

    def check(self, update: ClientUpdate, dim: int) -> None:
        delta = update.delta
        if not isinstance(delta, torch.Tensor):
            raise ValidationError(
                f"update from {update.device_id}: delta is a {type(delta).__name__}, not a tensor", code="bad_shape"
            )
        if delta.dtype != torch.float32 or delta.dim() != 1 or delta.numel() != dim:
            raise ValidationError(
                f"update from {update.device_id}: expected a float32 vector of shape ({dim},), "
                f"got {str(delta.dtype).removeprefix('torch.')} of shape {tuple(delta.shape)}",
                code="bad_shape",
            )


@dataclass(frozen=True)
class FiniteCheck:
    """Every coordinate is finite: no NaN, no ±Inf (code ``non_finite``)."""

    inspects_values: ClassVar[bool] = True

    def check(self, update: ClientUpdate, dim: int) -> None:
        # A sum is finite iff every term is (barring overflow, which a sum of squares would also hit);
        # fall back to the exact test only when the cheap one fails.
        if not math.isfinite(float(update.delta.sum())) and not bool(torch.isfinite(update.delta).all()):
            raise ValidationError(f"update from {update.device_id}: delta contains NaN or Inf", code="non_finite")


@dataclass(frozen=True)
class NormBound:
    """The delta's L2 norm is at most ``max_norm`` (code ``norm_exceeded``)."""

    max_norm: float
    inspects_values: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"NormBound.max_norm must be a positive finite number, got {self.max_norm}")

    def check(self, update: ClientUpdate, dim: int) -> None:
        norm = float(torch.linalg.vector_norm(update.delta))
        if not norm <= self.max_norm:  # also refuses NaN
            raise ValidationError(
                f"update from {update.device_id}: L2 norm {norm:.6g} exceeds the bound {self.max_norm:.6g}",
                code="norm_exceeded",
            )


@dataclass(frozen=True)
class MaxAbsBound:
    """Every coordinate of the delta is at most ``max_abs`` in magnitude: its L∞ norm (code ``norm_exceeded``).

    In the default pipeline with :data:`DEFAULT_MAX_ABS`.  The bound does not depend on the model's size,
    and it is what keeps one device from bricking the federation with a finite but huge update (every
    coordinate 3e38 passes :class:`FiniteCheck` and overflowed the float32 running sum): with every
    accepted |Δ_i| <= B, a weighted mean is at most B in every coordinate and the float64 running sum of
    :class:`~qflare.strategy.combine.WeightedMean` is at most B·Σw, which cannot overflow.

    How the default (1e4) was chosen: honest training moves a weight by lr × a few gradients per round;
    on Fashion-MNIST (``fedavg-cnn``, 1.66M weights, lr 0.05, 10 rounds of 10 devices) the largest
    coordinate of any update was 0.104, so the bound leaves five orders of magnitude.  Float32 buffers
    travel too: a BatchNorm ``running_var`` over raw 0..255 pixels can legitimately move by ~1.6e4 in
    its first round, so raise the bound for such a model.  It is a sanity bound, not a defence against
    subtle poisoning (use :class:`NormBound`, ``ClipNorm`` or a robust combine calibrated to the model).
    """

    max_abs: float = DEFAULT_MAX_ABS
    inspects_values: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_abs) and self.max_abs > 0):
            raise ConfigError(f"MaxAbsBound.max_abs must be a positive finite number, got {self.max_abs}")

    def check(self, update: ClientUpdate, dim: int) -> None:
        largest = max_abs(update.delta)
        if not largest <= self.max_abs:  # also refuses NaN
            raise ValidationError(
                f"update from {update.device_id}: largest coordinate {largest:.6g} exceeds the bound "
                f"{self.max_abs:.6g}",
                code="norm_exceeded",
            )


@dataclass(frozen=True)
class ExampleCountCheck:
    """``1 <= num_examples <= max_examples`` (code ``bad_example_count``).

    Example counts are self-reported; capping them limits how much weight one device can claim under
    :class:`~qflare.strategy.weighting.ByExamples`.
    """

    max_examples: int
    inspects_values: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.max_examples < 1:
            raise ConfigError(f"ExampleCountCheck.max_examples must be >= 1, got {self.max_examples}")

    def check(self, update: ClientUpdate, dim: int) -> None:
        n = update.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_examples:
            raise ValidationError(
                f"update from {update.device_id}: num_examples {n!r} outside [1, {self.max_examples}]",
                code="bad_example_count",
            )
