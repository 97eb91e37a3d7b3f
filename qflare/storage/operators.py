"""Store operations for operator (dashboard) sessions: random ids, stored only as SHA-256 hashes, with expiry."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, update

from qflare.errors import ValidationError
from qflare.storage import tables as t
from qflare.storage._base import StoreBase, check_nonempty

__all__ = ["OperatorOps", "hash_session_id"]


def hash_session_id(session_id: str) -> str:
    """SHA-256 hex of an operator session id: the only form in which it is stored."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


class OperatorOps(StoreBase):
    def add_operator_session(
        self, session_id: str, lifetime: timedelta, *, method: str, remote_addr: str | None, now: datetime | None = None
    ) -> datetime:
        """Record a new operator session; return when it expires."""
        check_nonempty(session_id, "session_id", 256)
        check_nonempty(method, "method", 16)
        if not isinstance(lifetime, timedelta) or lifetime <= timedelta(0):
            raise ValidationError("lifetime must be a positive timedelta")
        at = self._now(now)
        with self._write() as s:
            # expired sessions go as new ones come: the table stays the size of the live logins
            s.execute(delete(t.OperatorSession).where(t.OperatorSession.expires_at <= at))
            s.add(
                t.OperatorSession(
                    id_hash=hash_session_id(session_id),
                    created_at=at,
                    expires_at=at + lifetime,
                    closed_at=None,
                    remote_addr=None if remote_addr is None else remote_addr[:64],
                    method=method,
                )
            )
        return at + lifetime

    def operator_session_valid(self, session_id: str, *, now: datetime | None = None) -> bool:
        """Whether ``session_id`` names a live (not closed, not expired) operator session."""
        if not isinstance(session_id, str) or not session_id or len(session_id) > 256:
            return False
        at = self._now(now)
        with self._read() as s:
            row = s.get(t.OperatorSession, hash_session_id(session_id))
            return row is not None and row.closed_at is None and at < row.expires_at

    def close_operator_session(self, session_id: str, *, now: datetime | None = None) -> bool:
        """Log out: ``True`` if this call closed a live session."""
        at = self._now(now)
        with self._write() as s:
            stmt = (
                update(t.OperatorSession)
                .where(t.OperatorSession.id_hash == hash_session_id(session_id), t.OperatorSession.closed_at.is_(None))
                .values(closed_at=at)
                .execution_options(synchronize_session=False)
            )
            return cast(CursorResult[Any], s.execute(stmt)).rowcount == 1
