"""The coordinator's storage API: one :class:`Store` over one :class:`Database`.

Every public method runs in exactly one transaction and either commits completely or leaves no
trace, raising a typed error from :mod:`qflare.errors`.  Results are immutable snapshots
(:mod:`qflare.storage.records`).  Times are timezone-aware UTC; operations that stamp a time
take an optional explicit value and otherwise ask the store's clock.
"""

from __future__ import annotations

from qflare.storage._base import Clock, utc_now
from qflare.storage.audit import AuditOps
from qflare.storage.db import Database
from qflare.storage.identity import IdentityOps, hash_token, key_id
from qflare.storage.ledger import LedgerOps
from qflare.storage.operators import OperatorOps
from qflare.storage.secagg import SecAggOps
from qflare.storage.shared import SharedSessionOps
from qflare.storage.status_cache import ActiveDeviceCache
from qflare.storage.training import ROUND_TRANSITIONS, TrainingOps

__all__ = ["ROUND_TRANSITIONS", "Clock", "Store", "hash_token", "key_id", "utc_now"]


class Store(IdentityOps, TrainingOps, AuditOps, LedgerOps, OperatorOps, SecAggOps, SharedSessionOps):
    """Tokens, devices, sessions, rounds, updates, model versions, security events, ledger, operator
    sessions, secure-aggregation round state, the shared connection state of coordinator processes."""

    def __init__(self, db: Database, *, clock: Clock = utc_now, shared: bool = False) -> None:
        """``shared``: other coordinator processes write this database too (a cluster's workers), so no
        device status is cached (:mod:`qflare.storage.status_cache`)."""
        super().__init__(db, clock=clock)
        if shared:
            self._active_devices = ActiveDeviceCache(enabled=False)

    def __repr__(self) -> str:
        return f"Store({self.db!r})"
