"""Persistent storage for the QFLARE coordinator.

* :class:`Database` - SQLAlchemy engine for SQLite (embedded default) or PostgreSQL, plus Alembic
  migrations run in code (:meth:`Database.upgrade`).
* :class:`Store` - the transactional operations the coordinator needs.
* :class:`BlobBackend` - the content-addressed, hash-verified blob store for models and updates:
  :class:`BlobStore` (files, the default) or :class:`S3BlobStore` (an S3-compatible bucket), chosen by
  :func:`open_blob_store` / :func:`blob_store_from_env` (``$QFLARE_BLOB_STORE``).
"""

from qflare.storage.blob_backend import BLOB_STORE_ENV, BlobBackend, blob_store_from_env, open_blob_store
from qflare.storage.blobs import BlobNotFoundError, BlobStore
from qflare.storage.blobs_s3 import S3BlobStore
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
    "BLOB_STORE_ENV",
    "DATABASE_URL_ENV",
    "AdvisoryLeadership",
    "BlobBackend",
    "BlobNotFoundError",
    "BlobStore",
    "Database",
    "DeviceRow",
    "LedgerRow",
    "ModelRow",
    "RoundRow",
    "S3BlobStore",
    "SecurityEventRow",
    "SessionRow",
    "Store",
    "TokenRow",
    "UpdateRow",
    "blob_store_from_env",
    "hash_token",
    "key_id",
    "open_blob_store",
]
