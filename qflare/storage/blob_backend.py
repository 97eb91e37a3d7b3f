"""The blob store as an interface, and the choice of backend.

:class:`BlobBackend` lists what the coordinator (``qflare.server``), the store scrub, the model export and
the ingest benchmark ask of a content-addressed blob store; it extends the protocol layer's
:class:`~qflare.protocol.store.BlobSink`.  Two backends implement it:

* :class:`~qflare.storage.blobs.BlobStore` - files under ``DATA_DIR/blobs`` (the default);
* :class:`~qflare.storage.blobs_s3.S3BlobStore` - objects in an S3-compatible bucket, for coordinators
  that span processes or machines (``pip install 'qflare[s3]'``).

:func:`open_blob_store` picks one from a URL: none gives the file store, ``s3://BUCKET[/PREFIX]`` the S3
store; :func:`blob_store_from_env` reads the URL from ``$QFLARE_BLOB_STORE``, as
:meth:`~qflare.storage.Database.from_env` reads ``$QFLARE_DATABASE_URL``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

from qflare.errors import ConfigError
from qflare.hashed import HashedBytes
from qflare.storage.blobs import BlobStore
from qflare.storage.blobs_s3 import S3BlobStore

__all__ = ["BLOB_STORE_ENV", "BlobBackend", "blob_store_from_env", "open_blob_store", "parse_s3_url"]

BLOB_STORE_ENV = "QFLARE_BLOB_STORE"
"""Environment variable naming the blob store (``s3://BUCKET[/PREFIX]``); unset: ``DATA_DIR/blobs``."""


class BlobBackend(Protocol):
    """Content-addressed, hash-verified blobs (SHA-256 hex digests), whatever holds them.

    Every write is all or nothing: a reader sees either no blob or the complete one, and a failed put
    stores nothing.  Every read re-hashes: a blob whose bytes no longer match its digest raises
    ValidationError("blob_corrupt"), a missing one BlobNotFoundError.  A write the storage refuses raises
    StorageFullError (``storage_full``, or ``storage_unavailable`` for a store that cannot be reached) and
    sets :attr:`write_error`."""

    write_error: str | None
    """Why the last write failed, until a write (or :meth:`probe`) succeeds again."""

    def put(
        self,
        data: bytes | memoryview | HashedBytes,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[str, int]:
        """Store ``data``; ``(sha256_hex, size)``.  :class:`~qflare.hashed.HashedBytes` are stored under
        their carried digest; any other digest given is checked (ValidationError("hash_mismatch"))."""
        ...

    def get(self, sha256: str) -> bytes:
        """The whole blob, hash-verified."""
        ...

    def digests(self) -> Iterator[str]:
        """The digest of every stored blob (by name, not re-hashed), in no particular order."""
        ...

    def delete(self, sha256: str) -> bool:
        """Remove a blob; ``True`` if it existed."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def written_at(self, sha256: str) -> float | None:
        """When the blob was last written (Unix seconds), None if absent."""
        ...

    def check(self, sha256: str) -> Literal["missing", "corrupt"] | None:
        """Re-hash one stored blob: ``None`` if intact, else ``"missing"`` or ``"corrupt"``."""
        ...

    def probe(self) -> str | None:
        """A small real write, removed again: ``None`` (and :attr:`write_error` cleared) when the store can
        be written, else why not."""
        ...

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Remove what interrupted writes left behind, older than ``older_than_s``; how many."""
        ...

    def describe(self, sha256: str) -> str:
        """Where the blob lives, for messages (a file path, an ``s3://`` URL)."""
        ...


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> ``(bucket, prefix)`` (prefix without leading or trailing ``/``)."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "s3":
        raise ConfigError(f"blob store {url!r}: not an s3:// URL")
    if parts.query or parts.fragment or parts.username or parts.password or parts.port is not None:
        raise ConfigError(
            f"blob store {url!r}: give only s3://BUCKET[/PREFIX]; the endpoint and credentials come from "
            "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (see docs/operations.md: Blob store)"
        )
    bucket = parts.netloc
    if not bucket:
        raise ConfigError(f"blob store {url!r}: no bucket (s3://BUCKET[/PREFIX])")
    prefix = parts.path.strip("/")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise ConfigError(f"blob store {url!r}: the prefix has an empty, '.' or '..' segment")
    return bucket, prefix


def open_blob_store(url: str | None, data_dir: Path | str) -> BlobBackend:
    """No URL (None or blank): the file store in ``data_dir/blobs``; ``s3://BUCKET[/PREFIX]``: an
    :class:`~qflare.storage.blobs_s3.S3BlobStore` (checked to exist and be reachable now); anything
    else: ConfigError."""
    if url is None or not url.strip():
        return BlobStore(Path(data_dir).expanduser() / "blobs")
    if urlsplit(url.strip()).scheme.lower() != "s3":
        raise ConfigError(
            f"blob store {url!r}: unsupported; give s3://BUCKET[/PREFIX], or nothing for the files in the "
            "data directory's blobs/"
        )
    bucket, prefix = parse_s3_url(url)
    return S3BlobStore(bucket, prefix)


def blob_store_from_env(
    data_dir: Path | str, environ: Mapping[str, str] | None = None, *, url: str | None = None
) -> BlobBackend:
    """``url`` if given, else ``$QFLARE_BLOB_STORE`` if set, else the files in ``data_dir/blobs``."""
    if url is None or not url.strip():
        url = (os.environ if environ is None else environ).get(BLOB_STORE_ENV, "")
    return open_blob_store(url, data_dir)
