"""Immutable snapshots of stored rows: the values the store interface (:mod:`.store`) returns.

The store never hands out live ORM objects: a snapshot cannot lazy-load, cannot be flushed back by
accident, and is safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "DeviceRow",
    "LedgerRow",
    "ModelRow",
    "NewUpdate",
    "PendingHandshakeRow",
    "RoundRow",
    "SecAggRoundRow",
    "SecurityEventRow",
    "SessionRow",
    "SharedSessionRow",
    "TokenRow",
    "UpdateRow",
]


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    sig_alg: str
    sig_public_key: bytes
    status: str
    enrolled_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None
    enrollment_record: bytes
    quarantined_at: datetime | None = None
    quarantine_reason: str | None = None
    """Why threat detection (or an operator) quarantined the device, while it is quarantined."""

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def usable(self) -> bool:
        """Not revoked: an active or a quarantined device may hold sessions (a quarantined one is only
        not selected, and its updates are refused)."""
        return self.status in ("active", "quarantined")


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_hash: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_device: str | None
    label: str
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    device_id: str
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None

    def is_live(self, now: datetime) -> bool:
        return self.closed_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class SharedSessionRow:
    """A session of coordinators that share their sessions (``CoordinatorConfig.shared_sessions``), with
    its device's status: ``last_recv`` / ``next_send`` are its counters (None for a session one process
    keeps in memory); the wrapped keys and the device's public key are read only when asked for."""

    session_id: str
    device_id: str
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    last_recv: int | None
    next_send: int | None
    device_status: str
    wrapped_keys: bytes | None = None
    sig_alg: str | None = None
    sig_public_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class PendingHandshakeRow:
    """A handshake answered (SERVER_HELLO sent) and awaiting its CLIENT_FINISH, keyed by SHA-256 of the
    SERVER_HELLO; ``state`` is the server side's state, wrapped (:mod:`qflare.crypto.wrap`)."""

    hello_hash: str
    device_id: str
    state: bytes
    started_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class RoundRow:
    round_number: int
    state: str
    base_model_hash: str
    selected_devices: tuple[str, ...]
    min_participants: int
    quorum: int
    deadline: datetime
    opened_at: datetime
    closed_at: datetime | None
    result_model_hash: str | None


@dataclass(frozen=True, slots=True)
class SecAggRoundRow:
    """The stored state of an open secure-aggregation round (:mod:`qflare.protocol.secure_round`)."""

    round_number: int
    config: dict[str, Any]
    state: str
    total: bytes
    phase_deadline: datetime
    unmasking_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class NewUpdate:
    """An update to record (the arguments of ``record_update``), one entry of ``record_updates``."""

    round_number: int
    device_id: str
    update_hash: str
    base_model_hash: str
    num_examples: int
    signature: bytes
    metrics: dict[str, Any]
    envelope: bytes | None = None


@dataclass(frozen=True, slots=True)
class UpdateRow:
    id: int
    round_number: int
    device_id: str
    update_hash: str
    base_model_hash: str
    num_examples: int
    signature: bytes
    metrics: dict[str, Any]
    received_at: datetime
    envelope: bytes | None = None
    """The exact signed UPDATE envelope (its signature re-verifies with the device's key)."""


@dataclass(frozen=True, slots=True)
class ModelRow:
    version: int
    round_number: int | None
    model_hash: str
    parent_hash: str | None
    signature: bytes
    metrics: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SecurityEventRow:
    id: int
    at: datetime
    device_id: str | None
    session_id: str | None
    reason: str
    detail: str
    remote_addr: str | None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """A stored ledger entry: ``body`` is the exact canonical bytes that were hashed and signed
    (:meth:`qflare.ledger.LedgerEntry.parse` turns a row back into an entry)."""

    seq: int
    round_number: int | None
    kind: str
    prev_hash: str
    entry_hash: str
    body: bytes
    signatures: tuple[tuple[str, bytes], ...]
    created_at: datetime
