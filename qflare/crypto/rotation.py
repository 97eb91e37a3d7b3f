"""Coordinator key rotation and revocation records, and the chain devices follow from their pinned key.

A **rotation record** moves the coordinator from an old ML-DSA key to a new one and is signed by *both*
(same bytes, two context strings), so neither a thief of the new key alone nor a stale old key alone
can make one.  A **revocation record** says a key that was rotated away must never be trusted again; it
is signed by the coordinator's current key.  Records form one chain: sequence numbers 1, 2, 3, ... and
each record names the SHA-256 of the previous record's bytes.

Byte layout (integers big-endian; ``P``/``S`` are the algorithm's public-key/signature sizes, e.g.
1952/3309 for ML-DSA-65)::

    offset  size  rotation (kind 0x01)                 revocation (kind 0x02)
    0       4     magic "QFKR"                         magic "QFKR"
    4       1     format version 0x01                  format version 0x01
    5       1     kind 0x01                            kind 0x02
    6       1     signature algorithm (wire id:        signature algorithm
                  0x01 ML-DSA-44, 0x02 ML-DSA-65,
                  0x03 ML-DSA-87)
    7       8     sequence u64 (>= 1)                  sequence u64 (>= 1)
    15      8     timestamp u64 (Unix seconds)         timestamp u64
    23      32    previous record hash (SHA-256 of     previous record hash
                  its bytes; zeros for sequence 1)
    55      32    old key id                           revoked key id
    87      P     old public key                       -
    87+P    32    new key id                           signer key id at 87 (the current key)
    119+P   P     new public key                       -
    119+2P  1     reason length R (0..200)             reason length R at 119
    120+2P  R     reason, UTF-8, printable             reason at 120
    ...     S     signature by the old key,            signature by the signer,
                  context "qflare/v1/key-rotation/old" context "qflare/v1/key-revocation"
    ...     S     signature by the new key,            -
                  context "qflare/v1/key-rotation/new"

Every signature covers every byte before the first signature.  A key id must be the SHA-256 of the
public key next to it, so a record has exactly one valid encoding: a wrong length, trailing bytes, an
unknown kind or algorithm, a key id that is not its key's hash or a reason that is not printable UTF-8
is :class:`~qflare.errors.MalformedError` ``bad_rotation_record``.  Chain rules are in
:func:`verify_chain` and :func:`follow_chain`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.suite import SIG_ALGORITHMS, sha256
from qflare.errors import AuthError, BadSignatureError, ConfigError, ErrorCode, MalformedError

__all__ = [
    "GENESIS_HASH",
    "MAGIC",
    "MAX_CHAIN_RECORDS",
    "MAX_REASON_BYTES",
    "REVOCATION_CONTEXT",
    "ROTATION_NEW_CONTEXT",
    "ROTATION_OLD_CONTEXT",
    "ChainRecord",
    "ChainState",
    "KeyRevocation",
    "KeyRotation",
    "LedgerEmbedding",
    "RecordKind",
    "follow_chain",
    "ledger_embedding",
    "parse_record",
    "sign_revocation",
    "sign_rotation",
    "verify_chain",
]

MAGIC = b"QFKR"
FORMAT_VERSION = 1
MAX_REASON_BYTES = 200
MAX_CHAIN_RECORDS = 32
"""The most records a chain may hold (a device refuses longer lists before verifying anything)."""
GENESIS_HASH = bytes(32)
ROTATION_OLD_CONTEXT = b"qflare/v1/key-rotation/old"
ROTATION_NEW_CONTEXT = b"qflare/v1/key-rotation/new"
REVOCATION_CONTEXT = b"qflare/v1/key-revocation"
_HEAD = struct.Struct(">4sBBBQQ32s")  # magic, version, kind, alg, sequence, timestamp, previous hash
_ALG_BY_WIRE = {a.wire_id: a for a in SIG_ALGORITHMS.values()}
_BAD = ErrorCode.BAD_ROTATION_RECORD
_CHAIN = ErrorCode.ROTATION_CHAIN_BROKEN


class RecordKind(enum.IntEnum):
    ROTATION = 0x01
    REVOCATION = 0x02

    @property
    def ledger_kind(self) -> str:
        """The ledger entry kind this record becomes: ``key_rotation`` or ``key_revocation``."""
        return "key_rotation" if self is RecordKind.ROTATION else "key_revocation"


def _malformed(message: str) -> MalformedError:
    return MalformedError(message, code=_BAD)


def _reason_bytes(reason: str) -> bytes:
    if not isinstance(reason, str) or not reason.isprintable():
        raise ConfigError("a rotation reason must be printable text", code="bad_argument")
    data = reason.encode("utf-8")
    if len(data) > MAX_REASON_BYTES:
        raise ConfigError(f"a rotation reason is at most {MAX_REASON_BYTES} bytes of UTF-8", code="bad_argument")
    return data


def _head(kind: RecordKind, alg: str, sequence: int, timestamp: int, prev_hash: bytes) -> bytes:
    if not 1 <= sequence < 2**64 or not 0 <= timestamp < 2**64:
        raise ConfigError("sequence must be >= 1 and the timestamp non-negative (u64)", code="bad_argument")
    if len(prev_hash) != 32:
        raise ConfigError("the previous record hash is 32 bytes", code="bad_argument")
    return _HEAD.pack(MAGIC, FORMAT_VERSION, kind, SIG_ALGORITHMS[alg].wire_id, sequence, timestamp, prev_hash)


@dataclass(frozen=True)
class KeyRotation:
    """A parsed (or freshly signed) rotation; :meth:`verify` checks both signatures."""

    alg: str
    sequence: int
    timestamp: int
    prev_hash: bytes
    old_key: VerifyKey
    new_key: VerifyKey
    reason: str
    body: bytes = field(repr=False)
    old_signature: bytes = field(repr=False)
    new_signature: bytes = field(repr=False)
    raw: bytes = field(repr=False)
    kind: RecordKind = field(default=RecordKind.ROTATION, init=False)

    @property
    def digest(self) -> bytes:
        return sha256(self.raw)

    def verify(self) -> KeyRotation:
        """BadSignatureError ``bad_rotation_signature`` unless the old AND the new key signed the record."""
        for key, sig, ctx, who in (
            (self.old_key, self.old_signature, ROTATION_OLD_CONTEXT, "old"),
            (self.new_key, self.new_signature, ROTATION_NEW_CONTEXT, "new"),
        ):
            try:
                key.verify(sig, self.body, ctx)
            except BadSignatureError:
                raise BadSignatureError(
                    f"rotation #{self.sequence} is not signed by its {who} key {key.key_id[:16]}...",
                    code=ErrorCode.BAD_ROTATION_SIGNATURE,
                ) from None
        return self


@dataclass(frozen=True)
class KeyRevocation:
    """A parsed (or freshly signed) revocation; :meth:`verify` checks it against the signer's key."""

    alg: str
    sequence: int
    timestamp: int
    prev_hash: bytes
    revoked_key_id: str
    signer_key_id: str
    reason: str
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    raw: bytes = field(repr=False)
    kind: RecordKind = field(default=RecordKind.REVOCATION, init=False)

    @property
    def digest(self) -> bytes:
        return sha256(self.raw)

    def verify(self, signer: VerifyKey) -> KeyRevocation:
        if signer.key_id != self.signer_key_id or signer.alg != self.alg:
            raise BadSignatureError(
                f"revocation #{self.sequence} names signer {self.signer_key_id[:16]}..., not {signer.key_id[:16]}...",
                code=ErrorCode.BAD_ROTATION_SIGNATURE,
            )
        try:
            signer.verify(self.signature, self.body, REVOCATION_CONTEXT)
        except BadSignatureError:
            raise BadSignatureError(
                f"revocation #{self.sequence} is not signed by key {signer.key_id[:16]}...",
                code=ErrorCode.BAD_ROTATION_SIGNATURE,
            ) from None
        return self


ChainRecord = KeyRotation | KeyRevocation


def sign_rotation(
    old: SigningKey, new: SigningKey, *, sequence: int, prev_hash: bytes, timestamp: int, reason: str = ""
) -> KeyRotation:
    """A rotation from ``old`` to ``new`` (same algorithm, different keys), signed by both."""
    if old.alg != new.alg:
        raise ConfigError(f"a rotation keeps the algorithm: {old.alg} -> {new.alg}", code="key_alg_mismatch")
    if old.key_id == new.key_id:
        raise ConfigError("a rotation needs a new key", code="bad_argument")
    text = _reason_bytes(reason)
    body = b"".join(
        (
            _head(RecordKind.ROTATION, old.alg, sequence, timestamp, prev_hash),
            old.key_id_bytes,
            old.public.raw,
            new.key_id_bytes,
            new.public.raw,
            bytes([len(text)]),
            text,
        )
    )
    raw = body + old.sign(body, ROTATION_OLD_CONTEXT) + new.sign(body, ROTATION_NEW_CONTEXT)
    record = parse_record(raw)
    assert isinstance(record, KeyRotation)
    return record


def sign_revocation(
    signer: SigningKey, revoked_key_id: str, *, sequence: int, prev_hash: bytes, timestamp: int, reason: str = ""
) -> KeyRevocation:
    """A revocation of ``revoked_key_id`` (64 hex), signed by the current key ``signer``."""
    try:
        revoked = bytes.fromhex(revoked_key_id)
    except (ValueError, TypeError):
        revoked = b""
    if len(revoked) != 32:
        raise ConfigError("the revoked key id is 64 hex digits", code="bad_key_id")
    if revoked == signer.key_id_bytes:
        raise ConfigError("the current key cannot revoke itself: rotate with --revoke-old", code="bad_argument")
    text = _reason_bytes(reason)
    body = b"".join(
        (
            _head(RecordKind.REVOCATION, signer.alg, sequence, timestamp, prev_hash),
            revoked,
            signer.key_id_bytes,
            bytes([len(text)]),
            text,
        )
    )
    record = parse_record(body + signer.sign(body, REVOCATION_CONTEXT))
    assert isinstance(record, KeyRevocation)
    return record


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if len(self.data) - self.pos < n:
            raise _malformed(f"key record truncated in its {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def key(self, alg: str, what: str) -> VerifyKey:
        key_id = self.take(32, f"{what} key id")
        key = VerifyKey.from_bytes(alg, self.take(SIG_ALGORITHMS[alg].public_len, f"{what} public key"))
        if key.key_id_bytes != key_id:
            raise _malformed(f"the {what} key id is not the SHA-256 of the {what} public key")
        return key

    def reason(self) -> str:
        n = self.take(1, "reason length")[0]
        if n > MAX_REASON_BYTES:
            raise _malformed(f"reason of {n} bytes exceeds {MAX_REASON_BYTES}")
        try:
            text = self.take(n, "reason").decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("reason is not UTF-8") from None
        if not text.isprintable():
            raise _malformed("reason holds control characters")
        return text


def parse_record(data: bytes) -> ChainRecord:
    """Strict structural parse of untrusted bytes (signatures are NOT checked: see ``verify``).

    Raises only :class:`~qflare.errors.MalformedError` ``bad_rotation_record``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _malformed("a key record must be bytes")
    raw = bytes(data)
    if len(raw) < _HEAD.size:
        raise _malformed("key record shorter than its header")
    magic, version, kind_id, alg_id, sequence, timestamp, prev_hash = _HEAD.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise _malformed("not a QFLARE key record (magic or format version)")
    if kind_id not in (RecordKind.ROTATION, RecordKind.REVOCATION):
        raise _malformed(f"unknown key record kind 0x{kind_id:02x}")
    spec = _ALG_BY_WIRE.get(alg_id)
    if spec is None:
        raise _malformed(f"unknown signature algorithm 0x{alg_id:02x}")
    if sequence < 1:
        raise _malformed("sequence numbers start at 1")
    if (sequence == 1) != (prev_hash == GENESIS_HASH):
        raise _malformed("only the first record (and every first record) has an all-zero previous hash")
    reader = _Reader(raw)
    reader.pos = _HEAD.size
    try:
        if kind_id == RecordKind.ROTATION:
            old, new = reader.key(spec.name, "old"), reader.key(spec.name, "new")
            if old == new:
                raise _malformed("a rotation from a key to itself")
            reason = reader.reason()
            body = raw[: reader.pos]
            sig_old, sig_new = (
                reader.take(spec.signature_len, "old signature"),
                reader.take(spec.signature_len, "new signature"),
            )
            _no_trailing(reader)
            common = (spec.name, sequence, timestamp, prev_hash)
            return KeyRotation(*common, old, new, reason, body, sig_old, sig_new, raw)
        revoked, signer = reader.take(32, "revoked key id").hex(), reader.take(32, "signer key id").hex()
        if revoked == signer:
            raise _malformed("a key revoking itself")
        reason = reader.reason()
        body = raw[: reader.pos]
        sig = reader.take(spec.signature_len, "signature")
        _no_trailing(reader)
        return KeyRevocation(spec.name, sequence, timestamp, prev_hash, revoked, signer, reason, body, sig, raw)
    except MalformedError as exc:
        if exc.code is _BAD:
            raise
        raise _malformed(f"key record: {exc.message}") from None  # e.g. a public key that does not decode


def _no_trailing(reader: _Reader) -> None:
    if reader.pos != len(reader.data):
        raise _malformed(f"{len(reader.data) - reader.pos} trailing bytes after the key record")


@dataclass(frozen=True)
class ChainState:
    """What a verified chain establishes."""

    records: tuple[ChainRecord, ...]
    keys: tuple[VerifyKey, ...]
    """Every coordinator key in order: the first rotation's old key first, the current key last."""
    revoked: frozenset[str]

    @property
    def current(self) -> VerifyKey | None:
        return self.keys[-1] if self.keys else None

    @property
    def head_hash(self) -> bytes:
        return self.records[-1].digest if self.records else GENESIS_HASH

    @property
    def next_sequence(self) -> int:
        return len(self.records) + 1


def _broken(message: str) -> AuthError:
    return AuthError(message, code=_CHAIN)


def verify_chain(records: Sequence[bytes | ChainRecord], *, max_records: int = MAX_CHAIN_RECORDS) -> ChainState:
    """Parse and verify a whole chain; its :class:`ChainState`.

    Rules: at most ``max_records``; sequences 1, 2, ... each naming the previous record's hash; one
    algorithm throughout; each rotation signed by both keys and starting from the current key (the
    previous rotation's new key); its new key never seen before in the chain (no return to an old, maybe
    revoked, key); each revocation signed by the current key and naming a key of the chain other than
    the current one, once.  Raises only QflareError (codes ``bad_rotation_record``,
    ``bad_rotation_signature``, ``rotation_chain_broken``, ``coordinator_key_revoked``)."""
    if len(records) > max_records:
        raise MalformedError(f"rotation chain of {len(records)} records exceeds {max_records}", code=_BAD)
    parsed = [r if isinstance(r, (KeyRotation, KeyRevocation)) else parse_record(r) for r in records]
    prev, alg = GENESIS_HASH, parsed[0].alg if parsed else None
    for n, rec in enumerate(parsed, 1):  # cheap structural checks before any signature
        if rec.sequence != n or rec.prev_hash != prev:
            raise _broken(f"record #{rec.sequence} at position {n} does not follow the previous record")
        if rec.alg != alg:
            raise _broken(f"record #{n} uses {rec.alg}, the chain {alg}")
        prev = rec.digest
    keys: list[VerifyKey] = []
    revoked: set[str] = set()
    for rec in parsed:
        current = keys[-1] if keys else None
        if isinstance(rec, KeyRotation):
            if current is not None and rec.old_key != current:
                raise _broken(f"rotation #{rec.sequence} starts from {rec.old_key.key_id[:16]}..., not the current key")
            if current is None:
                keys.append(rec.old_key)
            if any(k == rec.new_key for k in keys):
                raise AuthError(
                    f"rotation #{rec.sequence} returns to an earlier key {rec.new_key.key_id[:16]}...",
                    code=ErrorCode.COORDINATOR_KEY_REVOKED if rec.new_key.key_id in revoked else _CHAIN,
                )
            rec.verify()
            keys.append(rec.new_key)
        else:
            if current is None:
                raise _broken(f"revocation #{rec.sequence} before any rotation: no key is current")
            rec.verify(current)
            if rec.revoked_key_id not in {k.key_id for k in keys[:-1]}:
                raise _broken(f"revocation #{rec.sequence} names a key that is not a former key of this chain")
            if rec.revoked_key_id in revoked:
                raise _broken(f"revocation #{rec.sequence} revokes a key already revoked")
            revoked.add(rec.revoked_key_id)
    return ChainState(tuple(parsed), tuple(keys), frozenset(revoked))


def follow_chain(
    records: Sequence[bytes | ChainRecord],
    pinned_key_id: str,
    served: VerifyKey,
    *,
    known: Sequence[bytes] = (),
    max_records: int = MAX_CHAIN_RECORDS,
) -> ChainState:
    """What a device pinned to ``pinned_key_id`` does with the chain a coordinator serving ``served`` gives.

    The chain must verify (:func:`verify_chain`), extend ``known`` (the records this device verified
    before: a different history is a fork), contain the pinned key, and end at ``served``, which must
    not be revoked.  A pinned key that the chain later revokes is left by its rotation as usual (that is
    how a device escapes a compromised key).  Raises only QflareError; on success the caller moves its
    pin to ``served`` (and keeps the chain)."""
    state = verify_chain(records, max_records=max_records)
    raws = [r.raw for r in state.records]
    if len(known) > len(raws) or any(bytes(k) != r for k, r in zip(known, raws, strict=False)):
        raise _broken("the served rotation chain does not extend the one this device verified before (a fork)")
    if pinned_key_id not in {k.key_id for k in state.keys}:
        raise _broken(f"the rotation chain does not contain the pinned key {pinned_key_id[:16]}...")
    if state.current != served:
        raise _broken(f"the rotation chain ends at another key than the coordinator serves ({served.key_id[:16]}...)")
    if served.key_id in state.revoked:  # unreachable with verify_chain's rules; kept as the stated invariant
        raise AuthError("the coordinator serves a revoked key", code=ErrorCode.COORDINATOR_KEY_REVOKED)
    return state


@dataclass(frozen=True)
class LedgerEmbedding:
    """What a ledger entry embeds for one record: its kind, sequence, canonical bytes and their SHA-256."""

    kind: str  # "key_rotation" or "key_revocation"
    sequence: int
    canonical: bytes
    sha256: str


def ledger_embedding(record: bytes | ChainRecord) -> LedgerEmbedding:
    """The canonical bytes (the record's one valid encoding, signatures included) and their SHA-256 hex.

    Structure is checked (``bad_rotation_record``); signatures are the chain's business."""
    rec = record if isinstance(record, (KeyRotation, KeyRevocation)) else parse_record(record)
    return LedgerEmbedding(rec.kind.ledger_kind, rec.sequence, rec.raw, rec.digest.hex())
