"""Wire formats of the secure-aggregation phases, in the shape of :mod:`qflare.crypto.envelope`.

Layout (integers big-endian)::

    offset  size  field
    0       3     magic "QSA"
    3       1     wire version (0x01)
    4       5     suite (see Suite.to_bytes)
    9       1     message type (SecAggMsg)
    10      ...   fields, each: tag u8 | length u32 | value, in the fixed order of the message type
    ...     4     signature length u32 (signed types only; must equal the suite's signature size)
    ...     n     ML-DSA signature over every byte before the signature length, with the per-type
                  context "qflare/v1/secagg-<type>"

Message types and their fields (in this order):

* ADVERTISE (device, signed by its identity key): ROUND u64, SESSION 32, FROM u32, CHANNEL_PUBLIC and
  MASK_PUBLIC (hybrid KEM public keys: ML-KEM encapsulation key || X25519 public), SELF_COMMIT (SHA-256
  commitment to the self-mask seed, :func:`qflare.secagg.keys.self_mask_commitment`).
* SHARE (device -> one neighbour, relayed; *unsigned*, bound by its SHA-256 in the sender's manifest):
  ROUND, SESSION, FROM, TO, CT_CHANNEL (KEM ciphertext to the recipient's channel key), SEALED_SHARES
  (AES-256-GCM of the two 66-byte Shamir shares, self-mask seed then pairwise key: 148 bytes), and,
  present exactly when FROM < TO, CT_MASK (KEM ciphertext to the recipient's mask key) and SEALED_PAIR
  (AES-256-GCM of the 32-byte pairwise mask seed: 48 bytes).
* MANIFEST (device, signed): ROUND, SESSION, FROM, ENTRIES = records of 100 bytes, strictly increasing
  by recipient: ``to u32 | SHA-256(SHARE bytes) | commitment of the self-mask share | commitment of the
  pairwise-key share`` (commitments: :func:`share_commitment`).
* MASKED_INPUT (device, signed; the vector travels next to it): ROUND, SESSION, FROM, VECTOR_HASH (SHA-256
  of the vector bytes: ``LENGTH`` little-endian uint32 words), LENGTH u64.
* UNMASK_REQUEST (coordinator, signed by its key): ROUND, SESSION, SURVIVORS, DROPPED (u32 lists, strictly
  increasing, disjoint; DROPPED may be empty).
* UNMASK_RESPONSE (device, signed): ROUND, SESSION, FROM, REQUEST_HASH (SHA-256 of the request bytes),
  SHARES = records of 71 bytes, strictly increasing by peer: ``peer u32 | kind u8 | share 66``.
* CONSISTENCY (device, signed; the consistency-check round): ROUND, SESSION, FROM, SURVIVORS_HASH
  (:func:`survivors_hash` of the survivor set the device signs; a device signs one set per round).

Every field is required (except the SHARE pair fields, whose presence the indices decide), appears once,
in schema order, with an exact or bounded length, so each message has one valid encoding; anything else
is MalformedError, oversize input OversizeError.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from qflare.crypto.envelope import parse_header, parse_signature_trailer
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.kem import kem_ciphertext_len, kem_public_len
from qflare.crypto.suite import SUITE_WIRE_LEN, Suite, sha256
from qflare.errors import BadSignatureError, ConfigError, ErrorCode, MalformedError, WrongRoundError
from qflare.secagg.keys import SecAggConfig
from qflare.secagg.params import MAX_DEVICES
from qflare.secagg.shamir import SHARE_LEN

__all__ = [
    "ENTRY_LEN",
    "HEADER_LEN",
    "MAGIC",
    "MAX_MESSAGE",
    "SCHEMAS",
    "SHARE_RECORD_LEN",
    "ManifestEntry",
    "SecAggField",
    "SecAggMessage",
    "SecAggMsg",
    "ShareKind",
    "ShareRecord",
    "check_header",
    "context_for",
    "decode_entries",
    "decode_indices",
    "decode_share_records",
    "encode_entries",
    "encode_indices",
    "encode_share_records",
    "share_commitment",
    "survivors_hash",
]

MAGIC = b"QSA"
WIRE_VERSION = 1
HEADER_LEN = len(MAGIC) + 1 + SUITE_WIRE_LEN + 1
MAX_MESSAGE = 2 * 1024 * 1024
SEALED_SHARES_LEN = 2 * SHARE_LEN + 16
SEALED_PAIR_LEN = 32 + 16
ENTRY_LEN = 4 + 32 + 32 + 32
SHARE_RECORD_LEN = 4 + 1 + SHARE_LEN
_TLV = struct.Struct(">BI")
_U32 = struct.Struct(">I")


class SecAggMsg(enum.IntEnum):
    ADVERTISE = 0x40
    SHARE = 0x41
    MANIFEST = 0x42
    MASKED_INPUT = 0x43
    UNMASK_REQUEST = 0x44
    UNMASK_RESPONSE = 0x45
    CONSISTENCY = 0x46


class SecAggField(enum.IntEnum):
    ROUND = 0x01
    SESSION = 0x02
    FROM = 0x03
    TO = 0x04
    CHANNEL_PUBLIC = 0x05
    MASK_PUBLIC = 0x06
    CT_CHANNEL = 0x07
    SEALED_SHARES = 0x08
    CT_MASK = 0x09
    SEALED_PAIR = 0x0A
    ENTRIES = 0x0B
    VECTOR_HASH = 0x0C
    LENGTH = 0x0D
    SURVIVORS = 0x0E
    DROPPED = 0x0F
    REQUEST_HASH = 0x10
    SHARES = 0x11
    SELF_COMMIT = 0x12
    SURVIVORS_HASH = 0x13


class ShareKind(enum.IntEnum):
    SELF_MASK = 1  # a share of the device's self-mask seed (asked for devices that sent a masked input)
    PAIRWISE = 2  # a share of its pairwise master key (asked for devices that dropped before that)


@dataclass(frozen=True)
class _Spec:
    size: int | None = None
    size_of: Callable[[Suite], int] | None = None
    unit: int = 0  # list fields: length a multiple of unit, in min_len..max_len
    min_len: int = 0
    max_len: int = 0

    def check(self, tag: SecAggField, length: int, suite: Suite) -> None:
        want = self.size_of(suite) if self.size_of is not None else self.size
        if want is not None:
            if length != want:
                raise MalformedError(f"field {tag.name} must be {want} bytes, got {length}", code="malformed")
            return
        if not self.min_len <= length <= self.max_len or length % self.unit:
            raise MalformedError(
                f"field {tag.name} must be a multiple of {self.unit} in {self.min_len}..{self.max_len} bytes, "
                f"got {length}",
                code="malformed",
            )


S = SecAggField
_H = _Spec(size=32)
_SPECS: Mapping[SecAggField, _Spec] = MappingProxyType(
    {
        S.ROUND: _Spec(size=8),
        S.SESSION: _H,
        S.FROM: _Spec(size=4),
        S.TO: _Spec(size=4),
        S.CHANNEL_PUBLIC: _Spec(size_of=kem_public_len),
        S.MASK_PUBLIC: _Spec(size_of=kem_public_len),
        S.CT_CHANNEL: _Spec(size_of=kem_ciphertext_len),
        S.SEALED_SHARES: _Spec(size=SEALED_SHARES_LEN),
        S.CT_MASK: _Spec(size_of=kem_ciphertext_len),
        S.SEALED_PAIR: _Spec(size=SEALED_PAIR_LEN),
        S.ENTRIES: _Spec(unit=ENTRY_LEN, min_len=ENTRY_LEN, max_len=ENTRY_LEN * MAX_DEVICES),
        S.VECTOR_HASH: _H,
        S.LENGTH: _Spec(size=8),
        S.SURVIVORS: _Spec(unit=4, min_len=4, max_len=4 * MAX_DEVICES),
        S.DROPPED: _Spec(unit=4, min_len=0, max_len=4 * MAX_DEVICES),
        S.REQUEST_HASH: _H,
        S.SHARES: _Spec(unit=SHARE_RECORD_LEN, min_len=0, max_len=SHARE_RECORD_LEN * MAX_DEVICES),
        S.SELF_COMMIT: _H,
        S.SURVIVORS_HASH: _H,
    }
)
_BASE = (S.ROUND, S.SESSION)
SCHEMAS: Mapping[SecAggMsg, tuple[SecAggField, ...]] = MappingProxyType(
    {
        SecAggMsg.ADVERTISE: (*_BASE, S.FROM, S.CHANNEL_PUBLIC, S.MASK_PUBLIC, S.SELF_COMMIT),
        SecAggMsg.SHARE: (*_BASE, S.FROM, S.TO, S.CT_CHANNEL, S.SEALED_SHARES, S.CT_MASK, S.SEALED_PAIR),
        SecAggMsg.MANIFEST: (*_BASE, S.FROM, S.ENTRIES),
        SecAggMsg.MASKED_INPUT: (*_BASE, S.FROM, S.VECTOR_HASH, S.LENGTH),
        SecAggMsg.UNMASK_REQUEST: (*_BASE, S.SURVIVORS, S.DROPPED),
        SecAggMsg.UNMASK_RESPONSE: (*_BASE, S.FROM, S.REQUEST_HASH, S.SHARES),
        SecAggMsg.CONSISTENCY: (*_BASE, S.FROM, S.SURVIVORS_HASH),
    }
)
_PAIR_FIELDS = frozenset({S.CT_MASK, S.SEALED_PAIR})
_UNSIGNED = frozenset({SecAggMsg.SHARE})
del S


def context_for(msg_type: SecAggMsg) -> bytes:
    """ML-DSA context of a message type, e.g. ``b"qflare/v1/secagg-advertise"``."""
    return b"qflare/v1/secagg-" + SecAggMsg(msg_type).name.lower().replace("_", "-").encode()


def _expected_fields(mt: SecAggMsg, fields: Mapping[SecAggField, bytes]) -> tuple[SecAggField, ...]:
    schema = SCHEMAS[mt]
    if mt is not SecAggMsg.SHARE:
        return schema
    pair = int.from_bytes(fields[SecAggField.FROM], "big") < int.from_bytes(fields[SecAggField.TO], "big")
    return schema if pair else tuple(f for f in schema if f not in _PAIR_FIELDS)


@dataclass(frozen=True, eq=False)
class SecAggMessage:
    """A parsed (or freshly built) phase message.  ``parse`` checks structure only; call :meth:`verify`."""

    suite: Suite
    msg_type: SecAggMsg
    fields: Mapping[SecAggField, bytes]
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    raw: bytes = field(repr=False)

    @staticmethod
    def _header(suite: Suite, mt: SecAggMsg) -> bytes:
        return MAGIC + bytes([WIRE_VERSION]) + suite.to_bytes() + bytes([mt])

    @classmethod
    def build(
        cls, suite: Suite, msg_type: SecAggMsg, fields: Mapping[SecAggField, bytes], key: SigningKey | None
    ) -> SecAggMessage:
        """Encode (and sign with ``key``; ``None`` exactly for the unsigned SHARE)."""
        mt = SecAggMsg(msg_type)
        if (key is None) != (mt in _UNSIGNED):
            raise ConfigError(f"{mt.name} is {'un' if mt in _UNSIGNED else ''}signed", code="bad_field")
        if SecAggField.FROM in SCHEMAS[mt] and SecAggField.FROM not in fields:
            raise ConfigError(f"{mt.name} needs FROM", code="bad_field")
        if mt is SecAggMsg.SHARE and SecAggField.TO not in fields:
            raise ConfigError("SHARE needs TO", code="bad_field")
        want = _expected_fields(mt, fields)
        if set(fields) != set(want):
            raise ConfigError(
                f"{mt.name} takes {[f.name for f in want]}, got {sorted(f.name for f in fields)}", code="bad_field"
            )
        out = bytearray(cls._header(suite, mt))
        for tag in want:
            value = bytes(fields[tag])
            try:
                _SPECS[tag].check(tag, len(value), suite)
            except MalformedError as exc:
                raise ConfigError(str(exc), code="bad_field") from None
            out += _TLV.pack(tag, len(value)) + value
        body = bytes(out)
        if key is None:
            return cls(suite, mt, MappingProxyType({f: bytes(fields[f]) for f in want}), body, b"", body)
        if key.alg != suite.sig:
            raise ConfigError(f"key is {key.alg} but suite signs with {suite.sig}", code="key_alg_mismatch")
        sig = key.sign(body, context_for(mt))
        raw = body + _U32.pack(len(sig)) + sig
        return cls(suite, mt, MappingProxyType({f: bytes(fields[f]) for f in want}), body, sig, raw)

    @classmethod
    def parse(cls, data: bytes, *, expected: SecAggMsg, max_size: int = MAX_MESSAGE) -> SecAggMessage:
        """Strict structural parse of untrusted bytes; raises only QflareError subclasses."""
        raw, suite, mt = parse_header(
            data,
            magic=MAGIC,
            version=WIRE_VERSION,
            types=SecAggMsg,
            expected=expected,
            max_size=max_size,
            kind="secure-aggregation message",
        )
        fields: dict[SecAggField, bytes] = {}
        pos = HEADER_LEN
        schema = SCHEMAS[mt]
        for want in schema:
            if want in _PAIR_FIELDS and tuple(_expected_fields(mt, fields)) != schema:
                continue  # SHARE from a higher to a lower index: no pair fields
            if len(raw) - pos < _TLV.size:
                raise MalformedError(f"{mt.name}: truncated before field {want.name}", code="truncated")
            tag_id, length = _TLV.unpack_from(raw, pos)
            if tag_id != want:
                raise MalformedError(f"{mt.name}: tag 0x{tag_id:02x} where {want.name} belongs", code="malformed")
            _SPECS[want].check(want, length, suite)
            pos += _TLV.size
            if len(raw) - pos < length:
                raise MalformedError(f"{mt.name}: field {want.name} truncated", code="truncated")
            fields[want] = raw[pos : pos + length]
            pos += length
        body = raw[:pos]
        if mt in _UNSIGNED:
            if pos != len(raw):
                raise MalformedError(f"{mt.name}: {len(raw) - pos} trailing bytes", code="malformed")
            sig = b""
        else:
            sig = parse_signature_trailer(raw, pos, suite, mt.name)
        return cls(suite, mt, MappingProxyType(fields), body, sig, raw)

    def verify(self, key: VerifyKey) -> SecAggMessage:
        """BadSignatureError unless the signature verifies under ``key`` (SHARE has none to verify)."""
        if self.msg_type in _UNSIGNED:
            raise ConfigError(f"{self.msg_type.name} is unsigned: check its digest", code="bad_field")
        if key.alg != self.suite.sig:
            raise BadSignatureError(f"message signed with {self.suite.sig}, key is {key.alg}", code="bad_signature")
        key.verify(self.signature, self.body, context_for(self.msg_type))
        return self

    def get(self, tag: SecAggField) -> bytes:
        return self.fields[tag]

    def get_int(self, tag: SecAggField) -> int:
        return int.from_bytes(self.fields[tag], "big")


def check_header(msg: SecAggMessage, config: SecAggConfig) -> None:
    """WrongRoundError unless ``msg`` is for this round and configuration (replays across rounds)."""
    if msg.suite != config.suite:
        raise WrongRoundError("message is for another suite", code=ErrorCode.WRONG_ROUND)
    if msg.get_int(SecAggField.ROUND) != config.round or msg.get(SecAggField.SESSION) != config.session:
        raise WrongRoundError(
            f"message is for round {msg.get_int(SecAggField.ROUND)} / another session, not round {config.round}",
            code=ErrorCode.WRONG_ROUND,
        )


def share_commitment(session: bytes, kind: ShareKind, dealer: int, holder: int, share: bytes) -> bytes:
    """SHA-256 commitment to one share (the share has >= 256 bits of fresh entropy, so it hides it)."""
    return sha256(
        b"qflare/secagg/v1/commit", session, bytes([kind]), _U32.pack(dealer), _U32.pack(holder), bytes(share)
    )


def survivors_hash(session: bytes, survivors: Sequence[int]) -> bytes:
    """What a device signs in the consistency round: the session and the survivor set U3."""
    return sha256(b"qflare/secagg/v1/survivors", session, encode_indices(sorted(survivors)))


@dataclass(frozen=True)
class ManifestEntry:
    to: int
    digest: bytes
    commit_self: bytes
    commit_pair: bytes


@dataclass(frozen=True)
class ShareRecord:
    peer: int
    kind: ShareKind
    share: bytes


def _increasing(values: Sequence[int], what: str) -> None:
    for a, b in itertools.pairwise(values):
        if a >= b:
            raise MalformedError(f"{what} must be strictly increasing", code="malformed")
    if values and values[0] < 1:
        raise MalformedError(f"{what}: index 0 is not a device", code="malformed")


def encode_indices(values: Sequence[int]) -> bytes:
    return b"".join(_U32.pack(v) for v in values)


def decode_indices(data: bytes, what: str) -> list[int]:
    out = [int.from_bytes(data[i : i + 4], "big") for i in range(0, len(data), 4)]
    _increasing(out, what)
    return out


def encode_entries(entries: Sequence[ManifestEntry]) -> bytes:
    return b"".join(_U32.pack(e.to) + e.digest + e.commit_self + e.commit_pair for e in entries)


def decode_entries(data: bytes) -> list[ManifestEntry]:
    out = [
        ManifestEntry(
            int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 36], data[i + 36 : i + 68], data[i + 68 : i + 100]
        )
        for i in range(0, len(data), ENTRY_LEN)
    ]
    _increasing([e.to for e in out], "manifest entries")
    return out


def encode_share_records(records: Sequence[ShareRecord]) -> bytes:
    return b"".join(_U32.pack(r.peer) + bytes([r.kind]) + r.share for r in records)


def decode_share_records(data: bytes) -> list[ShareRecord]:
    out: list[ShareRecord] = []
    for i in range(0, len(data), SHARE_RECORD_LEN):
        try:
            kind = ShareKind(data[i + 4])
        except ValueError:
            raise MalformedError(f"unknown share kind {data[i + 4]}", code=ErrorCode.MALFORMED) from None
        out.append(ShareRecord(int.from_bytes(data[i : i + 4], "big"), kind, data[i + 5 : i + SHARE_RECORD_LEN]))
    _increasing([r.peer for r in out], "share records")
    return out
