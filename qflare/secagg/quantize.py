"""Fixed-point quantisation with clipping into Z_{2^32}, and weighted averaging of the sum.

A device with update ``x`` (floats) and integer weight ``w`` in ``1..max_weight`` sends the vector::

    e_j = rint(w * s * clip(x_j, -c, c))   (j < d, as two's complement in Z_{2^32})
    e_d = w                                 (the weight itself, so the coordinator learns only sum(w))

with clip range ``c`` and scale ``s = ((2^31 - 1) / max_devices - 1) / (max_weight * c)``.  Each
``|e_j| <= max_weight * c * s + 1/2``, so a sum over at most ``max_devices`` devices stays within
``|S_j| <= 2^31 - 1``: the sum modulo 2^32 read as a signed int32 *is* the integer sum (no overflow; that
is the headroom, and ``max_devices`` is the supported maximum).  The coordinator divides::

    mean_j = S_j / (s * sum(w))

Error bound: rounding moves each ``e_j`` by at most 1/2, so ``|mean_j - weighted mean of the clipped
x_j| <= n / (2 s sum(w)) <= 1 / (2 s)`` (``sum(w) >= n``).  With the defaults (``c = 1``,
``max_devices = 1000``, ``max_weight = 16``) ``s = 134217.6`` and the bound is ``3.73e-6``.  Clipping is
the other (deliberate) error: coordinates outside ``[-c, c]`` are cut to it.

The weight bound keeps one device from dominating: its share of the mean is at most
``max_weight / (max_weight + n - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qflare.errors import ConfigError, ErrorCode, ValidationError
from qflare.secagg.prg import Vector

__all__ = ["QuantSpec", "dequantize", "quantize"]

_INT31 = 2**31 - 1


@dataclass(frozen=True)
class QuantSpec:
    """Clip range ``clip`` (per coordinate), the largest number of devices summed, the largest weight."""

    clip: float = 1.0
    max_devices: int = 1000
    max_weight: int = 16

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError("clip must be a positive finite number", code=ErrorCode.BAD_ARGUMENT)
        if not 2 <= self.max_devices <= 1_000_000 or not 1 <= self.max_weight <= 1_000_000:
            raise ConfigError("max_devices in 2..1e6 and max_weight in 1..1e6", code=ErrorCode.BAD_ARGUMENT)
        if self.max_devices * self.max_weight > _INT31 or self.scale < 1.0:
            raise ConfigError(
                f"no headroom: {self.max_devices} devices x weight {self.max_weight} x clip {self.clip} "
                "does not fit 31 bits with a scale >= 1",
                code=ErrorCode.BAD_ARGUMENT,
            )

    @property
    def scale(self) -> float:
        return (_INT31 / self.max_devices - 1.0) / (self.max_weight * self.clip)

    @property
    def error_bound(self) -> float:
        """Largest difference between the dequantised mean and the weighted mean of clipped inputs."""
        return 1.0 / (2.0 * self.scale)


def quantize(values: npt.NDArray[np.floating], weight: int, spec: QuantSpec) -> Vector:
    """The ``len(values) + 1`` words a device masks (its weighted fixed-point update, then its weight)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= spec.max_weight:
        raise ValidationError(f"weight must be an integer in 1..{spec.max_weight}", code=ErrorCode.BAD_WEIGHT)
    try:
        x = np.array(values, dtype=np.float64).reshape(-1)  # a copy: worked on in place below
    except (TypeError, ValueError, OverflowError):
        raise ValidationError("update is not an array of numbers", code=ErrorCode.BAD_SHAPE) from None
    if not np.isfinite(x).all():
        raise ValidationError("update has NaN or Inf", code=ErrorCode.NON_FINITE)
    np.clip(x, -spec.clip, spec.clip, out=x)
    x *= weight * spec.scale
    np.rint(x, out=x)
    out = np.empty(x.shape[0] + 1, dtype=np.uint32)
    out[:-1] = x.astype(np.int64).astype(np.uint32)  # two's complement wrap of the (bounded) signed value
    out[-1] = weight
    return out


def dequantize(total: Vector, devices: int, spec: QuantSpec) -> tuple[npt.NDArray[np.float64], int]:
    """``(weighted mean, sum of weights)`` from the unmasked sum of ``devices`` quantised vectors."""
    if not 1 <= devices <= spec.max_devices:
        raise ConfigError(f"{devices} devices outside 1..{spec.max_devices}", code=ErrorCode.BAD_ARGUMENT)
    if total.dtype != np.uint32 or total.ndim != 1 or total.shape[0] < 1:
        raise ValidationError("sum must be a 1-d uint32 vector", code=ErrorCode.BAD_SHAPE)
    weight_sum = int(total[-1])
    if not devices <= weight_sum <= devices * spec.max_weight:
        raise ValidationError(
            f"sum of weights {weight_sum} impossible for {devices} devices", code=ErrorCode.AGGREGATE_OUT_OF_BOUNDS
        )
    mean = total[:-1].view(np.int32).astype(np.float64)
    mean /= spec.scale * weight_sum  # in place: the same quotients, one 8-byte-per-word array fewer
    return mean, weight_sum
