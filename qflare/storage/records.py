"""Snapshots of ORM rows as the protocol's row types (:mod:`qflare.protocol.records`).

The store never hands out live ORM objects: a snapshot cannot lazy-load, cannot be flushed back by
accident, and is safe to share between threads.  Field names of the row types equal the ORM attribute
names, so one converter serves every table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from qflare.protocol.records import (
    DeviceRow,
    LedgerRow,
    ModelRow,
    NewUpdate,
    PendingHandshakeRow,
    RoundRow,
    SecAggRoundRow,
    SecurityEventRow,
    SessionRow,
    SharedSessionRow,
    TokenRow,
    UpdateRow,
)

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
    "snapshot",
]

R = TypeVar("R")


def _plain(value: Any) -> Any:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def snapshot(cls: type[R], row: object) -> R:
    """``cls`` (a row dataclass) filled from the ORM object ``row``'s attributes of the same names."""
    return cls(*(_plain(getattr(row, f.name)) for f in dataclasses.fields(cls)))  # type: ignore[arg-type]
