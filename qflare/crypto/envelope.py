"""Canonical binary envelopes for protocol messages (no JSON, no pickle).

Layout (integers big-endian)::

    offset  size  field
    0       3     magic "QFL"
    3       1     wire version (0x01)
    4       5     suite (see Suite.to_bytes)
    9       1     message type (MsgType)
    10      ...   fields, each: tag u8 | length u32 | value, in the fixed order of the message type
    ...     4     signature length u32 (must equal the suite's signature size)
    ...     n     ML-DSA signature over every byte before the signature length, with the
                  per-type context "qflare/v1/<type>"

Every message type is signed (CLIENT_HELLO by the device key it names: proof of possession before the
coordinator does any expensive work).

Every field of a message type is required (except the few listed in OPTIONAL_FIELDS), appears at most
once, in schema order, with an exact (or bounded) length.  The parser therefore accepts exactly one
encoding per message; truncation, trailing bytes, unknown, duplicate or misplaced tags are
MalformedError and oversize input is OversizeError.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.kem import kem_ciphertext_len, kem_public_len
from qflare.crypto.suite import SUITE_WIRE_LEN, Suite
from qflare.errors import BadSignatureError, ConfigError, ErrorCode, MalformedError, OversizeError

__all__ = [
    "DEFAULT_MAX_ENVELOPE",
    "FIELD_SPECS",
    "HEADER_LEN",
    "MAGIC",
    "OPTIONAL_FIELDS",
    "SCHEMAS",
    "WIRE_VERSION",
    "Field",
    "FieldSpec",
    "MsgType",
    "SignedEnvelope",
    "context_for",
    "decode_fields",
    "encode_fields",
    "parse_header",
    "parse_signature_trailer",
    "u32",
    "u64",
]

MAGIC = b"QFL"
WIRE_VERSION = 1
HEADER_LEN = len(MAGIC) + 1 + SUITE_WIRE_LEN + 1  # 10
DEFAULT_MAX_ENVELOPE = 64 * 1024
_TLV = struct.Struct(">BI")


_E = TypeVar("_E", bound=enum.IntEnum)


def parse_header(
    data: object,
    *,
    magic: bytes,
    version: int,
    types: type[_E],
    expected: _E | None,
    max_size: int,
    kind: str,
    max_note: str = "",
) -> tuple[bytes, Suite, _E]:
    """The checks every QFLARE wire format makes of its header (magic[3] ‖ version ‖ suite ‖ type), in
    order: bytes at all, size, magic (a prefix of it for short input), length, version, suite, type, the
    expected type.  Returns the bytes, the suite and the type; raises only QflareError subclasses.
    ``kind`` names the format in messages ("envelope", "secure-aggregation message")."""
    noun = kind.rsplit(" ", 1)[-1]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedError(f"{noun} must be bytes", code="malformed")
    if len(data) > max_size:
        raise OversizeError(f"{noun} of {len(data)} bytes exceeds {max_note}{max_size}", code="oversized")
    raw = bytes(data)
    header_len = len(magic) + 1 + SUITE_WIRE_LEN + 1
    if raw[: len(magic)] != magic[: min(len(raw), len(magic))]:
        raise MalformedError(f"bad magic: not a {kind}", code="malformed")
    if len(raw) < header_len:
        raise MalformedError(f"{noun} shorter than its header", code="truncated")
    if raw[len(magic)] != version:
        raise MalformedError(f"unknown wire version {raw[len(magic)]}", code="malformed")
    suite = Suite.from_bytes(raw[len(magic) + 1 : len(magic) + 1 + SUITE_WIRE_LEN])
    try:
        mt = types(raw[header_len - 1])
    except ValueError:
        raise MalformedError(f"unknown message type 0x{raw[header_len - 1]:02x}", code="malformed") from None
    if expected is not None and mt is not types(expected):
        raise MalformedError(f"expected {types(expected).name}, got {mt.name}", code="unexpected_message")
    return raw, suite, mt


def parse_signature_trailer(raw: bytes, pos: int, suite: Suite, name: str) -> bytes:
    """The signature that ends a message at ``pos`` (u32 length ‖ signature, the suite's exact length, and
    nothing after it); MalformedError otherwise.  ``name`` (the message type) prefixes the messages."""
    if len(raw) - pos < _U32.size:
        raise MalformedError(f"{name}: truncated before signature", code="truncated")
    (sig_len,) = _U32.unpack_from(raw, pos)
    if sig_len != suite.sig_alg.signature_len:
        raise MalformedError(
            f"{name}: signature length {sig_len} is not {suite.sig_alg.signature_len}", code="malformed"
        )
    pos += _U32.size
    if len(raw) - pos < sig_len:
        raise MalformedError(f"{name}: signature truncated", code="truncated")
    if pos + sig_len != len(raw):
        raise MalformedError(f"{name}: {len(raw) - pos - sig_len} trailing bytes", code="malformed")
    return raw[pos : pos + sig_len]


_U32 = struct.Struct(">I")


class MsgType(enum.IntEnum):
    ENROLL_REQUEST = 0x01  # device -> coordinator, signed by the new device key (proof of possession)
    ENROLL_RECORD = 0x02  # coordinator -> device, signed by the coordinator
    CLIENT_HELLO = 0x10  # device -> coordinator, signed by the device (timestamped, replay-checked)
    SERVER_HELLO = 0x11  # coordinator -> device, signed by the coordinator
    CLIENT_FINISH = 0x12  # device -> coordinator, signed by the device
    GLOBAL_MODEL = 0x20  # coordinator -> device, signed by the coordinator
    UPDATE = 0x21  # device -> coordinator, signed by the device
    UPDATE_ACK = 0x22  # coordinator -> device, signed receipt


class Field(enum.IntEnum):
    DEVICE_KEY_ID = 0x01
    SERVER_KEY_ID = 0x02
    CLIENT_NONCE = 0x03
    SERVER_NONCE = 0x04
    KEM_PUBLIC = 0x05
    KEM_CIPHERTEXT = 0x06
    LIFETIME = 0x07
    HELLO_HASH = 0x08
    TRANSCRIPT_HASH = 0x09
    ROUND = 0x0A
    BASE_MODEL_HASH = 0x0B
    MODEL_HASH = 0x0C
    UPDATE_HASH = 0x0D
    NUM_EXAMPLES = 0x0E
    PAYLOAD_SIZE = 0x0F
    DEVICE_ID = 0x10
    SIGNING_PUBLIC = 0x11
    ENROLL_TOKEN = 0x12
    TIMESTAMP = 0x13
    STATUS = 0x14
    METADATA = 0x15  # optional, UTF-8 JSON of numeric training metrics (UPDATE only)
    MODEL_VERSION = 0x16  # u64, the global model's version (GLOBAL_MODEL); versions and rounds are distinct


@dataclass(frozen=True)
class FieldSpec:
    """Allowed value length: exact ``size``, or suite-dependent ``size_of(suite)``, or ``min_len..max_len``."""

    size: int | None = None
    size_of: Callable[[Suite], int] | None = None
    min_len: int = 1
    max_len: int = 0

    def check(self, tag: Field, length: int, suite: Suite) -> None:
        if self.size_of is not None:
            want: int | None = self.size_of(suite)
        else:
            want = self.size
        if want is not None:
            if length != want:
                raise MalformedError(f"field {tag.name} must be {want} bytes, got {length}", code="malformed")
        elif not self.min_len <= length <= self.max_len:
            raise MalformedError(
                f"field {tag.name} must be {self.min_len}..{self.max_len} bytes, got {length}", code="malformed"
            )


_H = FieldSpec(size=32)
FIELD_SPECS: Mapping[Field, FieldSpec] = MappingProxyType(
    {
        Field.DEVICE_KEY_ID: _H,
        Field.SERVER_KEY_ID: _H,
        Field.CLIENT_NONCE: _H,
        Field.SERVER_NONCE: _H,
        Field.KEM_PUBLIC: FieldSpec(size_of=kem_public_len),
        Field.KEM_CIPHERTEXT: FieldSpec(size_of=kem_ciphertext_len),
        Field.LIFETIME: FieldSpec(size=4),
        Field.HELLO_HASH: _H,
        Field.TRANSCRIPT_HASH: _H,
        Field.ROUND: FieldSpec(size=8),
        Field.BASE_MODEL_HASH: _H,
        Field.MODEL_HASH: _H,
        Field.UPDATE_HASH: _H,
        Field.NUM_EXAMPLES: FieldSpec(size=8),
        Field.PAYLOAD_SIZE: FieldSpec(size=8),
        Field.DEVICE_ID: FieldSpec(min_len=1, max_len=128),
        Field.SIGNING_PUBLIC: FieldSpec(size_of=lambda s: s.sig_alg.public_len),
        Field.ENROLL_TOKEN: FieldSpec(min_len=1, max_len=512),
        Field.TIMESTAMP: FieldSpec(size=8),
        Field.STATUS: FieldSpec(size=1),
        Field.METADATA: FieldSpec(min_len=1, max_len=4096),
        Field.MODEL_VERSION: FieldSpec(size=8),
    }
)

F = Field
SCHEMAS: Mapping[MsgType, tuple[Field, ...]] = MappingProxyType(
    {
        MsgType.ENROLL_REQUEST: (F.DEVICE_ID, F.SIGNING_PUBLIC, F.ENROLL_TOKEN, F.CLIENT_NONCE, F.TIMESTAMP),
        MsgType.ENROLL_RECORD: (F.DEVICE_ID, F.DEVICE_KEY_ID, F.SIGNING_PUBLIC, F.SERVER_KEY_ID, F.TIMESTAMP),
        MsgType.CLIENT_HELLO: (F.DEVICE_KEY_ID, F.CLIENT_NONCE, F.KEM_PUBLIC, F.TIMESTAMP),
        MsgType.SERVER_HELLO: (F.HELLO_HASH, F.SERVER_KEY_ID, F.SERVER_NONCE, F.KEM_CIPHERTEXT, F.LIFETIME),
        MsgType.CLIENT_FINISH: (F.DEVICE_KEY_ID, F.TRANSCRIPT_HASH),
        MsgType.GLOBAL_MODEL: (F.MODEL_VERSION, F.MODEL_HASH, F.PAYLOAD_SIZE, F.TIMESTAMP),
        MsgType.UPDATE: (
            F.DEVICE_KEY_ID,
            F.ROUND,
            F.BASE_MODEL_HASH,
            F.UPDATE_HASH,
            F.NUM_EXAMPLES,
            F.PAYLOAD_SIZE,
            F.METADATA,
        ),
        MsgType.UPDATE_ACK: (F.DEVICE_KEY_ID, F.ROUND, F.UPDATE_HASH, F.STATUS, F.TIMESTAMP),
    }
)
# Optional fields may be left out; when present they sit at their schema position.  Tag 0x00 is never
# assigned and a signature length always starts with 0x00, so presence is unambiguous.
OPTIONAL_FIELDS: Mapping[MsgType, frozenset[Field]] = MappingProxyType({MsgType.UPDATE: frozenset({F.METADATA})})
_VALID_TAGS = frozenset(int(t) for t in Field)


def context_for(msg_type: MsgType) -> bytes:
    """ML-DSA context string of a message type, e.g. ``b"qflare/v1/update"``."""
    return b"qflare/v1/" + MsgType(msg_type).name.lower().replace("_", "-").encode()


def u32(n: int) -> bytes:
    return _U32.pack(n)


def u64(n: int) -> bytes:
    if not 0 <= n < 2**64:
        raise ConfigError(f"{n} does not fit in u64", code="bad_field")
    return n.to_bytes(8, "big")


def encode_fields(msg_type: MsgType, fields: Mapping[Field, bytes], suite: Suite) -> bytes:
    """Encode ``fields`` in the fixed order of ``msg_type``; missing/extra/badly sized → ConfigError."""
    mt = MsgType(msg_type)
    schema = SCHEMAS[mt]
    optional = OPTIONAL_FIELDS.get(mt, frozenset())
    keys = {Field(k) for k in fields}
    if not set(schema) - optional <= keys <= set(schema):
        raise ConfigError(
            f"{mt.name} takes fields {[f.name for f in schema]} (optional: {sorted(f.name for f in optional)}), "
            f"got {sorted(k.name for k in keys)}",
            code="bad_field",
        )
    out = bytearray()
    for tag in schema:
        if tag not in keys:
            continue
        value = bytes(fields[tag])
        try:
            FIELD_SPECS[tag].check(tag, len(value), suite)
        except MalformedError as exc:
            raise ConfigError(str(exc), code="bad_field") from None
        out += _TLV.pack(tag, len(value))
        out += value
    return bytes(out)


def _decode(msg_type: MsgType, suite: Suite, buf: memoryview, pos: int) -> tuple[dict[Field, bytes], int]:
    schema = SCHEMAS[msg_type]
    optional = OPTIONAL_FIELDS.get(msg_type, frozenset())
    out: dict[Field, bytes] = {}
    for want in schema:
        if want in optional and (pos >= len(buf) or buf[pos] != want):
            continue  # absent optional field
        if len(buf) - pos < _TLV.size:
            raise MalformedError(f"{msg_type.name}: truncated before field {want.name}", code="truncated")
        tag_id, length = _TLV.unpack_from(buf, pos)
        if tag_id not in _VALID_TAGS or Field(tag_id) not in schema:
            raise MalformedError(f"{msg_type.name}: unknown tag 0x{tag_id:02x}", code="malformed")
        tag = Field(tag_id)
        if tag in out:
            raise MalformedError(f"{msg_type.name}: duplicate field {tag.name}", code="malformed")
        if tag is not want:
            raise MalformedError(f"{msg_type.name}: field {tag.name} where {want.name} belongs", code="malformed")
        FIELD_SPECS[tag].check(tag, length, suite)
        pos += _TLV.size
        if len(buf) - pos < length:
            raise MalformedError(f"{msg_type.name}: field {tag.name} truncated", code="truncated")
        out[tag] = bytes(buf[pos : pos + length])
        pos += length
    return out, pos


def decode_fields(msg_type: MsgType, data: bytes, suite: Suite) -> dict[Field, bytes]:
    """Strictly decode a fields region (the exact bytes :func:`encode_fields` produces)."""
    try:
        mt = MsgType(msg_type)
    except ValueError:
        raise MalformedError(f"unknown message type {msg_type!r}", code="malformed") from None
    fields, end = _decode(mt, suite, memoryview(bytes(data)), 0)
    if end != len(data):
        raise MalformedError(f"{mt.name}: {len(data) - end} trailing bytes after fields", code="malformed")
    return fields


def _ordered(mt: MsgType, fields: Mapping[Field, bytes]) -> Mapping[Field, bytes]:
    return MappingProxyType({f: bytes(fields[f]) for f in SCHEMAS[mt] if f in fields})


@dataclass(frozen=True, eq=False)
class SignedEnvelope:
    """A parsed (or freshly signed) envelope.  ``parse`` checks structure only; call :meth:`verify`."""

    suite: Suite
    msg_type: MsgType
    fields: Mapping[Field, bytes]
    body: bytes = field(repr=False)  # everything the signature covers
    signature: bytes = field(repr=False)
    raw: bytes = field(repr=False)

    @staticmethod
    def _header(suite: Suite, msg_type: MsgType) -> bytes:
        return MAGIC + bytes([WIRE_VERSION]) + suite.to_bytes() + bytes([msg_type])

    @classmethod
    def sign(cls, suite: Suite, msg_type: MsgType, fields: Mapping[Field, bytes], key: SigningKey) -> SignedEnvelope:
        """Encode and sign with ``key`` (whose algorithm must be the suite's)."""
        mt = MsgType(msg_type)
        if key.alg != suite.sig:
            raise ConfigError(f"key is {key.alg} but suite signs with {suite.sig}", code="key_alg_mismatch")
        body = cls._header(suite, mt) + encode_fields(mt, fields, suite)
        sig = key.sign(body, context_for(mt))
        raw = body + u32(len(sig)) + sig
        return cls(suite, mt, _ordered(mt, fields), body, sig, raw)

    @classmethod
    def parse(
        cls, data: bytes, *, max_size: int = DEFAULT_MAX_ENVELOPE, expected_type: MsgType | None = None
    ) -> SignedEnvelope:
        """Strict structural parse of untrusted bytes.  Raises only QflareError subclasses."""
        raw, suite, mt = parse_header(
            data,
            magic=MAGIC,
            version=WIRE_VERSION,
            types=MsgType,
            expected=expected_type,
            max_size=max_size,
            kind="QFLARE envelope",
            max_note="max_size=",
        )
        buf = memoryview(raw)
        fields, pos = _decode(mt, suite, buf, HEADER_LEN)
        body = raw[:pos]
        sig = parse_signature_trailer(raw, pos, suite, mt.name)
        return cls(suite, mt, MappingProxyType(fields), body, sig, raw)

    def verify(self, key: VerifyKey) -> SignedEnvelope:
        """Check the signature with ``key``; BadSignatureError (``bad_signature``) unless it verifies, which
        includes a key of another algorithm than the envelope's suite signs with."""
        if key.alg != self.suite.sig:
            raise BadSignatureError(
                f"envelope is signed with {self.suite.sig}, which a {key.alg} key cannot verify",
                code=ErrorCode.BAD_SIGNATURE,
            )
        key.verify(self.signature, self.body, context_for(self.msg_type))
        return self

    @classmethod
    def open(
        cls,
        data: bytes,
        key: VerifyKey,
        *,
        expected_type: MsgType,
        max_size: int = DEFAULT_MAX_ENVELOPE,
    ) -> SignedEnvelope:
        """Parse and verify in one call."""
        return cls.parse(data, max_size=max_size, expected_type=expected_type).verify(key)

    def to_bytes(self) -> bytes:
        return self.raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SignedEnvelope) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def get(self, tag: Field) -> bytes:
        return self.fields[tag]

    def get_int(self, tag: Field) -> int:
        """A fixed-size integer field (u8/u32/u64, big-endian)."""
        return int.from_bytes(self.fields[tag], "big")

    def get_key_id(self, tag: Field) -> str:
        return self.fields[tag].hex()
