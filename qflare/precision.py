"""Numeric precision of local training and evaluation: ``fp32``, ``bf16`` or ``auto``.

``bf16`` runs the model's forward pass (and the loss) under :func:`torch.autocast` with bfloat16; the
backward pass follows autocast's casts.  Everything that leaves the computation stays float32: the
master weights the optimiser steps, the update (``local - global``, computed from those float32
weights), aggregation, the wire format and every signature.  Evaluation under autocast returns a float32
loss and accuracy.  docs/performance.md ("Mixed precision") says what is rounded where.

``auto`` picks bf16 only where the hardware runs it natively: a CUDA device for which
``torch.cuda.is_bf16_supported(including_emulation=False)`` is true, or a CPU with AVX512-BF16 or AMX (x86) or the BF16
extension (Arm).  Anywhere else it picks fp32.  ``bf16`` asked for on a CPU without native support still
runs (autocast emulates it with float32 arithmetic and conversions), with :attr:`Precision.warning` set:
it is usually slower there than fp32.

Like the torch device, precision is this process's own choice: nothing another party sees depends on it.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = [
    "PRECISIONS",
    "Precision",
    "check_precision",
    "cpu_native_bf16",
    "native_bf16",
    "resolve_precision",
]

PRECISIONS = ("fp32", "bf16", "auto")
"""The precisions a run may ask for (``auto``: bf16 where native, else fp32)."""

_CPUINFO = Path("/proc/cpuinfo")
_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_BF16_FLAGS = frozenset({"bf16"})


def check_precision(name: object) -> str:
    """``name`` when it is one of :data:`PRECISIONS`, else a ConfigError listing them."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    return name


def _cpu_flags() -> frozenset[str]:
    """The first processor's feature flags from ``/proc/cpuinfo`` (empty where it is not readable)."""
    try:
        text = _CPUINFO.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: torch's own CPU capability query (AVX512-BF16, AMX
    tiles) where this torch has it, else the kernel's CPU flags (``avx512_bf16``/``amx_bf16`` on x86,
    ``bf16`` on Arm)."""
    query = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn: Callable[[], bool] | None = getattr(query, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    flags = _cpu_flags()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    return bool(flags & (_ARM_BF16_FLAGS if arm else _X86_BF16_FLAGS))


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)``,
    i.e. compute capability 8.0 or newer)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


@dataclass(frozen=True)
class Precision:
    """A precision resolved for one torch device: what was asked, what runs, and why."""

    requested: str
    """``fp32``, ``bf16`` or ``auto``, as asked."""
    name: str
    """What runs: ``fp32`` or ``bf16``."""
    device_type: str
    """``cpu`` or ``cuda``: the autocast device type."""
    native: bool
    """Whether the device computes bfloat16 natively (asked for ``bf16`` or ``auto`` only; False for ``fp32``)."""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bfloat16 under ``bf16``, None under ``fp32`` (no autocast)."""
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self) -> AbstractContextManager[object]:
        """The context to run a forward pass (and its loss) in: bf16 autocast, or nothing for fp32."""
        if self.name != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    @property
    def warning(self) -> str | None:
        """One line when bf16 was forced on a device that only emulates it (it is likely slower than fp32)."""
        if self.name == "bf16" and not self.native:
            return (
                f"precision bf16 on this {self.device_type} is emulated (no native bfloat16: "
                f"{'no AVX512-BF16/AMX/Arm BF16' if self.device_type == 'cpu' else 'device reports none'}); "
                "it is likely slower than fp32 here"
            )
        return None

    def describe(self) -> str:
        """``bf16 (auto: native bf16 on cpu)``, ``fp32 (auto: no native bf16 on cpu)``, ``bf16`` ..."""
        if self.requested == "auto":
            why = "native" if self.native else "no native"
            return f"{self.name} (auto: {why} bf16 on {self.device_type})"
        if self.name == "bf16" and not self.native:
            return f"bf16 (emulated on {self.device_type})"
        return self.name


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> Precision:
    """The precision ``requested`` (one of :data:`PRECISIONS`) resolves to on ``device``.

    ConfigError for an unknown name, or for bf16 on a device type autocast has no bf16 for."""
    check_precision(requested)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        if requested == "bf16":
            raise ConfigError(f"precision bf16 is supported on cpu and cuda devices, not {dev.type}")
        return Precision(requested, "fp32", dev.type, False)
    if requested == "fp32":
        return Precision(requested, "fp32", dev.type, False)
    native = native_bf16(dev)
    if requested == "auto":
        return Precision(requested, "bf16" if native else "fp32", dev.type, native)
    if dev.type == "cuda" and not native:
        raise ConfigError(f"precision bf16 asked for, but CUDA device {dev} does not support bfloat16")
    return Precision(requested, "bf16", dev.type, native)
