"""Tensors <-> bytes: parameter layouts, architecture fingerprints and safetensors blobs.

A model travels as one flat float32 vector whose meaning is fixed by a :class:`ParamLayout` (the
ordered list of parameter names, shapes and dtypes).  The SHA-256 of a canonical encoding of that list
is the *architecture fingerprint*; every blob carries it, so a blob built for one architecture is
refused by another before any tensor data is touched.

Blob format (`safetensors <https://github.com/huggingface/safetensors>`_), with header metadata
``qflare_format="1"``, ``qflare_kind`` (``"model"`` or ``"update"``), ``arch`` (the fingerprint) and
any caller metadata (str -> str):

* ``model`` blobs hold one tensor per parameter under its own name, so other tools can open them;
* ``update`` blobs hold one 1-D tensor ``"delta"`` (the fast path for per-round deltas).

Encoding uses :func:`safetensors.torch.save`.  Decoding parses the safetensors header itself (8-byte
little-endian length, JSON), validates every entry against the layout *before* touching tensor data,
then copies each tensor once into a fresh, writable flat tensor: ``safetensors.torch.load`` drops the
``__metadata__`` (kind, fingerprint) and returns tensors aliasing a private immutable ``bytes`` copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import safetensors.torch
import torch

from qflare.errors import ArchitectureMismatchError, ValidationError

__all__ = [
    "FORMAT_VERSION",
    "KIND_MODEL",
    "KIND_UPDATE",
    "UPDATE_TENSOR",
    "Blob",
    "ParamLayout",
    "blob_metadata",
    "decode_blob",
    "encode_model",
    "encode_update",
    "sha256_hex",
]

FORMAT_VERSION = "1"
KIND_MODEL = "model"
KIND_UPDATE = "update"
UPDATE_TENSOR = "delta"
_KINDS = (KIND_MODEL, KIND_UPDATE)
_RESERVED_KEYS = frozenset({"qflare_format", "qflare_kind", "arch"})
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself applies
_MAX_LISTED_DIFFS = 5


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if len(shape) != 1 else f"({shape[0]},)"


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _join_diffs(diffs: list[str]) -> str:
    shown = diffs[:_MAX_LISTED_DIFFS]
    more = len(diffs) - len(shown)
    return "; ".join(shown) + (f"; and {more} more difference(s)" if more else "")


@dataclass(frozen=True)
class ParamLayout:
    """Ordered names, shapes and dtypes of a model's float32 state: the meaning of a flat vector.

    Only float32 entries are allowed.  Integer and boolean buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are bookkeeping, not learned state: :meth:`from_module` and
    :meth:`from_state` skip them, :meth:`flatten` ignores them and :meth:`load_into` leaves them as they
    are.  Any other floating dtype (float64, float16, bfloat16) or a complex entry is refused.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    numel: int = field(init=False)
    offsets: tuple[int, ...] = field(init=False)
    sizes: tuple[int, ...] = field(init=False, repr=False)
    fingerprint: str = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, dtypes = tuple(self.names), tuple(self.dtypes)
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        if not (len(names) == len(shapes) == len(dtypes)):
            raise ValidationError("ParamLayout: names, shapes and dtypes must have the same length")
        if len(set(names)) != len(names):
            raise ValidationError("ParamLayout: parameter names must be unique")
        for name, shape, dtype in zip(names, shapes, dtypes, strict=False):
            if dtype != torch.float32:
                raise ValidationError(f"parameter {name}: dtype {_dtype_str(dtype)} is not supported, only float32")
            if any(d < 0 for d in shape):
                raise ValidationError(f"parameter {name}: negative dimension in shape {_shape_str(shape)}")
        sizes = tuple(math.prod(s) for s in shapes)
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += size
        canonical = json.dumps(
            [[n, list(s), _dtype_str(d)] for n, s, d in zip(names, shapes, dtypes, strict=False)],
            separators=(",", ":"),
            ensure_ascii=True,
        )
        for key, value in (
            ("names", names),
            ("shapes", shapes),
            ("dtypes", dtypes),
            ("numel", total),
            ("offsets", tuple(offsets)),
            ("sizes", sizes),
            ("fingerprint", sha256_hex(("qflare-arch-v1:" + canonical).encode("ascii"))),
            ("_index", {n: i for i, n in enumerate(names)}),
        ):
            object.__setattr__(self, key, value)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> ParamLayout:
        """Layout of a state dict, in its order; integer/bool entries skipped, other non-float32 refused."""
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValidationError(f"parameter {name}: expected a tensor, got {type(tensor).__name__}")
            if _is_bookkeeping(tensor):
                continue
            if tensor.dtype != torch.float32:
                raise ValidationError(
                    f"parameter {name}: dtype {_dtype_str(tensor.dtype)} is not supported, only float32"
                )
            names.append(name)
            shapes.append(tuple(tensor.shape))
        return cls(tuple(names), tuple(shapes), (torch.float32,) * len(names))

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamLayout:
        """Layout of ``module.state_dict()``: float32 parameters and buffers, in state_dict order."""
        return cls.from_state(module.state_dict())

    # ------------------------------------------------------------------ checks
    def _state_diffs(self, state: Mapping[str, object]) -> list[str]:
        diffs: list[str] = []
        for name, shape in zip(self.names, self.shapes, strict=False):
            tensor = state.get(name)
            if tensor is None:
                diffs.append(f"parameter {name}: missing")
                continue
            if not isinstance(tensor, torch.Tensor):
                diffs.append(f"parameter {name}: expected a tensor, got {type(tensor).__name__}")
                continue
            got = tuple(tensor.shape)
            if got != shape:
                diffs.append(f"parameter {name}: expected shape {_shape_str(shape)}, got {_shape_str(got)}")
            if tensor.dtype != torch.float32:
                diffs.append(f"parameter {name}: expected dtype float32, got {_dtype_str(tensor.dtype)}")
        for name, tensor in state.items():
            if name not in self._index and not (isinstance(tensor, torch.Tensor) and _is_bookkeeping(tensor)):
                diffs.append(f"unexpected parameter {name}")
        return diffs

    def check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`ArchitectureMismatchError` naming every difference between ``state`` and this layout."""
        diffs = self._state_diffs(state)
        if diffs:
            raise ArchitectureMismatchError(_join_diffs(diffs))

    def check_flat(self, flat: torch.Tensor) -> None:
        """Raise :class:`ArchitectureMismatchError` unless ``flat`` is a 1-D float32 tensor of ``numel``."""
        if not isinstance(flat, torch.Tensor):
            raise ArchitectureMismatchError(f"flat vector: expected a tensor, got {type(flat).__name__}")
        if flat.dtype != torch.float32:
            raise ArchitectureMismatchError(f"flat vector: expected dtype float32, got {_dtype_str(flat.dtype)}")
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ArchitectureMismatchError(
                f"flat vector: expected shape ({self.numel},), got {_shape_str(tuple(flat.shape))}"
            )

    # ------------------------------------------------------------------ conversions
    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One contiguous float32 1-D tensor holding ``state`` in layout order (a single ``torch.cat``)."""
        self.check_state(state)
        if not self.names:
            return torch.empty(0, dtype=torch.float32)
        with torch.no_grad():
            return torch.cat([state[name].detach().reshape(-1) for name in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into ``flat``, one per parameter, shaped as the layout says (no copy)."""
        self.check_flat(flat)
        if not self.names:
            return {}
        pieces = torch.split(flat, list(self.sizes))
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes, strict=False)}

    def load_into(self, module: torch.nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat`` into ``module``'s float32 parameters and buffers in place (integer buffers untouched)."""
        self.check_flat(flat)
        state = module.state_dict()
        self.check_state(state)
        with torch.no_grad():
            for name, view in self.unflatten(flat).items():
                state[name].copy_(view)

    def module_to_flat(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's current float32 state as one flat vector in layout order."""
        return self.flatten(module.state_dict())


def _is_bookkeeping(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex()


# ---------------------------------------------------------------------- blobs
@dataclass(frozen=True)
class Blob:
    """A decoded, verified blob.  ``flat`` is freshly allocated and owned; ``metadata`` is the caller's."""

    flat: torch.Tensor
    kind: str
    metadata: dict[str, str]
    sha256: str
    nbytes: int


def _full_metadata(layout: ParamLayout, kind: str, metadata: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationError(f"blob metadata must map str to str, got {key!r}: {type(value).__name__}")
        if key in _RESERVED_KEYS:
            raise ValidationError(f"blob metadata key {key!r} is reserved")
        out[key] = value
    out.update(qflare_format=FORMAT_VERSION, qflare_kind=kind, arch=layout.fingerprint)
    return out


def _cpu_contiguous(flat: torch.Tensor) -> torch.Tensor:
    return flat.detach().to("cpu").contiguous()


def _canonical(blob: bytes) -> bytes:
    """The same blob with its ``__metadata__`` keys sorted.

    safetensors writes the metadata map in an order that changes from process to process (a Rust
    ``HashMap``), so equal parameters would get a different SHA-256 in every process.  Sorting the keys
    (same length: the header is re-padded with spaces, as safetensors pads it) makes the bytes, and so the
    content hash, a function of the content alone.  One copy of the blob.
    """
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8 : 8 + n])
    if not header.get("__metadata__"):
        return blob
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        raise ValidationError(f"canonical safetensors header is {len(text)} bytes, longer than the {n} written")
    return b"".join((blob[:8], text.ljust(n, b" "), memoryview(blob)[8 + n :]))


def encode_model(layout: ParamLayout, flat: torch.Tensor, metadata: Mapping[str, str] | None = None) -> bytes:
    """Safetensors bytes with one tensor per parameter (readable by any safetensors tool)."""
    layout.check_flat(flat)
    md = _full_metadata(layout, KIND_MODEL, metadata or {})
    return _canonical(safetensors.torch.save(layout.unflatten(_cpu_contiguous(flat)), metadata=md))


def encode_update(layout: ParamLayout, flat: torch.Tensor, metadata: Mapping[str, str] | None = None) -> bytes:
    """Safetensors bytes with the single 1-D tensor ``"delta"`` (fast path for updates)."""
    layout.check_flat(flat)
    md = _full_metadata(layout, KIND_UPDATE, metadata or {})
    return _canonical(safetensors.torch.save({UPDATE_TENSOR: _cpu_contiguous(flat)}, metadata=md))


def _malformed(reason: str) -> ValidationError:
    return ValidationError(f"malformed blob: {reason}", code="malformed_blob")


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _parse_header(view: memoryview) -> tuple[dict[str, str], dict[str, _Entry], int]:
    """Parse and structurally validate a safetensors header; return (metadata, entries, data start)."""
    total = len(view)
    if total < 8:
        raise _malformed(f"{total} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > _MAX_HEADER_BYTES or header_len > total - 8:
        raise _malformed(f"header length {header_len} does not fit in {total} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise _malformed(f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _malformed("header is not a JSON object")
    raw_md = header.pop("__metadata__", None)
    if not isinstance(raw_md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw_md.items()):
        raise _malformed("missing or invalid __metadata__ (must map str to str)")
    data_start = 8 + header_len
    data_len = total - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _malformed(f"tensor {name!r}: entry needs dtype, shape and two data_offsets") from None
        ints = [*shape, start, end] if isinstance(shape, list) else None
        if not isinstance(dtype, str) or ints is None or not all(type(v) is int and v >= 0 for v in ints):
            raise _malformed(f"tensor {name!r}: invalid dtype, shape or data_offsets")
        if not start <= end <= data_len:
            raise _malformed(f"tensor {name!r}: data_offsets [{start}, {end}] outside {data_len} data bytes")
        entries[name] = _Entry(dtype, tuple(shape), start, end)
    covered = 0
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != covered:
            raise _malformed("tensor data regions overlap or leave gaps")
        covered = entry.end
    if covered != data_len:
        raise _malformed(f"tensor data covers {covered} of {data_len} bytes")
    return dict(raw_md), entries, data_start


def blob_metadata(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The whole ``__metadata__`` map of a blob (``qflare_kind``, ``arch`` and the caller's keys), after
    the same structural checks as :func:`decode_blob` (``malformed_blob``) and before any tensor is read."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise _malformed(f"not a contiguous bytes-like object ({exc})") from None
    return _parse_header(view)[0]


def _check_entry(name: str, entry: _Entry, shape: tuple[int, ...]) -> list[str]:
    diffs = []
    if entry.dtype != "F32":
        diffs.append(f"parameter {name}: expected dtype F32, got {entry.dtype}")
    if entry.shape != shape:
        diffs.append(f"parameter {name}: expected shape {_shape_str(shape)}, got {_shape_str(entry.shape)}")
    if not diffs and entry.end - entry.start != 4 * math.prod(shape):
        diffs.append(f"parameter {name}: {entry.end - entry.start} data bytes for shape {_shape_str(shape)}")
    return diffs


def decode_blob(
    data: bytes | bytearray | memoryview,
    layout: ParamLayout,
    *,
    kind: str | None = None,
    expected_sha256: str | None = None,
    verified_sha256: str | None = None,
) -> Blob:
    """Verify and decode a blob made by :func:`encode_model` or :func:`encode_update`.

    ``verified_sha256`` is the blob's SHA-256 as the caller has already checked it (the protocol checks
    it against a signed envelope): it becomes ``Blob.sha256`` and the blob is not hashed a second time.

    Checks, in order: the SHA-256 (if ``expected_sha256`` is given; code ``hash_mismatch``), the
    safetensors structure (code ``malformed_blob``), the format version, the kind (code
    ``wrong_kind``), the tensors' names/shapes/dtypes against ``layout`` and the architecture
    fingerprint (:class:`ArchitectureMismatchError`).  Every failure is a :class:`ValidationError`.
    """
    if kind is not None and kind not in _KINDS:
        raise ValidationError(f"unknown blob kind {kind!r}; expected one of {_KINDS}")
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise _malformed(f"not a contiguous bytes-like object ({exc})") from None
    digest = verified_sha256 if verified_sha256 is not None else sha256_hex(view)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ValidationError(f"blob SHA-256 {digest} does not match expected {expected_sha256}", code="hash_mismatch")
    raw_md, entries, data_start = _parse_header(view)
    if raw_md.get("qflare_format") != FORMAT_VERSION:
        raise ValidationError(
            f"unsupported blob format {raw_md.get('qflare_format')!r}; expected {FORMAT_VERSION!r}",
            code="unsupported_format",
        )
    blob_kind = raw_md.get("qflare_kind")
    if blob_kind not in _KINDS:
        raise _malformed(f"qflare_kind {blob_kind!r} is not one of {_KINDS}")
    if kind is not None and blob_kind != kind:
        raise ValidationError(f"expected a {kind} blob, got a {blob_kind} blob", code="wrong_kind")
    blob_arch = raw_md.get("arch", "")
    arch_diff = (
        f"blob architecture fingerprint {blob_arch} does not match expected {layout.fingerprint}"
        if blob_arch != layout.fingerprint
        else ""
    )
    if blob_kind == KIND_MODEL:
        wanted = dict(zip(layout.names, layout.shapes, strict=False))
        diffs = [f"parameter {n}: missing" for n in layout.names if n not in entries]
        diffs += [f"unexpected parameter {n}" for n in entries if n not in wanted]
        for name, shape in wanted.items():
            if name in entries:
                diffs += _check_entry(name, entries[name], shape)
        if diffs:
            raise ArchitectureMismatchError(_join_diffs(diffs + ([arch_diff] if arch_diff else [])))
        if arch_diff:
            raise ArchitectureMismatchError(arch_diff)
        placements = [
            (entries[n], off, size) for n, off, size in zip(layout.names, layout.offsets, layout.sizes, strict=False)
        ]
    else:
        if arch_diff:
            raise ArchitectureMismatchError(arch_diff)
        diffs = [f"unexpected tensor {n}" for n in entries if n != UPDATE_TENSOR]
        entry = entries.get(UPDATE_TENSOR)
        if entry is None:
            diffs.append(f"tensor {UPDATE_TENSOR}: missing")
        else:
            diffs += _check_entry(UPDATE_TENSOR, entry, (layout.numel,))
        if diffs:
            raise ArchitectureMismatchError(_join_diffs(diffs))
        assert entry is not None
        placements = [(entry, 0, layout.numel)]
    flat = torch.empty(layout.numel, dtype=torch.float32)
    out = flat.numpy()
    for entry, offset, size in placements:
        # '<f4' handles unaligned offsets and big-endian hosts; each byte is copied exactly once.
        out[offset : offset + size] = np.frombuffer(view, dtype="<f4", count=size, offset=data_start + entry.start)
    metadata = {k: v for k, v in raw_md.items() if k not in _RESERVED_KEYS}
    return Blob(flat=flat, kind=blob_kind, metadata=metadata, sha256=digest, nbytes=len(view))
