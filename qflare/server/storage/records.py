"""Immutable snapshots of stored rows, returned by :class:`~qflare.server.storage.repository.Store`.

The store never hands out live ORM objects: a snapshot cannot lazy-load, cannot be flushed back by
accident, and is safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qflare.server.storage import tables as t

__all__ = [
    "DeviceRow",
    "TokenRow",
    "SessionRow",
    "RoundRow",
    "UpdateRow",
    "ModelRow",
    "SecurityEventRow",
    "LedgerRow",
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

    @property
    def active(self) -> bool:
        return self.status == "active"

    @classmethod
    def of(cls, row: t.Device) -> DeviceRow:
        return cls(
            row.device_id,
            row.sig_alg,
            bytes(row.sig_public_key),
            row.status,
            row.enrolled_at,
            row.revoked_at,
            row.revoked_reason,
            bytes(row.enrollment_record),
        )


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_hash: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_device: str | None
    label: str

    @classmethod
    def of(cls, row: t.EnrollmentToken) -> TokenRow:
        return cls(
            row.token_hash, row.created_at, row.expires_at, row.used_at, row.used_by_device, row.label
        )


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    device_id: str
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None

    def is_live(self, now: datetime) -> bool:
        return self.closed_at is None and now < self.expires_at

    @classmethod
    def of(cls, row: t.Session) -> SessionRow:
        return cls(row.session_id, row.device_id, row.created_at, row.expires_at, row.closed_at)


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

    @classmethod
    def of(cls, row: t.Round) -> RoundRow:
        return cls(
            row.round_number,
            row.state,
            row.base_model_hash,
            tuple(row.selected_devices),
            row.min_participants,
            row.quorum,
            row.deadline,
            row.opened_at,
            row.closed_at,
            row.result_model_hash,
        )


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

    @classmethod
    def of(cls, row: t.Update) -> UpdateRow:
        return cls(
            row.id,
            row.round_number,
            row.device_id,
            row.update_hash,
            row.base_model_hash,
            row.num_examples,
            bytes(row.signature),
            dict(row.metrics),
            row.received_at,
        )


@dataclass(frozen=True, slots=True)
class ModelRow:
    version: int
    round_number: int | None
    model_hash: str
    parent_hash: str | None
    signature: bytes
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: t.ModelVersion) -> ModelRow:
        return cls(
            row.version,
            row.round_number,
            row.model_hash,
            row.parent_hash,
            bytes(row.signature),
            dict(row.metrics),
            row.created_at,
        )


@dataclass(frozen=True, slots=True)
class SecurityEventRow:
    id: int
    at: datetime
    device_id: str | None
    session_id: str | None
    reason: str
    detail: str
    remote_addr: str | None

    @classmethod
    def of(cls, row: t.SecurityEvent) -> SecurityEventRow:
        return cls(
            row.id, row.at, row.device_id, row.session_id, row.reason, row.detail, row.remote_addr
        )


@dataclass(frozen=True, slots=True)
class LedgerRow:
    seq: int
    prev_hash: str
    entry_hash: str
    kind: str
    payload: dict[str, Any]
    signature: bytes
    created_at: datetime

    @classmethod
    def of(cls, row: t.LedgerEntry) -> LedgerRow:
        return cls(
            row.seq,
            row.prev_hash,
            row.entry_hash,
            row.kind,
            dict(row.payload),
            bytes(row.signature),
            row.created_at,
        )
