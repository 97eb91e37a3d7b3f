"""Content-addressed blob store in an S3-compatible bucket (``s3://BUCKET[/PREFIX]``; ``pip install 'qflare[s3]'``).

The same contract as the file store (:class:`~qflare.storage.blobs.BlobStore`): a blob is the object
``PREFIX/ab/cdef...`` where ``abcdef...`` is the SHA-256 hex of its bytes.  A put hashes the bytes first
(spooling a stream to a temporary file), checks the digest it was given and only then uploads them in one
PUT, which S3 makes visible whole or not at all: no partial or wrongly named object is ever written.
Reads re-hash and refuse corrupted content; :class:`~qflare.hashed.HashedBytes` are uploaded under their
carried digest without a second hash.

The endpoint, credentials and region come from boto3's standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or the AWS config files).  Opening
the store checks the bucket: a missing bucket, refused credentials or no credentials are a ConfigError
naming the bucket.  Afterwards every failure of the service (unreachable, throttled, refused) is a
StorageFullError with code ``storage_unavailable`` (a 503 with ``Retry-After`` to devices, who wait and
retry); no botocore exception escapes.  boto3 is imported when a store is opened, so the package works
without it.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Literal

from qflare.errors import BlobNotFoundError, ConfigError, OversizeError, StorageFullError, ValidationError
from qflare.hashed import HashedBytes
from qflare.storage import s3_errors
from qflare.storage.blobs import DEFAULT_CHUNK_SIZE, STORAGE_RETRY_AFTER_S, _digest, _Source, check_stream

__all__ = ["INSTALL_HINT", "S3BlobStore"]

INSTALL_HINT = "pip install 'qflare[s3]'"
MAX_PUT_BYTES = 5 * 1024**3
"""The most one S3 PUT takes (5 GiB); a blob is always one PUT, so larger ones are refused."""
SPOOL_BYTES = 8 * 1024**2
"""A streamed put is held in memory up to this size while it is hashed, then in a temporary file."""
DEFAULT_PAGE_SIZE = 1000
_PROBE_PREFIX = ".probe-"
_PROBE_BYTES = 4096
_SHARD_KEY_RE = re.compile(r"([0-9a-f]{2})/([0-9a-f]{62})")


def _boto3() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(f"the s3:// blob store needs boto3: {INSTALL_HINT}") from None
    return boto3, Config


class S3BlobStore:
    """Content-addressed objects under ``prefix`` in ``bucket`` (which must exist).

    ``client``: a boto3 S3 client to use (default: one from boto3's standard environment).
    ``page_size``: keys asked for per listing request (S3 answers at most 1000)."""

    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> None:
        if not bucket:
            raise ConfigError("an S3 blob store needs a bucket")
        if not 1 <= page_size <= 1000:
            raise ConfigError("page_size must be in 1..1000")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.page_size = page_size
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.write_error: str | None = None
        """Why the last write failed (service unreachable or refusing), until a write succeeds again."""
        boto3, config = _boto3()
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        if client is None:
            try:
                client = boto3.session.Session().client(
                    "s3", config=config(connect_timeout=10, read_timeout=60, max_pool_connections=32)
                )
            except self._errors as exc:
                raise ConfigError(f"cannot set up the S3 client for {self.url}: {exc}") from None
        self._client = client
        self._check_bucket()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r})"

    def key_for(self, sha256: str) -> str:
        digest = _digest(sha256)
        return f"{self._base}{digest[:2]}/{digest[2:]}"

    def describe(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key_for(sha256)}"

    # -- errors -------------------------------------------------------------------------------

    def _endpoint(self) -> str:
        return str(getattr(getattr(self._client, "meta", None), "endpoint_url", "") or "the default AWS endpoint")

    def _reason(self, exc: BaseException) -> str:
        return s3_errors.reason(exc, self.bucket, self._endpoint())

    def _unavailable(self, exc: BaseException, doing: str) -> StorageFullError:
        return StorageFullError(
            f"the coordinator cannot {doing} its blob store {self.url}: {self._reason(exc)}",
            retry_after_s=STORAGE_RETRY_AFTER_S,
            code="storage_unavailable",
        )

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._errors as exc:
            if s3_errors.transient(exc):
                raise self._unavailable(exc, "reach") from exc
            found = s3_errors.client_error(exc)
            if found is not None and found[1] == 404:
                raise ConfigError(
                    f"blob store {self.url}: bucket {self.bucket!r} does not exist at {self._endpoint()}"
                ) from None
            raise ConfigError(f"blob store {self.url}: {self._reason(exc)}") from None

    # -- writing ------------------------------------------------------------------------------

    def put_stream(
        self,
        chunks: Iterable[bytes | memoryview] | HashedBytes,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[str, int]:
        """Store the concatenated ``chunks``; return ``(sha256_hex, size)``.

        The same contract as :meth:`qflare.storage.BlobStore.put_stream`: OversizeError past ``max_bytes``,
        ValidationError("hash_mismatch") for a digest other than ``expected_sha256``, StorageFullError when
        the bytes cannot be spooled locally (``storage_full``) or uploaded (``storage_unavailable``); on any
        failure nothing is stored.  The bytes are spooled (memory, then a temporary file) while hashed."""
        expected = None if expected_sha256 is None else _digest(expected_sha256)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if isinstance(chunks, HashedBytes):
            return self._put_hashed(chunks, expected, max_bytes)
        source = _Source(chunks)
        try:
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
                digest, size = self._spool(source, spool, expected, max_bytes)
                spool.seek(0)
                self._upload(digest, spool, size)
        except OSError as exc:  # the local spool: ENOSPC in the temporary directory
            if source.failed:
                raise
            self.write_error = f"{exc.strerror or exc} (spooling to {tempfile.gettempdir()})"
            raise StorageFullError(
                f"the coordinator cannot spool a blob for {self.url}: {self.write_error}",
                retry_after_s=STORAGE_RETRY_AFTER_S,
            ) from exc
        return digest, size

    @staticmethod
    def _spool(
        chunks: Iterable[bytes | memoryview], out: IO[bytes], expected: str | None, max_bytes: int | None
    ) -> tuple[str, int]:
        hasher, size = hashlib.sha256(), 0
        for chunk in chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"chunks must be bytes, got {type(chunk).__name__}")
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise OversizeError(f"blob exceeds {max_bytes} bytes")
            hasher.update(chunk)
            out.write(chunk)
        digest = hasher.hexdigest()
        if expected is not None and digest != expected:
            raise ValidationError(f"content hashes to {digest}, expected {expected}", code="hash_mismatch")
        return digest, size

    def _put_hashed(self, data: HashedBytes, expected: str | None, max_bytes: int | None) -> tuple[str, int]:
        if expected is not None and data.sha256 != expected:
            raise ValidationError(f"content hashes to {data.sha256}, expected {expected}", code="hash_mismatch")
        view = data.data
        if max_bytes is not None and view.nbytes > max_bytes:
            raise OversizeError(f"blob exceeds {max_bytes} bytes")
        whole = view.obj
        body = whole if isinstance(whole, bytes) and len(whole) == view.nbytes else view.tobytes()
        self._upload(data.sha256, body, view.nbytes)
        return data.sha256, view.nbytes

    def put(
        self,
        data: bytes | memoryview | HashedBytes,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[str, int]:
        """Store ``data`` (see :meth:`put_stream`; :class:`~qflare.hashed.HashedBytes` are not hashed again)."""
        if isinstance(data, HashedBytes):
            return self.put_stream(data, expected_sha256=expected_sha256, max_bytes=max_bytes)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        expected = None if expected_sha256 is None else _digest(expected_sha256)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        body = data if isinstance(data, bytes) else bytes(data)
        if max_bytes is not None and len(body) > max_bytes:
            raise OversizeError(f"blob exceeds {max_bytes} bytes")
        digest = hashlib.sha256(body).hexdigest()
        if expected is not None and digest != expected:
            raise ValidationError(f"content hashes to {digest}, expected {expected}", code="hash_mismatch")
        self._upload(digest, body, len(body))
        return digest, len(body)

    def _upload(self, digest: str, body: bytes | IO[bytes], size: int) -> None:
        """One PUT of the verified bytes under their digest (replacing, and so healing, a corrupt copy)."""
        if size > MAX_PUT_BYTES:
            raise OversizeError(f"blob of {size} bytes: one S3 PUT takes at most {MAX_PUT_BYTES} bytes")
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self.key_for(digest),
                Body=body,
                ContentLength=size,
                ContentType="application/octet-stream",
            )
        except self._errors as exc:
            self.write_error = self._reason(exc)
            raise self._unavailable(exc, "write") from exc
        self.write_error = None

    def probe(self) -> str | None:
        """Write a small probe object and remove it: ``None`` when the bucket can be written (clearing
        :attr:`write_error`), else why not."""
        key = f"{self._base}{_PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=b"\0" * _PROBE_BYTES)
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except self._errors as exc:
            self.write_error = f"{self._reason(exc)} ({self.url})"
            return self.write_error
        self.write_error = None
        return None

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete probe objects older than ``older_than_s`` (a crash between a probe's write and its
        removal leaves one); how many.  Blob PUTs leave nothing partial behind."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        removed = 0
        try:
            for obj in self._list(self._base + _PROBE_PREFIX):
                if obj["LastModified"] < cutoff:
                    self._client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                    removed += 1
        except self._errors as exc:
            raise self._unavailable(exc, "clean up") from exc
        return removed

    # -- reading ------------------------------------------------------------------------------

    def _open(self, sha256: str) -> tuple[str, Any]:
        digest = _digest(sha256)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key_for(digest))
        except self._errors as exc:
            if s3_errors.missing(exc):
                raise BlobNotFoundError(f"no blob {digest}") from None
            raise self._unavailable(exc, "read") from exc
        return digest, response["Body"]

    def _corrupt(self, digest: str) -> ValidationError:
        return ValidationError(
            f"blob object {self.describe(digest)} no longer hashes to {digest}: it is corrupt. Restore it from a "
            "backup, or run 'qflare server verify-store' to list every damaged blob",
            code="blob_corrupt",
        )

    def open_stream(self, sha256: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the blob in chunks, verifying its hash (as :meth:`qflare.storage.BlobStore.open_stream`:
        the object is requested now, and the last chunk only comes once the whole content hashed right)."""
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        digest, body = self._open(sha256)
        return self._verified_chunks(digest, body, chunk_size)

    def _verified_chunks(self, digest: str, body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            hasher = hashlib.sha256()
            pending = self._read(body, chunk_size)
            hasher.update(pending)
            while True:
                nxt = self._read(body, chunk_size)
                if not nxt:
                    break
                hasher.update(nxt)
                yield pending
                pending = nxt
            if hasher.hexdigest() != digest:
                raise self._corrupt(digest)
            if pending:
                yield pending
        finally:
            body.close()

    def _read(self, body: Any, size: int | None = None) -> bytes:
        try:
            return bytes(body.read(size))
        except self._errors as exc:
            raise self._unavailable(exc, "read") from exc

    def get(self, sha256: str) -> bytes:
        """The whole blob, hash-verified."""
        digest, body = self._open(sha256)
        try:
            data = self._read(body)
        finally:
            body.close()
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._corrupt(digest)
        return data

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
        )
        for page in pages:
            yield from page.get("Contents", ())

    def digests(self) -> Iterator[str]:
        """The digest of every stored blob (by key; not re-hashed), listed page by page."""
        start = len(self._base)
        try:
            for obj in self._list(self._base):
                found = _SHARD_KEY_RE.fullmatch(obj["Key"], start)
                if found is not None:
                    yield found[1] + found[2]
        except self._errors as exc:
            raise self._unavailable(exc, "list") from exc

    def check(self, sha256: str) -> Literal["missing", "corrupt"] | None:
        """Re-hash one stored blob: ``None`` if intact, else ``"missing"`` or ``"corrupt"``."""
        return check_stream(self.open_stream, sha256)

    def _head(self, sha256: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except self._errors as exc:
            if s3_errors.missing(exc):
                return None
            raise self._unavailable(exc, "read") from exc
        return head

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def written_at(self, sha256: str) -> float | None:
        """The object's LastModified (every PUT moves it, the same bytes too); None if absent."""
        head = self._head(sha256)
        return None if head is None else float(head["LastModified"].timestamp())

    def size(self, sha256: str) -> int:
        head = self._head(sha256)
        if head is None:
            raise BlobNotFoundError(f"no blob {_digest(sha256)}")
        return int(head["ContentLength"])

    def delete(self, sha256: str) -> bool:
        """Remove a blob; ``True`` if it existed (S3's DELETE does not say, so it is looked up first)."""
        if self._head(sha256) is None:
            return False
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except self._errors as exc:
            raise self._unavailable(exc, "delete from") from exc
        return True
