"""The trained model as one file: safetensors tensors plus what it takes to rebuild the module.

A model file is a QFLARE ``model`` blob (:func:`qflare.wire.encode_model`: one tensor per parameter,
readable by any safetensors tool) whose header metadata also names the registered model and its input
shape and class count, so :func:`load_model` can build the ``torch.nn.Module`` and fill it::

    import qflare
    net = qflare.load_model("results/model.safetensors")   # an nn.Module in eval mode

Metadata keys: ``qflare_kind="model"`` and ``arch`` (the architecture fingerprint) from the wire
format; ``model``, ``input_shape`` (``"C,H,W"``), ``num_classes``; and provenance written by the
producer (``source``, ``round``, ``version``, ``model_sha256`` of the coordinator's signed blob, ...).
The fingerprint is checked against the rebuilt module before any weight is loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, ValidationError
from .files import write_atomic
from .models import create_model, model_names
from .wire import ParamLayout, blob_metadata, decode_blob, encode_model

__all__ = [
    "MODEL_FILE_NAME",
    "ModelFileInfo",
    "coordinator_blob_sha256",
    "load_model",
    "read_model_info",
    "write_model_file",
]

MODEL_FILE_NAME = "model.safetensors"
_MAX_FILE_BYTES = 4 << 30
_ARCH_KEYS = ("model", "input_shape", "num_classes")


@dataclass(frozen=True)
class ModelFileInfo:
    """What a model file says about itself (nothing here is trusted until :func:`load_model` checks it)."""

    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    fingerprint: str
    provenance: dict[str, str] = field(default_factory=dict)


def _bad(path: Path, reason: str) -> ValidationError:
    return ValidationError(f"model file {path}: {reason}", code="bad_model_file")


def write_model_file(
    path: Path,
    layout: ParamLayout,
    flat: torch.Tensor,
    *,
    model: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """Write ``flat`` (in ``layout``) as a model file at ``path``, atomically."""
    if not isinstance(model, str) or not model:
        raise ConfigError("a model file needs a registered model name (a model factory has none)")
    shape = tuple(int(d) for d in input_shape)
    md = {str(k): str(v) for k, v in (provenance or {}).items() if k not in _ARCH_KEYS}
    md.update(model=model, input_shape=",".join(str(d) for d in shape), num_classes=str(int(num_classes)))
    return write_atomic(Path(path), encode_model(layout, flat, md))


def _read(path: Path) -> bytes:
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise _bad(path, f"{size} bytes is more than the {_MAX_FILE_BYTES} a model file may have")
        return path.read_bytes()
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None


def _int(text: str | None, lo: int, hi: int) -> int | None:
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    value = int(text)
    return value if lo <= value <= hi else None


def _info(path: Path, data: bytes) -> ModelFileInfo:
    try:
        md = blob_metadata(data)
    except ValidationError as exc:
        raise _bad(path, str(exc)) from None
    if md.get("qflare_kind") != "model":
        raise _bad(path, f"holds a {md.get('qflare_kind')!r} blob, not a model")
    dims = [_int(d, 1, 100_000) for d in md.get("input_shape", "").split(",")]
    classes = _int(md.get("num_classes"), 1, 1_000_000)
    name = md.get("model", "")
    if not name or len(dims) != 3 or None in dims or classes is None:
        raise _bad(path, "its metadata lacks a valid model name, input_shape (C,H,W) or num_classes")
    c, h, w = (int(d or 0) for d in dims)
    provenance = {k: v for k, v in md.items() if k not in (*_ARCH_KEYS, "qflare_kind", "qflare_format", "arch")}
    return ModelFileInfo(name, (c, h, w), classes, md.get("arch", ""), provenance)


def read_model_info(path: Path) -> ModelFileInfo:
    """The model name, input shape, class count, fingerprint and provenance in a model file's header."""
    return _info(Path(path), _read(Path(path)))


def load_model(path: str | Path) -> torch.nn.Module:
    """Rebuild the registered model a model file names, check its architecture fingerprint, load the
    weights and return the module in eval mode (on the CPU).

    Raises :class:`~qflare.errors.ValidationError`: ``bad_model_file`` (unreadable, malformed, or a
    model name that is not registered here), ``architecture_mismatch`` (the registered model's
    architecture differs from the file's)."""
    p = Path(path)
    data = _read(p)
    info = _info(p, data)
    if info.model.lower() not in model_names():
        raise _bad(p, f"names model {info.model!r}, which is not registered here (known: {', '.join(model_names())})")
    module = create_model(info.model, info.input_shape, info.num_classes)
    layout = ParamLayout.from_module(module)
    blob = decode_blob(data, layout, kind="model")
    layout.load_into(module, blob.flat)
    return module.eval()


def coordinator_blob_sha256(path: str | Path, version: int) -> str:
    """The SHA-256 of the blob a coordinator signs for these weights as model ``version``.

    A model file carries extra metadata (model name, shape, provenance), so its own bytes hash differently
    from the coordinator's GLOBAL_MODEL blob (whose metadata is the version alone).  This rebuilds that
    blob from the file's weights - through :func:`load_model`, so the architecture is checked first - and
    hashes it: what ``qflare ledger verify --model`` compares with the ledger's model hashes."""
    p = Path(path)
    data = _read(p)
    info = _info(p, data)
    if info.model.lower() not in model_names():
        raise _bad(p, f"names model {info.model!r}, which is not registered here (known: {', '.join(model_names())})")
    layout = ParamLayout.from_module(create_model(info.model, info.input_shape, info.num_classes))
    flat = decode_blob(data, layout, kind="model").flat
    return hashlib.sha256(encode_model(layout, flat, {"version": str(int(version))})).hexdigest()
