"""Store operations for enrollment tokens, devices and sessions."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qflare.errors import (
    ReplayError,
    RevokedError,
    SessionExpiredError,
    TokenError,
    UnknownDeviceError,
    ValidationError,
)
from qflare.storage import tables as t
from qflare.storage._base import Clock, StoreBase, check_nonempty, finite_int, require_aware, utc_now
from qflare.storage.db import Database
from qflare.storage.records import DeviceRow, SessionRow, TokenRow, snapshot
from qflare.storage.status_cache import ActiveDeviceCache

__all__ = ["IdentityOps", "hash_token", "key_id"]

_MAX_TOKENS_PER_CALL = 10_000
_USABLE = ("active", "quarantined")  # may hold sessions; only an active device is selected


def hash_token(token: str) -> str:
    """SHA-256 hex of an enrollment token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def key_id(public_key: bytes) -> str:
    """A device's id: SHA-256 hex of its ML-DSA public key."""
    return hashlib.sha256(public_key).hexdigest()


class IdentityOps(StoreBase):
    def __init__(self, db: Database, *, clock: Clock = utc_now) -> None:
        super().__init__(db, clock=clock)
        self._active_devices = ActiveDeviceCache()

    # -- enrollment tokens --------------------------------------------------------------------

    def create_tokens(self, count: int, ttl: timedelta, label: str = "", *, now: datetime | None = None) -> list[str]:
        """Mint ``count`` single-use tokens valid for ``ttl``; return the plaintexts (shown once)."""
        finite_int(count, "count", 1)
        if count > _MAX_TOKENS_PER_CALL:
            raise ValidationError(f"at most {_MAX_TOKENS_PER_CALL} tokens per call")
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise ValidationError("ttl must be a positive timedelta")
        if not isinstance(label, str) or len(label) > 200 or "\x00" in label:
            raise ValidationError("label must be a string of at most 200 characters")
        created = self._now(now)
        tokens = [secrets.token_urlsafe(32) for _ in range(count)]
        with self._write() as s:
            s.add_all(
                t.EnrollmentToken(
                    token_hash=hash_token(tok),
                    created_at=created,
                    expires_at=created + ttl,
                    used_at=None,
                    used_by_device=None,
                    label=label,
                )
                for tok in tokens
            )
        return tokens

    def get_token(self, token: str) -> TokenRow | None:
        with self._read() as s:
            row = s.get(t.EnrollmentToken, hash_token(token))
            return None if row is None else snapshot(TokenRow, row)

    def consume_token(self, token: str, device_id: str, now: datetime | None = None) -> None:
        """Atomically mark ``token`` used by ``device_id``; exactly one concurrent caller wins."""
        at = self._now(now)
        with self._write() as s:
            self._consume_token(s, token, device_id, at)

    def _consume_token(self, s: Session, token: str, device_id: str, at: datetime) -> None:
        token_hash = hash_token(token)
        stmt = (
            update(t.EnrollmentToken)
            .where(
                t.EnrollmentToken.token_hash == token_hash,
                t.EnrollmentToken.used_at.is_(None),
                t.EnrollmentToken.revoked_at.is_(None),
                t.EnrollmentToken.expires_at > at,
            )
            .values(used_at=at, used_by_device=device_id)
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], s.execute(stmt)).rowcount == 1:
            return
        row = s.get(t.EnrollmentToken, token_hash)
        if row is None:
            raise TokenError("unknown enrollment token", code="token_unknown")
        if row.used_at is not None:
            raise TokenError("enrollment token already used", code="token_used")
        if row.revoked_at is not None:
            raise TokenError("enrollment token revoked", code="token_revoked")
        raise TokenError("enrollment token expired", code="token_expired")

    def list_tokens(self, limit: int = 200) -> list[TokenRow]:
        """The newest ``limit`` tokens (hashes and metadata only: plaintexts are never stored), newest first."""
        finite_int(limit, "limit", 0)
        with self._read() as s:
            stmt = (
                select(t.EnrollmentToken)
                .order_by(t.EnrollmentToken.created_at.desc(), t.EnrollmentToken.token_hash)
                .limit(limit)
            )
            return [snapshot(TokenRow, r) for r in s.scalars(stmt)]

    def revoke_token(self, token_hash: str, *, now: datetime | None = None) -> TokenRow:
        """Revoke an unused token by its hash.  Revoking twice keeps the first time; a used token cannot be
        revoked (TokenError ``token_used``); an unknown hash is TokenError ``token_unknown``."""
        check_nonempty(token_hash, "token_hash", 64)
        at = self._now(now)
        with self._write() as s:
            row = s.get(t.EnrollmentToken, token_hash, with_for_update=True)
            if row is None:
                raise TokenError("unknown enrollment token", code="token_unknown")
            if row.used_at is not None:
                raise TokenError("enrollment token already used: revoke the device instead", code="token_used")
            if row.revoked_at is None:
                row.revoked_at = at
                s.flush()
            return snapshot(TokenRow, row)

    # -- devices ------------------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        sig_alg: str,
        sig_public_key: bytes,
        enrollment_record: bytes,
        *,
        enrolled_at: datetime | None = None,
    ) -> DeviceRow:
        """Register an active device.  ``device_id`` must be ``key_id(sig_public_key)``."""
        at = self._now(enrolled_at, "enrolled_at")
        try:
            with self._write() as s:
                return self._insert_device(s, device_id, sig_alg, sig_public_key, enrollment_record, at)
        except IntegrityError as exc:  # lost a race with a concurrent enrollment of the same key
            raise ReplayError(f"device {device_id} already enrolled", code="device_exists") from exc

    def enroll_device(
        self,
        token: str,
        device_id: str,
        sig_alg: str,
        sig_public_key: bytes,
        enrollment_record: bytes,
        *,
        now: datetime | None = None,
    ) -> DeviceRow:
        """Consume ``token`` and add the device in ONE transaction: both happen or neither."""
        at = self._now(now)
        try:
            with self._write() as s:
                self._consume_token(s, token, device_id, at)
                return self._insert_device(s, device_id, sig_alg, sig_public_key, enrollment_record, at)
        except IntegrityError as exc:
            raise ReplayError(f"device {device_id} already enrolled", code="device_exists") from exc

    def _insert_device(
        self, s: Session, device_id: str, sig_alg: str, key: bytes, record: bytes, at: datetime
    ) -> DeviceRow:
        check_nonempty(sig_alg, "sig_alg", 32)
        if not isinstance(key, bytes | bytearray) or not key:
            raise ValidationError("sig_public_key must be non-empty bytes")
        if not isinstance(record, bytes | bytearray):
            raise ValidationError("enrollment_record must be bytes")
        if device_id != key_id(bytes(key)):
            raise ValidationError("device_id is not the SHA-256 of the public key", code="device_id_mismatch")
        if s.get(t.Device, device_id) is not None:
            raise ReplayError(f"device {device_id} already enrolled", code="device_exists")
        row = t.Device(
            device_id=device_id,
            sig_alg=sig_alg,
            sig_public_key=bytes(key),
            status="active",
            enrolled_at=at,
            revoked_at=None,
            revoked_reason=None,
            enrollment_record=bytes(record),
        )
        s.add(row)
        s.flush()
        return snapshot(DeviceRow, row)

    def get_device(self, device_id: str) -> DeviceRow | None:
        with self._read() as s:
            row = s.get(t.Device, device_id)
            return None if row is None else snapshot(DeviceRow, row)

    def device_status(self, device_id: str) -> str | None:
        """Just the device's status ("active"/"revoked"), None if unknown: the per-message check.  A
        device read as active is remembered until :meth:`revoke_device` revokes it (see
        :mod:`qflare.storage.status_cache`); otherwise one indexed Core query."""
        return self._active_devices.status(device_id, self._read_device_status)

    def _read_device_status(self, device_id: str) -> str | None:
        with self.db.connect(write=False) as conn:
            return conn.execute(select(t.Device.status).where(t.Device.device_id == device_id)).scalar_one_or_none()

    def active_device(self, device_id: str) -> DeviceRow:
        """The device, or UnknownDeviceError / RevokedError."""
        device = self.get_device(device_id)
        if device is None:
            raise UnknownDeviceError(f"unknown device {device_id}")
        if not device.active:
            raise RevokedError(f"device {device_id} is revoked")
        return device

    def revoke_device(self, device_id: str, reason: str, *, now: datetime | None = None) -> DeviceRow:
        """Revoke a device and close its open sessions.  Revoking twice keeps the first record."""
        check_nonempty(reason, "reason", 2000)
        at = self._now(now)
        self._active_devices.forget(device_id)  # before the write and once it has committed: see status_cache
        try:
            return self._revoke(device_id, reason, at)
        finally:
            self._active_devices.forget(device_id)

    def _revoke(self, device_id: str, reason: str, at: datetime) -> DeviceRow:
        with self._write() as s:
            row = s.get(t.Device, device_id, with_for_update=True)
            if row is None:
                raise UnknownDeviceError(f"unknown device {device_id}")
            if row.status != "revoked":
                row.status, row.revoked_at, row.revoked_reason = "revoked", at, reason
                row.quarantined_at, row.quarantine_reason = None, None
                s.execute(
                    update(t.Session)
                    .where(t.Session.device_id == device_id, t.Session.closed_at.is_(None))
                    .values(closed_at=at, wrapped_keys=None)  # a closed session's keys are gone for good
                    .execution_options(synchronize_session=False)
                )
                s.flush()
            return snapshot(DeviceRow, row)

    def quarantine_device(self, device_id: str, reason: str, *, now: datetime | None = None) -> DeviceRow:
        """Quarantine an active device (not selected, updates refused; sessions kept).  Quarantining a
        quarantined device keeps the first record; a revoked one raises RevokedError."""
        check_nonempty(reason, "reason", 2000)
        at = self._now(now)
        self._active_devices.forget(device_id)  # the cache holds "active" only: forget it, as revocation does
        try:
            with self._write() as s:
                row = s.get(t.Device, device_id, with_for_update=True)
                if row is None:
                    raise UnknownDeviceError(f"unknown device {device_id}")
                if row.status == "revoked":
                    raise RevokedError(f"device {device_id} is revoked")
                if row.status == "active":
                    row.status, row.quarantined_at, row.quarantine_reason = "quarantined", at, reason
                    s.flush()
                return snapshot(DeviceRow, row)
        finally:
            self._active_devices.forget(device_id)

    def reinstate_device(self, device_id: str) -> DeviceRow:
        """Make a quarantined device active again.  An active device is left as it is; a revoked one
        raises RevokedError (revocation is final)."""
        with self._write() as s:
            row = s.get(t.Device, device_id, with_for_update=True)
            if row is None:
                raise UnknownDeviceError(f"unknown device {device_id}")
            if row.status == "revoked":
                raise RevokedError(f"device {device_id} is revoked: only a quarantined device can be reinstated")
            if row.status == "quarantined":
                row.status, row.quarantined_at, row.quarantine_reason = "active", None, None
                s.flush()
            return snapshot(DeviceRow, row)

    def list_devices(self, status: str | None = None) -> list[DeviceRow]:
        with self._read() as s:
            stmt = select(t.Device).order_by(t.Device.enrolled_at, t.Device.device_id)
            if status is not None:
                stmt = stmt.where(t.Device.status == status)
            return [snapshot(DeviceRow, r) for r in s.scalars(stmt)]

    def last_seen(self) -> dict[str, datetime]:
        """Per device, the latest time it opened a session (handshake), sent a frame that authenticated on
        a shared session (any coordinator process's, see ``add_shared_session``) or sent an update: its
        last contact."""
        with self._read() as s:
            seen: dict[str, datetime] = {}
            for table_key, column in (
                (t.Session.device_id, t.Session.created_at),
                (t.Session.device_id, t.Session.last_seen_at),
                (t.Update.device_id, t.Update.received_at),
            ):
                for device, at in s.execute(select(table_key, func.max(column)).group_by(table_key)):
                    if at is not None and (device not in seen or at > seen[device]):
                        seen[device] = at
            return seen

    # -- sessions -----------------------------------------------------------------------------

    def add_session(
        self,
        session_id: str,
        device_id: str,
        expires_at: datetime,
        *,
        created_at: datetime | None = None,
    ) -> SessionRow:
        """Record a session for an active device (the session key itself is never stored)."""
        return self._add_session(session_id, device_id, expires_at, created_at, None)

    def add_shared_session(
        self,
        session_id: str,
        device_id: str,
        expires_at: datetime,
        *,
        wrapped_keys: bytes,
        created_at: datetime | None = None,
    ) -> SessionRow:
        """Record a session of coordinators that share their sessions: its wrapped keys, its counters at
        their start (nothing received yet, the first reply sealed with 0), seen at ``created_at``; the
        device's other open sessions are closed in the same transaction (a new handshake replaces them)."""
        if not isinstance(wrapped_keys, bytes | bytearray) or not wrapped_keys:
            raise ValidationError("wrapped_keys must be non-empty bytes")
        return self._add_session(session_id, device_id, expires_at, created_at, bytes(wrapped_keys))

    def _add_session(
        self, session_id: str, device_id: str, expires_at: datetime, created_at: datetime | None, wrapped: bytes | None
    ) -> SessionRow:
        check_nonempty(session_id, "session_id", 128)
        created = self._now(created_at, "created_at")
        expires = require_aware(expires_at, "expires_at")
        if expires <= created:
            raise ValidationError("session expires_at must be after created_at")
        try:
            with self._write() as s:
                device = s.get(t.Device, device_id, with_for_update={"read": True})
                if device is None:
                    raise UnknownDeviceError(f"unknown device {device_id}")
                if device.status not in _USABLE:
                    raise RevokedError(f"device {device_id} is revoked")
                if s.get(t.Session, session_id) is not None:
                    raise ReplayError(f"session {session_id} exists", code="session_exists")
                row = t.Session(
                    session_id=session_id,
                    device_id=device_id,
                    created_at=created,
                    expires_at=expires,
                    closed_at=None,
                )
                if wrapped is not None:
                    s.execute(
                        update(t.Session)
                        .where(t.Session.device_id == device_id, t.Session.closed_at.is_(None))
                        .values(closed_at=created, wrapped_keys=None)
                        .execution_options(synchronize_session=False)
                    )
                    row.wrapped_keys, row.last_recv, row.next_send, row.last_seen_at = wrapped, -1, 0, created
                s.add(row)
                s.flush()
                return snapshot(SessionRow, row)
        except IntegrityError as exc:
            raise ReplayError(f"session {session_id} exists", code="session_exists") from exc

    def get_session(self, session_id: str) -> SessionRow | None:
        with self._read() as s:
            row = s.get(t.Session, session_id)
            return None if row is None else snapshot(SessionRow, row)

    def active_session(self, session_id: str, now: datetime | None = None) -> SessionRow:
        """A live session of an active device, else SessionExpiredError / RevokedError."""
        at = self._now(now)
        with self._read() as s:
            row = s.get(t.Session, session_id)
            if row is None:
                raise SessionExpiredError("unknown session", code="unknown_session")
            device = s.get(t.Device, row.device_id)
            if device is None or device.status not in _USABLE:
                raise RevokedError(f"device {row.device_id} is revoked")
            if row.closed_at is not None:
                raise SessionExpiredError("session closed", code="session_closed")
            if at >= row.expires_at:
                raise SessionExpiredError("session expired")
            return snapshot(SessionRow, row)

    def close_session(self, session_id: str, *, now: datetime | None = None) -> bool:
        """Close a session; ``True`` if this call closed it, ``False`` if already closed/unknown."""
        at = self._now(now)
        with self._write() as s:
            stmt = (
                update(t.Session)
                .where(t.Session.session_id == session_id, t.Session.closed_at.is_(None))
                .values(closed_at=at, wrapped_keys=None)
                .execution_options(synchronize_session=False)
            )
            return cast(CursorResult[Any], s.execute(stmt)).rowcount == 1
