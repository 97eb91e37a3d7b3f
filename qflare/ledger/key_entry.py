"""The ``key_rotation`` and ``key_revocation`` entry kinds: a coordinator key rotation or revocation
record (:mod:`qflare.crypto.rotation`) embedded in the ledger, so the verifier follows the key change.

Fields (besides the common ones of :mod:`qflare.ledger.entry`; ``round`` is null; layout in
docs/provenance.md section 3.2)::

    record         hex    the record's canonical bytes (its one valid encoding, signatures included)
    record_sha256  64 hex SHA-256 of those bytes
    record_seq     int    the record's sequence number in the rotation chain (1, 2, ...)
    reason         str    the record's reason (as the record holds it)
    key_rotation:   old_key, new_key          key ids (64 hex) the record names
    key_revocation: revoked_key, signer_key   key ids (64 hex) the record names

Who signs the entry: a ``key_rotation`` entry is signed by the record's old key, its new key, or both
(``rotate-key`` signs with both; a server that appends a record missing from the ledger at start-up
signs with its current key, the record's new key); a ``key_revocation`` entry by the record's signer.
The verifier, in ledger order, requires the record to continue the rotation chain seen so far
(sequence and previous-record hash), its old key (signer) to be the coordinator key trusted at that
point, and both record signatures (the revocation's signature) to verify; then a rotation replaces the
trusted key by the new key and a revocation marks the revoked key, which may sign nothing after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.rotation import ChainRecord, KeyRevocation, KeyRotation, parse_record
from qflare.errors import MalformedError, QflareError

from .entry import KindSpec, LedgerEntry, TrustState, register_kind, untrusted_reason

__all__ = [
    "KEY_REVOCATION_KIND",
    "KEY_ROTATION_KIND",
    "MAX_RECORD_HEX",
    "key_record_entry",
    "key_record_fields",
]

MAX_RECORD_HEX = 64 * 1024
"""The longest ``record`` hex string (an ML-DSA-87 rotation record is about 30 000 hex characters)."""
_COMMON = frozenset({"record", "record_sha256", "record_seq", "reason"})
ROTATION_FIELDS = _COMMON | {"old_key", "new_key"}
REVOCATION_FIELDS = _COMMON | {"revoked_key", "signer_key"}


def _bad(msg: str) -> MalformedError:
    return MalformedError(msg, code="malformed")


def key_record_fields(record: ChainRecord) -> dict[str, Any]:
    """The kind's body fields for ``record`` (its kind decides ``key_rotation`` / ``key_revocation``)."""
    fields: dict[str, Any] = {
        "record": record.raw.hex(),
        "record_sha256": record.digest.hex(),
        "record_seq": record.sequence,
        "reason": record.reason,
    }
    if isinstance(record, KeyRotation):
        fields.update(old_key=record.old_key.key_id, new_key=record.new_key.key_id)
    else:
        fields.update(revoked_key=record.revoked_key_id, signer_key=record.signer_key_id)
    return fields


def key_record_entry(
    record: ChainRecord, *, seq: int, prev_hash: str, time: int, keys: Sequence[SigningKey]
) -> LedgerEntry:
    """The signed entry embedding ``record`` (``keys``: see the module docstring for who may sign)."""
    return LedgerEntry.create(
        record.kind.ledger_kind,
        seq=seq,
        prev_hash=prev_hash,
        round_number=None,
        time=time,
        fields=key_record_fields(record),
        keys=keys,
    )


def _record(body: Mapping[str, Any]) -> ChainRecord:
    text = body["record"]
    if not isinstance(text, str) or not 0 < len(text) <= MAX_RECORD_HEX or text != text.lower():
        raise _bad(f"record must be lowercase hex of at most {MAX_RECORD_HEX} characters")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise _bad("record is not hex") from None
    try:
        record = parse_record(raw)
    except QflareError as exc:
        raise _bad(f"the embedded record does not parse: {exc.message}") from None
    if record.kind.ledger_kind != body["kind"]:
        raise _bad(f"the embedded record is a {record.kind.ledger_kind} record, not a {body['kind']} one")
    if body["record_sha256"] != record.digest.hex() or body["record_seq"] != record.sequence:
        raise _bad("record_sha256 or record_seq is not the embedded record's")
    if body["reason"] != record.reason:
        raise _bad("reason is not the embedded record's")
    return record


def _check_rotation(body: Mapping[str, Any]) -> dict[str, Any]:
    record = _record(body)
    assert isinstance(record, KeyRotation)
    if body["old_key"] != record.old_key.key_id or body["new_key"] != record.new_key.key_id:
        raise _bad("old_key or new_key is not the embedded record's")
    try:
        record.verify()  # both signatures: by the old key and by the new key
    except QflareError as exc:
        raise _bad(f"the embedded rotation record: {exc.message}") from None
    return {
        "seq": record.sequence,
        "sha256": record.digest.hex(),
        "prev": record.prev_hash.hex(),
        "old": record.old_key.key_id,
        "new": record.new_key.key_id,
        "alg": record.new_key.alg,
        "new_public": record.new_key.raw.hex(),
    }


def _check_revocation(body: Mapping[str, Any]) -> dict[str, Any]:
    record = _record(body)
    assert isinstance(record, KeyRevocation)
    if body["revoked_key"] != record.revoked_key_id or body["signer_key"] != record.signer_key_id:
        raise _bad("revoked_key or signer_key is not the embedded record's")
    # the signature needs the signer's public key: checked in ledger order (_apply_revocation)
    return {
        "seq": record.sequence,
        "sha256": record.digest.hex(),
        "prev": record.prev_hash.hex(),
        "revoked": record.revoked_key_id,
        "signer": record.signer_key_id,
        "record": record.raw.hex(),
    }


def _current(state: TrustState) -> str:
    if len(state.coordinator_keys) != 1:
        raise _bad("a key record needs exactly one current coordinator key")
    return next(iter(state.coordinator_keys))


def _follows(summary: Mapping[str, Any], state: TrustState) -> None:
    if summary["seq"] != state.record_seq + 1 or summary["prev"] != state.record_head:
        raise _bad(
            f"key record #{summary['seq']} does not follow the last key record of the ledger "
            f"(#{state.record_seq}): the rotation chain is broken"
        )


def _trust_rotation(signers: Sequence[str], summary: Mapping[str, Any], state: TrustState) -> None:
    current = _current(state)
    if summary["old"] != current:
        raise _bad(
            f"the rotation starts from key {summary['old'][:16]}..., not from the coordinator key trusted here "
            f"({current[:16]}...)"
        )
    for key_id in signers:
        if key_id not in (summary["old"], summary["new"]):
            raise _bad(untrusted_reason(key_id, state) + " (a rotation entry is signed by its old or new key)")


def _apply_rotation(summary: Mapping[str, Any], state: TrustState) -> None:
    _follows(summary, state)
    if summary["new"] in state.key_chain:
        raise _bad(f"the rotation returns to an earlier key {summary['new'][:16]}...")
    new = VerifyKey.from_bytes(summary["alg"], bytes.fromhex(summary["new_public"]))
    state.coordinator_keys = {new.key_id: new}
    state.key_chain.append(new.key_id)
    state.record_seq, state.record_head = summary["seq"], summary["sha256"]


def _trust_revocation(signers: Sequence[str], summary: Mapping[str, Any], state: TrustState) -> None:
    current = _current(state)
    if summary["signer"] != current:
        raise _bad(f"the revocation is signed by {summary['signer'][:16]}..., not the current key {current[:16]}...")
    if list(signers) != [current]:
        raise _bad("a key_revocation entry is signed by the current coordinator key alone")


def _apply_revocation(summary: Mapping[str, Any], state: TrustState) -> None:
    _follows(summary, state)
    record = parse_record(bytes.fromhex(summary["record"]))
    assert isinstance(record, KeyRevocation)
    try:
        record.verify(state.coordinator_keys[summary["signer"]])
    except QflareError as exc:
        raise _bad(f"the embedded revocation record: {exc.message}") from None
    revoked = summary["revoked"]
    if revoked not in state.key_chain[:-1]:
        raise _bad(f"the revocation names key {revoked[:16]}..., which is not a former coordinator key here")
    if revoked in state.revoked:
        raise _bad(f"key {revoked[:16]}... is already revoked")
    state.revoked.add(revoked)
    state.record_seq, state.record_head = summary["seq"], summary["sha256"]


KEY_ROTATION_KIND = register_kind(
    KindSpec(
        "key_rotation",
        ROTATION_FIELDS,
        signers=1,
        max_signers=2,
        check=_check_rotation,
        apply=_apply_rotation,
        about_round=False,
        trust=_trust_rotation,
    )
)
KEY_REVOCATION_KIND = register_kind(
    KindSpec(
        "key_revocation",
        REVOCATION_FIELDS,
        signers=1,
        check=_check_revocation,
        apply=_apply_revocation,
        about_round=False,
        trust=_trust_revocation,
    )
)
