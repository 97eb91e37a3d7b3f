"""Coordinator key rotations in the provenance ledger: each record of the rotation chain, exactly once.

``qflare server rotate-key`` / ``revoke-key`` append the entries of the records they make right after
the rotation log's commit point, a rotation's entry signed by both the old and the new key
(:func:`record_new`).  Whatever a crash left out is appended by :func:`catch_up`, signed by the current
key (the embedded record still carries both of its signatures): ``rotate-key`` runs it before it makes
a new key, and the server at start-up before the round manager can write a round entry with the new
key.  Records are matched by their SHA-256 under the ledger's table lock, so each goes in once, in
chain order (docs/provenance.md section 3.2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..crypto import SigningKey
from ..crypto.rotation import ChainRecord, ChainState, KeyRevocation, KeyRotation
from ..errors import ConfigError, ErrorCode
from ..ledger import GENESIS_PREV, LedgerEntry, key_record_entry
from .records import LedgerRow

__all__ = ["KeyRecordSink", "catch_up", "record_new"]


class KeyRecordSink(Protocol):
    """What appending key records needs of a store (:meth:`qflare.storage.Store.append_key_records`)."""

    def append_key_records(
        self, build: Callable[[LedgerRow | None, frozenset[str]], Sequence[LedgerEntry]]
    ) -> list[LedgerRow]: ...


def _append(
    store: KeyRecordSink,
    records: Sequence[ChainRecord],
    keys_for: Callable[[ChainRecord], Sequence[SigningKey]],
    clock: Callable[[], float],
) -> list[LedgerRow]:
    """Append every record of the chain ``records`` (all of it, in order) that the ledger lacks."""
    digests = [r.digest.hex() for r in records]

    def build(head: LedgerRow | None, present: frozenset[str]) -> list[LedgerEntry]:
        unknown = present - set(digests)
        if unknown:
            raise ConfigError(
                f"the ledger holds a key record ({sorted(unknown)[0][:16]}...) that the rotation log does not: "
                "the database and the data directory do not belong together",
                code=ErrorCode.ROTATION_INCOMPLETE,
            )
        held = [i for i, d in enumerate(digests) if d in present]
        if held != list(range(len(held))):  # what a crash leaves out is always the chain's tail
            raise ConfigError("the ledger holds key records out of chain order", code=ErrorCode.ROTATION_INCOMPLETE)
        missing = records[len(held) :]
        seq, prev = (1, GENESIS_PREV) if head is None else (head.seq + 1, head.entry_hash)
        out: list[LedgerEntry] = []
        for record in missing:
            entry = key_record_entry(record, seq=seq, prev_hash=prev, time=int(clock()), keys=keys_for(record))
            out.append(entry)
            seq, prev = seq + 1, entry.entry_hash
        return out

    return store.append_key_records(build)


def catch_up(
    store: KeyRecordSink, chain: ChainState, current: SigningKey, *, clock: Callable[[], float] = time.time
) -> list[LedgerRow]:
    """Append the records of ``chain`` the ledger lacks, signed by ``current`` (the chain's current key).

    ConfigError ``rotation_incomplete`` if ``current`` may not sign a missing record's entry: it must be
    the new key of a rotation (its old key is gone) or the signer of a revocation -- true of every record
    a crash of ``rotate-key`` can leave out, since ``rotate-key`` catches up before it rotates again."""

    def keys_for(record: ChainRecord) -> list[SigningKey]:
        allowed = (
            (record.old_key.key_id, record.new_key.key_id)
            if isinstance(record, KeyRotation)
            else (record.signer_key_id,)
        )
        if current.key_id not in allowed:
            raise ConfigError(
                f"key record #{record.sequence} is missing from the ledger and the current key "
                f"{current.key_id[:16]}... may not sign its entry (it is neither its old/new key nor its signer)",
                code=ErrorCode.ROTATION_INCOMPLETE,
            )
        return [current]

    return _append(store, chain.records, keys_for, clock)


def record_new(
    store: KeyRecordSink,
    chain: ChainState,
    old: SigningKey,
    new: SigningKey,
    *,
    clock: Callable[[], float] = time.time,
) -> list[LedgerRow]:
    """Append what ``chain`` holds beyond the ledger, just after ``rotate-key`` committed it: a rotation
    from ``old`` to ``new`` signed by both keys, a revocation signed by its signer (``new``)."""

    def keys_for(record: ChainRecord) -> list[SigningKey]:
        if isinstance(record, KeyRotation) and (record.old_key, record.new_key) == (old.public, new.public):
            return [old, new]
        if isinstance(record, KeyRevocation) and record.signer_key_id == new.key_id:
            return [new]
        if isinstance(record, KeyRotation) and record.new_key == new.public:
            return [new]
        raise ConfigError(
            f"key record #{record.sequence} is missing from the ledger: run the server once (or rotate-key "
            "again) to append it",
            code=ErrorCode.ROTATION_INCOMPLETE,
        )

    return _append(store, chain.records, keys_for, clock)
