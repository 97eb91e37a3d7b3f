"""Canonical JSON: the one byte encoding of a ledger value (docs/provenance.md, "Canonical JSON").

A value is canonical JSON when it is built only from objects whose keys are 1..64 characters of
``[a-z0-9_]``, arrays, strings, integers, ``true``, ``false`` and ``null`` (no floats: a fractional
parameter travels as its shortest round-trip decimal *string*, see :func:`decimal`), and it is
encoded as (:func:`encode`, which refuses any other value)::

    json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

i.e. keys sorted by code point, no whitespace, every non-ASCII character of a string written as a
lowercase ``\\uXXXX`` escape (surrogate pairs beyond the BMP), the bytes then being ASCII (hence
UTF-8).  :func:`decode` accepts exactly the canonical encodings of JSON values: a duplicate key, a
float, a disallowed key, non-ASCII bytes, whitespace or any other difference from the canonical
re-encoding is a :class:`~qflare.errors.MalformedError`.  (Integer ranges are left to the reader of
the value: the entry checks bound every integer they use.)
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from qflare.errors import ConfigError, MalformedError

__all__ = ["decimal", "decode", "encode", "encode_checked", "is_hex32"]

_KEY = re.compile(r"[a-z0-9_]{1,64}\Z")
_HEX32 = re.compile(r"[0-9a-f]{64}\Z")


def is_hex32(value: object) -> bool:
    """Whether ``value`` is 32 bytes as lowercase hex (a SHA-256 digest or a key id)."""
    return isinstance(value, str) and _HEX32.match(value) is not None


def decimal(value: float) -> str:
    """A finite float as its shortest round-trip decimal string (``repr``), e.g. ``"0.5"``, ``"1e-06"``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{value!r} is not a finite number", code="bad_field")
    return repr(float(value))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def encode_checked(value: Any) -> bytes:
    """The canonical bytes of a value already known to be allowed (e.g. part of what :func:`decode`
    returned): the same bytes as :func:`encode`, without walking the value again."""
    return _dumps(value)


def encode(value: Any) -> bytes:
    """The canonical bytes of ``value``; ConfigError (``bad_field``) if it holds anything not allowed
    (checked by decoding the bytes again: a float, a tuple, a non-string or disallowed key makes the
    decoded value differ or the decoder refuse)."""
    try:
        raw = _dumps(value)
        same = decode(raw) == value
    except (TypeError, ValueError, MalformedError) as exc:
        raise ConfigError(f"not encodable as canonical JSON: {exc}", code="bad_field") from None
    if not same:
        raise ConfigError("not encodable as canonical JSON: a tuple or non-string key", code="bad_field")
    return raw


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in pairs:
        if key in out:
            raise MalformedError(f"duplicate object key {key!r}", code="malformed")
        if not _KEY.match(key):
            raise MalformedError(f"object key {key[:70]!r} is not 1..64 characters of [a-z0-9_]", code="malformed")
        out[key] = item
    return out


def _no_float(text: str) -> Any:
    raise MalformedError(f"number {text[:32]} is not an integer", code="malformed")


def decode(data: bytes | str) -> Any:
    """Parse canonical JSON, refusing every other encoding of the same value (see the module docstring).

    Keys, duplicates, floats and integer ranges are checked while parsing; the rest (order, whitespace,
    escapes) by comparing the input with the canonical re-encoding of what was parsed."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError("canonical JSON is ASCII only (non-ASCII is \\u-escaped)", code="malformed") from None
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_float=_no_float, parse_constant=_no_float)
        encoded = _dumps(value)
    except RecursionError:
        raise MalformedError("JSON nests too deeply", code="malformed") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise MalformedError(f"not JSON: {exc}", code="malformed") from None
    if encoded != raw:
        raise MalformedError("not the canonical encoding (key order, whitespace or escapes differ)", code="malformed")
    return value
