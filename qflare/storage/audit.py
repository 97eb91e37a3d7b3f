"""Store operations for security events and the hash-chained provenance ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from qflare.errors import ReplayError, ValidationError
from qflare.storage import tables as t
from qflare.storage._base import StoreBase, check_json, check_nonempty, finite_int, require_aware
from qflare.storage.records import LedgerRow, SecurityEventRow, snapshot

__all__ = ["MAX_EVENT_DETAIL", "AuditOps"]

MAX_EVENT_DETAIL = 4000


def _clip(value: str | None, limit: int) -> str | None:
    """Peer-supplied text made storable: NULs escaped (PostgreSQL refuses them), length capped."""
    if value is None:
        return None
    cleaned = str(value).replace("\x00", "\\x00")
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


class AuditOps(StoreBase):
    # -- security events ----------------------------------------------------------------------

    def record_security_event(
        self,
        reason: str,
        detail: str,
        device_id: str | None = None,
        session_id: str | None = None,
        remote_addr: str | None = None,
        *,
        at: datetime | None = None,
    ) -> SecurityEventRow:
        """Persist an event in its OWN transaction: it commits even if the caller's work fails.

        Identifiers are whatever a (possibly hostile) peer claimed: they are clipped rather than
        refused, so recording an attack can never itself fail on the attacker's input.  On SQLite,
        call it outside any write transaction of your own (SQLite has a single writer).
        """
        event = t.SecurityEvent(
            at=self._now(at, "at"),
            device_id=_clip(device_id, 128),
            session_id=_clip(session_id, 128),
            reason=_clip(reason, 64) or "unspecified",
            detail=_clip(detail, MAX_EVENT_DETAIL) or "",
            remote_addr=_clip(remote_addr, 64),
        )
        with self._write() as s:
            s.add(event)
            s.flush()
            return snapshot(SecurityEventRow, event)

    def security_events(
        self,
        limit: int = 100,
        *,
        device_id: str | None = None,
        reason: str | None = None,
        since: datetime | None = None,
    ) -> list[SecurityEventRow]:
        """The newest ``limit`` events, newest first; optionally only one device's, one reason's, or
        those at or after ``since`` (timezone-aware)."""
        finite_int(limit, "limit", 0)
        with self._read() as s:
            stmt = select(t.SecurityEvent).order_by(t.SecurityEvent.id.desc()).limit(limit)
            if device_id is not None:
                stmt = stmt.where(t.SecurityEvent.device_id == device_id)
            if reason is not None:
                stmt = stmt.where(t.SecurityEvent.reason == reason)
            if since is not None:
                stmt = stmt.where(t.SecurityEvent.at >= require_aware(since, "since"))
            return [snapshot(SecurityEventRow, r) for r in s.scalars(stmt)]

    # -- provenance ledger --------------------------------------------------------------------

    def append_ledger(
        self,
        kind: str,
        payload: dict[str, Any],
        entry_hash: str,
        prev_hash: str,
        signature: bytes,
        *,
        created_at: datetime | None = None,
    ) -> LedgerRow:
        """Append the next entry (``seq`` = last + 1, starting at 1).

        ``prev_hash`` must equal the last entry's ``entry_hash`` (any value is accepted for the
        first entry, whose genesis convention belongs to the caller); otherwise, or if
        ``entry_hash`` already exists, ReplayError("ledger_conflict"): someone else appended first.
        """
        check_nonempty(kind, "kind", 64)
        check_nonempty(entry_hash, "entry_hash", 128)
        check_nonempty(prev_hash, "prev_hash", 128)
        if not isinstance(signature, bytes | bytearray) or not signature:
            raise ValidationError("signature must be non-empty bytes")
        clean = check_json(payload, "payload")
        at = self._now(created_at, "created_at")
        try:
            with self._write() as s:
                self._lock_table(s, "ledger_entries")
                last = s.scalars(select(t.LedgerEntry).order_by(t.LedgerEntry.seq.desc()).limit(1)).first()
                if last is not None and prev_hash != last.entry_hash:
                    raise ReplayError(f"prev_hash does not match ledger head {last.seq}", code="ledger_conflict")
                row = t.LedgerEntry(
                    seq=1 if last is None else last.seq + 1,
                    prev_hash=prev_hash,
                    entry_hash=entry_hash,
                    kind=kind,
                    payload=clean,
                    signature=bytes(signature),
                    created_at=at,
                )
                s.add(row)
                s.flush()
                return snapshot(LedgerRow, row)
        except IntegrityError as exc:
            raise ReplayError("ledger entry hash already present", code="ledger_conflict") from exc

    def ledger(self, limit: int | None = None) -> list[LedgerRow]:
        """Entries in ascending ``seq``; with ``limit``, the newest ``limit`` of them."""
        with self._read() as s:
            stmt = select(t.LedgerEntry).order_by(t.LedgerEntry.seq.desc())
            if limit is not None:
                stmt = stmt.limit(finite_int(limit, "limit", 0))
            return [snapshot(LedgerRow, r) for r in reversed(list(s.scalars(stmt)))]

    def last_ledger_entry(self) -> LedgerRow | None:
        with self._read() as s:
            row = s.scalars(select(t.LedgerEntry).order_by(t.LedgerEntry.seq.desc()).limit(1)).first()
            return None if row is None else snapshot(LedgerRow, row)
