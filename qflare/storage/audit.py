"""Store operations for security events."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from qflare.storage import tables as t
from qflare.storage._base import StoreBase, finite_int, require_aware
from qflare.storage.records import SecurityEventRow, snapshot

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
