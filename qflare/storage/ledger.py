"""Store operations for the provenance ledger (qflare.ledger): append, and cheap reads.

Round entries are not appended on their own: :meth:`TrainingOps.publish_model` and
:meth:`TrainingOps.set_round_state` (to ``failed``) take the signed entry and write it with
:func:`insert_ledger` in the same transaction as the round's close, so a published model never exists
without its entry, nor an entry without its model.  :meth:`LedgerOps.append_ledger` appends entries
that close no round (the kinds that other features add).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qflare.errors import ReplayError, ValidationError
from qflare.ledger import GENESIS_PREV, LedgerEntry
from qflare.storage import tables as t
from qflare.storage._base import StoreBase, finite_int
from qflare.storage.records import LedgerRow

__all__ = ["KEY_KINDS", "LedgerOps", "insert_ledger", "ledger_row"]

KEY_KINDS = ("key_rotation", "key_revocation")
"""The entry kinds that embed a coordinator key rotation chain record."""


def ledger_row(row: t.LedgerEntry) -> LedgerRow:
    return LedgerRow(
        seq=row.seq,
        round_number=row.round_number,
        kind=row.kind,
        prev_hash=row.prev_hash,
        entry_hash=row.entry_hash,
        body=bytes(row.body),
        signatures=tuple((str(k), bytes.fromhex(str(v))) for k, v in row.signatures),
        created_at=row.created_at,
    )


def insert_ledger(
    s: Session,
    lock: Callable[[Session, str], None],
    entry: LedgerEntry,
    at: datetime,
    *,
    round_number: int | None = None,
) -> LedgerRow:
    """Append ``entry`` inside the caller's transaction.  It must extend the stored head exactly
    (``seq`` = head + 1, ``prev`` = head's hash; seq 1 and GENESIS_PREV on an empty ledger), else
    ReplayError ``ledger_conflict`` -- and the caller's whole transaction rolls back.  ``round_number``,
    when given, is the round the transaction closes, which the entry must be about.
    ``lock(s, table)`` serialises appenders (the store's table lock)."""
    if not isinstance(entry, LedgerEntry):
        raise ValidationError("a ledger entry must be a qflare.ledger.LedgerEntry")
    if round_number is not None and (entry.kind != "round" or entry.round_number != round_number):
        raise ValidationError(f"the ledger entry is not the round entry of round {round_number}")
    lock(s, "ledger_entries")
    head = s.scalars(select(t.LedgerEntry).order_by(t.LedgerEntry.seq.desc()).limit(1)).first()
    want_seq, want_prev = (1, GENESIS_PREV) if head is None else (head.seq + 1, head.entry_hash)
    if entry.seq != want_seq or entry.prev_hash != want_prev:
        raise ReplayError(
            f"ledger entry {entry.seq} does not extend the ledger head (next is {want_seq})", code="ledger_conflict"
        )
    row = t.LedgerEntry(
        seq=entry.seq,
        round_number=entry.round_number,
        kind=entry.kind,
        prev_hash=entry.prev_hash,
        entry_hash=entry.entry_hash,
        body=entry.raw,
        signatures=[[key_id, sig.hex()] for key_id, sig in entry.signatures],
        created_at=at,
    )
    s.add(row)
    s.flush()
    return ledger_row(row)


class LedgerOps(StoreBase):
    def append_ledger(self, entry: LedgerEntry, *, created_at: datetime | None = None) -> LedgerRow:
        """Append an entry that closes no round (its own transaction); see :func:`insert_ledger`."""
        at = self._now(created_at, "created_at")
        try:
            with self._write() as s:
                return insert_ledger(s, self._lock_table, entry, at)
        except IntegrityError as exc:
            raise ReplayError("ledger entry hash already present", code="ledger_conflict") from exc

    def append_key_records(
        self,
        build: Callable[[LedgerRow | None, frozenset[str]], Sequence[LedgerEntry]],
        *,
        created_at: datetime | None = None,
    ) -> list[LedgerRow]:
        """Append the entries ``build(head, present)`` returns, in one transaction that holds the
        ledger's table lock: ``head`` is the ledger head, ``present`` the ``record_sha256`` of every
        key rotation/revocation entry already stored.  So a record goes in at most once, whoever else
        appends concurrently (see :mod:`qflare.protocol.key_ledger`)."""
        at = self._now(created_at, "created_at")
        try:
            with self._write() as s:
                self._lock_table(s, "ledger_entries")
                head = s.scalars(select(t.LedgerEntry).order_by(t.LedgerEntry.seq.desc()).limit(1)).first()
                stmt = select(t.LedgerEntry.body).where(t.LedgerEntry.kind.in_(KEY_KINDS))
                present = frozenset(str(json.loads(bytes(body))["record_sha256"]) for body in s.scalars(stmt))
                entries = build(None if head is None else ledger_row(head), present)
                return [insert_ledger(s, self._lock_table, entry, at) for entry in entries]
        except IntegrityError as exc:
            raise ReplayError("ledger entry hash already present", code="ledger_conflict") from exc

    def last_ledger_entry(self) -> LedgerRow | None:
        """The ledger head (highest ``seq``), or None when the ledger is empty."""
        with self._read() as s:
            row = s.scalars(select(t.LedgerEntry).order_by(t.LedgerEntry.seq.desc()).limit(1)).first()
            return None if row is None else ledger_row(row)

    def ledger_entries(self, after_seq: int = 0, limit: int = 1000) -> list[LedgerRow]:
        """Up to ``limit`` entries with ``seq > after_seq``, ascending: page through the ledger with
        ``after_seq`` = the last seq of the previous page (an index range scan per page)."""
        finite_int(after_seq, "after_seq", 0)
        finite_int(limit, "limit", 1)
        with self._read() as s:
            stmt = select(t.LedgerEntry).where(t.LedgerEntry.seq > after_seq).order_by(t.LedgerEntry.seq).limit(limit)
            return [ledger_row(r) for r in s.scalars(stmt)]

    def ledger_entry_for_round(self, round_number: int) -> LedgerRow | None:
        """The round entry of ``round_number`` (None until the round closed or failed)."""
        with self._read() as s:
            stmt = select(t.LedgerEntry).where(
                t.LedgerEntry.round_number == round_number, t.LedgerEntry.kind == "round"
            )
            row = s.scalars(stmt.limit(1)).first()
            return None if row is None else ledger_row(row)
