"""SQLAlchemy 2 declarative models for the coordinator's persistent state.

Every timestamp column is a timezone-aware UTC ``datetime`` in Python (see :class:`UTCDateTime`);
naive datetimes are refused on write.  Secrets never reach these tables in plaintext: enrollment tokens
are stored only as SHA-256 hashes, and session keys are not stored at all, except by coordinators that
share their sessions (``CoordinatorConfig.shared_sessions``), which store them wrapped
(:mod:`qflare.crypto.wrap`).

``migrations/versions`` mirrors this module by hand; ``tests/test_storage.py`` asserts that
Alembic's autogenerate comparison finds no difference between the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "DEVICE_STATUSES",
    "NAMING_CONVENTION",
    "ROUND_STATES",
    "Base",
    "Device",
    "EnrollmentToken",
    "HelloDigest",
    "LedgerEntry",
    "ModelVersion",
    "OperatorSession",
    "PendingHandshake",
    "Round",
    "SecAggRound",
    "SecurityEvent",
    "Session",
    "UTCDateTime",
    "Update",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEVICE_STATUSES: tuple[str, ...] = ("active", "revoked", "quarantined")
ROUND_STATES: tuple[str, ...] = ("open", "aggregating", "closed", "failed")

_HASH = String(128)  # hex digests (SHA-256 today; room for SHA3-512)
_DEVICE_ID = String(64)  # SHA-256 hex of the device's ML-DSA public key
_SESSION_ID = String(128)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that only accepts aware datetimes and always returns UTC.

    SQLite has no time zone type, so values are normalised to UTC and stored naive there; that keeps
    the stored text lexically ordered, so ``expires_at > :now`` comparisons stay correct.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime refused: pass a timezone-aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (CheckConstraint(_in("status", DEVICE_STATUSES), name="status"),)

    device_id: Mapped[str] = mapped_column(_DEVICE_ID, primary_key=True)
    sig_alg: Mapped[str] = mapped_column(String(32))
    sig_public_key: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[str | None] = mapped_column(Text)
    enrollment_record: Mapped[bytes] = mapped_column(LargeBinary)
    quarantined_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    quarantine_reason: Mapped[str | None] = mapped_column(Text)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    used_by_device: Mapped[str | None] = mapped_column(_DEVICE_ID)
    label: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When an operator revoked the (unused) token; a revoked token no longer enrolls anyone."""


class Session(Base):
    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(_SESSION_ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The columns below are set only for the sessions of coordinators that share them (migration 0007;
    # qflare.protocol.shared_state): NULL for a session one coordinator process keeps in memory.
    wrapped_keys: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The channel keys, suite and lifetime, wrapped under the coordinator's state key (AAD: session id)."""
    last_recv: Mapped[int | None] = mapped_column(BigInteger)
    """The counter of the last frame accepted from the device (-1 before any)."""
    next_send: Mapped[int | None] = mapped_column(BigInteger)
    """The counter the next reply will be sealed with: reserved, in the statement accepting a frame."""
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When a frame last authenticated on this session (or it was made): the device's liveness."""


class PendingHandshake(Base):
    """A handshake of coordinators that share their sessions: SERVER_HELLO sent, CLIENT_FINISH awaited.
    Keyed by SHA-256 (hex) of the SERVER_HELLO; ``state`` is the server side's state, wrapped."""

    __tablename__ = "pending_handshakes"

    hello_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(_DEVICE_ID)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class HelloDigest(Base):
    """The CLIENT_HELLO replay cache of coordinators that share their sessions: SHA-256 (hex) of each
    hello answered, until it could no longer be fresh."""

    __tablename__ = "hello_digests"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        CheckConstraint(_in("state", ROUND_STATES), name="state"),
        CheckConstraint("min_participants >= 1", name="min_participants"),
        CheckConstraint("quorum >= 1", name="quorum"),
    )

    round_number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16), index=True)
    base_model_hash: Mapped[str] = mapped_column(_HASH)
    selected_devices: Mapped[list[str]] = mapped_column(JSON)
    min_participants: Mapped[int] = mapped_column(Integer)
    quorum: Mapped[int] = mapped_column(Integer)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result_model_hash: Mapped[str | None] = mapped_column(_HASH)


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("round_number", "device_id"),
        CheckConstraint("num_examples >= 0", name="num_examples"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_number: Mapped[int] = mapped_column(ForeignKey("rounds.round_number"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), index=True)
    update_hash: Mapped[str] = mapped_column(_HASH)
    base_model_hash: Mapped[str] = mapped_column(_HASH)
    num_examples: Mapped[int] = mapped_column(Integer)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    envelope: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The exact signed UPDATE envelope the device sent (re-verifiable from the database alone); NULL only
    for updates stored before migration 0002."""


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    round_number: Mapped[int | None] = mapped_column(ForeignKey("rounds.round_number"))
    model_hash: Mapped[str] = mapped_column(_HASH, index=True)
    parent_hash: Mapped[str | None] = mapped_column(_HASH)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SecurityEvent(Base):
    """Refused requests and other security-relevant facts.

    ``device_id``/``session_id`` are deliberately not foreign keys: they are whatever the (possibly
    hostile) peer claimed, and must be recordable even when no such device or session exists.
    """

    __tablename__ = "security_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    device_id: Mapped[str | None] = mapped_column(String(128))
    session_id: Mapped[str | None] = mapped_column(_SESSION_ID)
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    remote_addr: Mapped[str | None] = mapped_column(String(64))


class LedgerEntry(Base):
    """One provenance ledger entry (qflare.ledger, docs/provenance.md): ``body`` is the exact canonical
    bytes that ``entry_hash`` hashes and the signatures sign; ``signatures`` is ``[[key id, hex], ...]``."""

    __tablename__ = "ledger_entries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    round_number: Mapped[int | None] = mapped_column(Integer, index=True)
    kind: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(_HASH)
    entry_hash: Mapped[str] = mapped_column(_HASH, unique=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    signatures: Mapped[list[list[str]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OperatorSession(Base):
    """A dashboard login (qflare.server.dashboard): only the SHA-256 of the random session id is stored,
    so a copy of the database cannot be replayed as a cookie."""

    __tablename__ = "operator_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(16))


class SecAggRound(Base):
    """The coordinator's state of an open secure-aggregation round (qflare.protocol.secure_round): its
    public configuration, :meth:`qflare.secagg.SecAggServer.snapshot` (every accepted phase message, the
    phase) and the running sum of the masked inputs, rewritten in the transaction that accepts each
    message.  ``unmasking_at`` is stamped before the masks are removed: a restart that finds it set fails
    the round instead of unmasking a second time."""

    __tablename__ = "secagg_rounds"

    round_number: Mapped[int] = mapped_column(ForeignKey("rounds.round_number"), primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(Text)
    total: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # loaded when read, not when rewritten
    phase_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    unmasking_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
