"""Persistent storage for the QFLARE coordinator.

* :class:`Database` - SQLAlchemy engine for SQLite (embedded default) or PostgreSQL, plus Alembic
  migrations run in code (:meth:`Database.upgrade`).
* :class:`Store` - the transactional operations the coordinator needs.
* :class:`BlobStore` - content-addressed, hash-verified files for models and updates.
"""

from qflare.storage.blobs import BlobNotFoundError, BlobStore
from qflare.storage.db import DATABASE_URL_ENV, Database
from qflare.storage.leader import AdvisoryLeadership
from qflare.storage.records import (
    DeviceRow,
    LedgerRow,
    ModelRow,
    RoundRow,
    SecurityEventRow,
    SessionRow,
    TokenRow,
    UpdateRow,
)
from qflare.storage.repository import Store, hash_token, key_id

__all__ = [
    "DATABASE_URL_ENV",
    "AdvisoryLeadership",
    "BlobNotFoundError",
    "BlobStore",
    "Database",
    "DeviceRow",
    "LedgerRow",
    "ModelRow",
    "RoundRow",
    "SecurityEventRow",
    "SessionRow",
    "Store",
    "TokenRow",
    "UpdateRow",
    "hash_token",
    "key_id",
]
