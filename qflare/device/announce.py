"""What a coordinator announces about its model in ``GET /v1/identity``, and the device's check of it.

The identity document names the model the coordinator aggregates (``model``), its architecture
fingerprint (``arch``, :attr:`qflare.wire.ParamLayout.fingerprint`) and the shape of one example
(``input_shape``, ``num_classes``, with the input normalisation ``mean``/``std``).  A device compares
them with its own model *before* it enrolls, so a device given another model refuses at once - no
token spent, nothing stored - instead of failing round after round with layer names.

The document is plain JSON (unsigned): the check is a configuration guard, not a security control.
Whatever it says, every model blob the device later accepts is signed by the pinned key and carries
the fingerprint it is checked against (``docs/protocol.md`` section 9.1).  The document comes from the
network, so :func:`parse_announcement` bounds every value before it is used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, ErrorCode, MalformedError
from ..wire import ParamLayout

__all__ = ["ModelAnnouncement", "check_model", "parse_announcement"]

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,63}\Z")
MAX_CLASSES = 1_000_000
MAX_INPUT_DIM = 65_536


@dataclass(frozen=True)
class ModelAnnouncement:
    """The model a coordinator runs, as its identity document states it."""

    model: str
    arch: str
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _bad(what: str) -> MalformedError:
    return MalformedError(f"coordinator identity: {what}", code=ErrorCode.MALFORMED)


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"{what} is not an integer in {lo}..{hi}")
    return value


def _floats(value: object, n: int, what: str, *, positive: bool) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n:
        raise _bad(f"{what} is not a list of {n} numbers")
    out = []
    for v in value:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or abs(v) > 1e6:
            raise _bad(f"{what} holds a value that is not a finite number")
        if positive and not v > 0:
            raise _bad(f"{what} holds a value that is not positive")
        out.append(float(v))
    return tuple(out)


def parse_announcement(identity: Mapping[str, Any]) -> ModelAnnouncement | None:
    """The model fields of an identity document; None when it announces no model (an older server).

    A document that has them but with values out of bounds raises :class:`MalformedError`."""
    model, arch = identity.get("model"), identity.get("arch")
    if model is None and arch is None:
        return None
    if not isinstance(model, str) or not _NAME.match(model.lower()):
        raise _bad("'model' is not a model name")
    if not isinstance(arch, str) or not _HEX64.match(arch):
        raise _bad("'arch' is not a 64-hex architecture fingerprint")
    shape = identity.get("input_shape")
    if shape is None:
        return ModelAnnouncement(model.lower(), arch)
    if not isinstance(shape, list) or len(shape) != 3:
        raise _bad("'input_shape' is not [channels, height, width]")
    c, h, w = (_int(v, 1, MAX_INPUT_DIM, "'input_shape'") for v in shape)
    classes = _int(identity.get("num_classes"), 1, MAX_CLASSES, "'num_classes'")
    mean = _floats(identity.get("mean"), c, "'mean'", positive=False)
    std = _floats(identity.get("std"), c, "'std'", positive=True)
    return ModelAnnouncement(model.lower(), arch, (c, h, w), classes, mean, std)


def check_model(announced: ModelAnnouncement | None, model: str, layout: ParamLayout | None = None) -> None:
    """Refuse (ConfigError ``model_mismatch`` / ``arch_mismatch``) a device model that is not the
    coordinator's.  ``layout`` None checks the name only (before the device built its model)."""
    if announced is None:
        return
    if announced.model != model.lower():
        raise ConfigError(
            f"server runs model {announced.model!r}, this device was given {model.lower()!r}",
            code=ErrorCode.MODEL_MISMATCH,
        )
    if layout is not None and layout.fingerprint != announced.arch:
        shape = ""
        if announced.input_shape is not None:
            shape = f" for inputs {announced.input_shape} and {announced.num_classes} classes"
        raise ConfigError(
            f"server runs model {announced.model!r} with architecture {announced.arch[:16]}...{shape}; this "
            f"device built {model.lower()!r} with architecture {layout.fingerprint[:16]}... (another data set's "
            "input shape or class count, or another version of the model)",
            code=ErrorCode.ARCH_MISMATCH,
        )
