"""Store operations for the connection state of coordinators that share their sessions (migration 0007).

Several coordinator processes on one database serve one federation (``CoordinatorConfig.shared_sessions``,
:mod:`qflare.protocol.shared_state`): the hello replay cache, the pending handshakes and each session's
counters live here, and every step that must happen once is one atomic statement — a hello is recorded by
``INSERT ... ON CONFLICT DO NOTHING``, a pending handshake is taken by ``DELETE ... RETURNING``, and a
frame's counter is accepted (and the reply's counter reserved) by ``UPDATE ... WHERE last_recv < :counter
RETURNING``, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, insert, or_, select, union, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qflare.errors import ReplayError, ValidationError
from qflare.storage import tables as t
from qflare.storage._base import StoreBase, check_nonempty, require_aware
from qflare.storage.records import PendingHandshakeRow, SharedSessionRow

__all__ = ["SharedSessionOps"]

_MAX_SEND = 2**63 - 1  # BIGINT's largest value: the next_send + 1 of a session at it would overflow
_HEX64 = frozenset("0123456789abcdef")


def _digest(value: str, name: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not _HEX64.issuperset(value):
        raise ValidationError(f"{name} must be 64 lowercase hex characters")
    return value


class SharedSessionOps(StoreBase):
    # -- sessions -----------------------------------------------------------------------------

    def shared_session(self, session_id: str, *, with_keys: bool = False) -> SharedSessionRow | None:
        """The session (counters, expiry, closure) and its device's status: one indexed read.  With
        ``with_keys``, also its wrapped keys and the device's public key."""
        s, d = t.Session, t.Device
        columns: list[Any] = [
            s.session_id,
            s.device_id,
            s.created_at,
            s.expires_at,
            s.closed_at,
            s.last_recv,
            s.next_send,
            d.status,
        ]
        if with_keys:
            columns += [s.wrapped_keys, d.sig_alg, d.sig_public_key]
        stmt = select(*columns).join(d, d.device_id == s.device_id).where(s.session_id == session_id)
        with self.db.connect(write=False) as conn:
            row = conn.execute(stmt).one_or_none()
        return None if row is None else SharedSessionRow(*row)

    def advance_session(self, session_id: str, counter: int, *, now: datetime) -> int | None:
        """Accept frame ``counter`` on an open, unexpired shared session: in ONE statement, record it as the
        last received counter if it is above the stored one, stamp ``last_seen_at``, and reserve the next
        send counter, which is returned.  None (nothing changed) when the counter is not above the stored
        one, or the session is unknown, closed, expired, not shared or out of send counters."""
        if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter <= _MAX_SEND:
            raise ValidationError(f"frame counter out of range: {counter!r}")
        at = require_aware(now, "now")
        s = t.Session
        stmt = (
            update(s)
            .where(
                s.session_id == session_id,
                s.last_recv < counter,
                s.closed_at.is_(None),
                s.expires_at > at,
                s.next_send < _MAX_SEND,
            )
            .values(last_recv=counter, next_send=s.next_send + 1, last_seen_at=at)
            .returning(s.next_send)
            .execution_options(synchronize_session=False)
        )
        with self._write() as session:
            after = session.execute(stmt).scalar_one_or_none()
        return None if after is None else int(after) - 1

    def live_device_ids(self, *, now: datetime, seen_since: datetime) -> set[str]:
        """Devices holding an open, unexpired shared session, or seen since ``seen_since`` by any process:
        a frame authenticated on (or the handshake of) one of their shared sessions, or their enrollment."""
        at, since = require_aware(now, "now"), require_aware(seen_since, "seen_since")
        s = t.Session
        in_session = select(s.device_id).where(
            or_(
                (s.last_recv.is_not(None)) & s.closed_at.is_(None) & (s.expires_at > at),
                s.last_seen_at >= since,
            )
        )
        enrolled = select(t.Device.device_id).where(t.Device.enrolled_at >= since)
        with self.db.connect(write=False) as conn:
            return {str(d) for d in conn.execute(union(in_session, enrolled)).scalars()}

    # -- the hello replay cache ----------------------------------------------------------------

    def hello_seen(self, digest: str) -> bool:
        """Whether this CLIENT_HELLO digest was recorded (expired or not: one past its expiry is stale)."""
        stmt = select(t.HelloDigest.digest).where(t.HelloDigest.digest == _digest(digest, "digest"))
        with self.db.connect(write=False) as conn:
            return conn.execute(stmt).first() is not None

    def record_hello(self, digest: str, *, expires_at: datetime, now: datetime, purge: bool = False) -> bool:
        """Record a CLIENT_HELLO digest: False when it already was (a replay; exactly one concurrent caller
        gets True).  ``purge`` first deletes the expired digests and pending handshakes, in the same
        transaction."""
        values = {"digest": _digest(digest, "digest"), "expires_at": require_aware(expires_at, "expires_at")}
        dialect = postgresql if self.db.dialect == "postgresql" else sqlite
        stmt = (
            dialect.insert(t.HelloDigest)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["digest"])
            .returning(t.HelloDigest.digest)
        )
        with self._write() as s:
            if purge:
                self._purge(s, require_aware(now, "now"))
            return s.execute(stmt).scalar_one_or_none() is not None

    # -- pending handshakes --------------------------------------------------------------------

    def put_pending_handshake(
        self, hello_hash: str, device_id: str, state: bytes, *, started_at: datetime, expires_at: datetime
    ) -> None:
        """Keep an answered handshake's wrapped state until ``take_pending_handshake``; the expired ones
        are deleted in the same transaction (an indexed range: cheap)."""
        check_nonempty(device_id, "device_id", 64)
        if not isinstance(state, bytes | bytearray) or not state:
            raise ValidationError("state must be non-empty bytes")
        started = require_aware(started_at, "started_at")
        row = {
            "hello_hash": _digest(hello_hash, "hello_hash"),
            "device_id": device_id,
            "state": bytes(state),
            "started_at": started,
            "expires_at": require_aware(expires_at, "expires_at"),
        }
        try:
            with self._write() as s:
                s.execute(delete(t.PendingHandshake).where(t.PendingHandshake.expires_at <= started))
                s.execute(insert(t.PendingHandshake).values(**row))
        except IntegrityError as exc:
            raise ReplayError("a handshake with this server hello is already pending", code="replay") from exc

    def take_pending_handshake(self, hello_hash: str) -> PendingHandshakeRow | None:
        """Remove and return the pending handshake (expired or not): of concurrent callers exactly one gets it."""
        p = t.PendingHandshake
        stmt = (
            delete(p)
            .where(p.hello_hash == _digest(hello_hash, "hello_hash"))
            .returning(p.hello_hash, p.device_id, p.state, p.started_at, p.expires_at)
        )
        with self._write() as s:
            row = s.execute(stmt).one_or_none()
        return None if row is None else PendingHandshakeRow(*row)

    def count_pending_handshakes(self, *, now: datetime) -> int:
        """Unexpired pending handshakes (every process's)."""
        at = require_aware(now, "now")
        stmt = select(func.count()).select_from(t.PendingHandshake).where(t.PendingHandshake.expires_at > at)
        with self.db.connect(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def purge_shared_state(self, *, now: datetime) -> int:
        """Delete expired hello digests and pending handshakes; how many rows went."""
        with self._write() as s:
            return self._purge(s, require_aware(now, "now"))

    def _purge(self, s: Session, at: datetime) -> int:
        gone = 0
        for table in (t.HelloDigest, t.PendingHandshake):
            result = s.execute(delete(table).where(table.expires_at <= at))
            gone += int(cast(CursorResult[Any], result).rowcount)
        # an expired session's wrapped keys are of no use to anyone but a later reader of this database
        s.execute(
            update(t.Session)
            .where(t.Session.expires_at <= at, t.Session.wrapped_keys.is_not(None))
            .values(wrapped_keys=None)
        )
        return gone
