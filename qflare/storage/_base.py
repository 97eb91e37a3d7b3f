"""Shared plumbing for the store's operation groups: clock, transactions, locks, input checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from qflare.errors import StorageFullError, ValidationError
from qflare.storage.db import Database

__all__ = [
    "Clock",
    "StoreBase",
    "check_json",
    "check_nonempty",
    "disk_full",
    "finite_int",
    "require_aware",
    "utc_now",
]

#: How long a device is told to wait (``Retry-After``) when the database cannot be written.
DB_FULL_RETRY_AFTER_S = 30.0
_FULL_MARKERS = ("database or disk is full", "no space left on device", "disk quota exceeded", "could not extend file")


def disk_full(exc: OperationalError) -> bool:
    """Whether a database error says the disk (or quota) is full: SQLITE_FULL, ENOSPC, SQLSTATE 53100."""
    if getattr(exc.orig, "sqlstate", None) == "53100" or getattr(exc.orig, "pgcode", None) == "53100":
        return True
    text_ = str(exc.orig).lower()
    return any(marker in text_ for marker in _FULL_MARKERS)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def require_aware(value: datetime, name: str) -> datetime:
    """Refuse naive datetimes (a programming error, hence ``ValueError``); return it in UTC."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC)")
    return value.astimezone(UTC)


def check_json(value: Any, name: str) -> dict[str, Any]:
    """A JSON object both SQLite and PostgreSQL accept: no NaN/Infinity, string keys only."""
    if not isinstance(value, dict):
        raise ValidationError(f"{name} must be a JSON object", code="bad_json")
    try:
        encoded = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{name} is not strict JSON: {exc}", code="bad_json") from exc
    if "\\u0000" in encoded:  # PostgreSQL's json type refuses NUL
        raise ValidationError(f"{name} contains a NUL character", code="bad_json")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def check_nonempty(value: str, name: str, max_len: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or "\x00" in value:
        raise ValidationError(f"{name} must be a non-empty string of at most {max_len} characters")
    return value


def finite_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value > 2**31 - 1:  # INTEGER columns on PostgreSQL
        raise ValidationError(f"{name} is out of range: {value!r}")
    return value


class StoreBase:
    """Owns the :class:`Database` and the clock; every public operation is one transaction."""

    def __init__(self, db: Database, *, clock: Clock = utc_now) -> None:
        self.db = db
        self._clock = clock
        self.write_error: str | None = None
        """Why the last write transaction failed for a full disk, until one succeeds again."""

    def _now(self, given: datetime | None = None, name: str = "now") -> datetime:
        return require_aware(self._clock() if given is None else given, name)

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction; a full disk becomes StorageFullError (rolled back: nothing written)."""
        try:
            with self.db.transaction(write=True) as session:
                yield session
        except OperationalError as exc:
            if not disk_full(exc):
                raise
            self.write_error = str(exc.orig).splitlines()[0][:300]
            raise StorageFullError(
                f"the coordinator cannot write its database: {self.write_error}", retry_after_s=DB_FULL_RETRY_AFTER_S
            ) from exc
        self.write_error = None

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self.db.transaction(write=False) as session:
            yield session

    def _lock_table(self, session: Session, table: str) -> None:
        """Serialise writers of ``table`` for the rest of the transaction.

        SQLite write transactions already hold the database's single write lock (``BEGIN
        IMMEDIATE``); on PostgreSQL ``SHARE ROW EXCLUSIVE`` conflicts with itself and with row
        writers, but not with plain reads or ``SELECT ... FOR SHARE``.
        """
        if self.db.dialect == "postgresql":
            session.execute(text(f'LOCK TABLE "{table}" IN SHARE ROW EXCLUSIVE MODE'))
