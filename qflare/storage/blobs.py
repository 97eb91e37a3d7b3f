"""Content-addressed blob store on disk (model weights, client updates).

A blob lives at ``root/ab/cdef...`` where ``abcdef...`` is the SHA-256 hex of its bytes.  Writes
stream into a temporary file in ``root`` (same file system) while hashing, are fsynced, then
atomically renamed into place, so a reader sees either nothing or the complete blob, and concurrent
puts of the same content are harmless.  Reads re-hash and refuse corrupted content.  Bytes handed over
as :class:`~qflare.hashed.HashedBytes` (hashed once by whoever verified them) are written under their
carried digest without a second hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from qflare.errors import BlobNotFoundError, OversizeError, StorageFullError, ValidationError
from qflare.hashed import HashedBytes

__all__ = ["DEFAULT_CHUNK_SIZE", "STORAGE_RETRY_AFTER_S", "BlobNotFoundError", "BlobStore"]

#: How long a device is told to wait (``Retry-After``) when the blob store cannot be written.
STORAGE_RETRY_AFTER_S = 30.0
_PROBE_BYTES = 64 * 1024

DEFAULT_CHUNK_SIZE = 1 << 20
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".tmp-"
_TEMP_SUFFIX = ".part"


def _digest(value: str) -> str:
    if not isinstance(value, str):
        raise ValidationError("a blob digest must be a string", code="bad_digest")
    lowered = value.lower()
    if not _DIGEST_RE.fullmatch(lowered):
        raise ValidationError("a blob digest is 64 hex characters (SHA-256)", code="bad_digest")
    return lowered


class _Source:
    """The caller's chunks, remembering whether they (rather than our writes) raised."""

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._it = iter(chunks)
        self.failed = False

    def __iter__(self) -> _Source:
        return self

    def __next__(self) -> bytes | memoryview:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException:
            self.failed = True
            raise


def _corrupt_message(path: object, digest: str) -> str:
    return (
        f"blob file {path} no longer hashes to {digest}: it is corrupt. Restore it from a backup, or run "
        "'qflare server verify-store' to list every damaged blob"
    )


def check_stream(open_stream: Callable[[str], Iterable[bytes]], sha256: str) -> Literal["missing", "corrupt"] | None:
    """Read a blob through ``open_stream`` (which re-hashes it): ``None`` if intact, else what is wrong."""
    try:
        for _ in open_stream(sha256):
            pass
    except BlobNotFoundError:
        return "missing"
    except ValidationError as exc:
        if exc.code != "blob_corrupt":
            raise
        return "corrupt"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed files under ``root`` (created if missing)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_error: str | None = None
        """Why the last write failed (disk full, I/O error), until a write succeeds again."""

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def path_for(self, sha256: str) -> Path:
        digest = _digest(sha256)
        return self.root / digest[:2] / digest[2:]

    def describe(self, sha256: str) -> str:
        """The blob's file path (for messages)."""
        return str(self.path_for(sha256))

    # -- writing ------------------------------------------------------------------------------

    def put_stream(
        self,
        chunks: Iterable[bytes | memoryview] | HashedBytes,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[str, int]:
        """Store the concatenated ``chunks``; return ``(sha256_hex, size)``.

        More than ``max_bytes`` raises OversizeError as soon as it is exceeded; a digest other than
        ``expected_sha256`` raises ValidationError("hash_mismatch"); a write the file system refuses
        (full disk, I/O error) raises StorageFullError and sets :attr:`write_error`.  On any failure, including an
        exception from ``chunks`` itself, the temporary file is removed and nothing is stored.

        ``chunks`` given as :class:`~qflare.hashed.HashedBytes` are written under their carried digest
        without being hashed again (the update path hashes each update once, when it verifies it); a
        digest given any other way is always checked against the bytes.
        """
        expected = None if expected_sha256 is None else _digest(expected_sha256)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if not isinstance(chunks, HashedBytes):
            return self._put(_Source(chunks), expected, max_bytes, None)
        if expected is not None and chunks.sha256 != expected:
            raise ValidationError(f"content hashes to {chunks.sha256}, expected {expected}", code="hash_mismatch")
        return self._put(_Source([chunks.data]), expected, max_bytes, chunks.sha256)

    def _put(self, source: _Source, expected: str | None, max_bytes: int | None, known: str | None) -> tuple[str, int]:
        try:
            stored = self._put_stream(source, expected, max_bytes, known)
        except OSError as exc:  # ENOSPC, EDQUOT, EIO, EROFS: a typed, retryable refusal; nothing is stored
            if source.failed:
                raise  # the caller's chunks failed (a client went away), not our storage
            self.write_error = f"{exc.strerror or exc} ({self.root})"
            raise StorageFullError(
                f"the coordinator cannot write its blob store: {self.write_error}", retry_after_s=STORAGE_RETRY_AFTER_S
            ) from exc
        self.write_error = None
        return stored

    def _put_stream(
        self, chunks: Iterable[bytes | memoryview], expected: str | None, max_bytes: int | None, known: str | None
    ) -> tuple[str, int]:
        """``known``: the chunks' digest computed by :class:`~qflare.hashed.HashedBytes` (not hashed again)."""
        fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=self.root)
        tmp = Path(tmp_name)
        try:
            hasher = None if known is not None else hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    if not isinstance(chunk, bytes | bytearray | memoryview):
                        raise TypeError(f"chunks must be bytes, got {type(chunk).__name__}")
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise OversizeError(f"blob exceeds {max_bytes} bytes")
                    if hasher is not None:
                        hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = hasher.hexdigest() if hasher is not None else str(known)
            if expected is not None and digest != expected:
                raise ValidationError(f"content hashes to {digest}, expected {expected}", code="hash_mismatch")
            dest = self.root / digest[:2] / digest[2:]
            shard_is_new = not dest.parent.exists()
            dest.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o444)
            # Always replace: identical content is a no-op for readers (they keep their open
            # file), and a previously corrupted copy is healed.
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
            if shard_is_new:
                _fsync_dir(self.root)
            return digest, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def probe(self) -> str | None:
        """Try a small fsynced write (removed again): ``None`` when the store is writable, else why not.
        A success clears :attr:`write_error` (the disk has room again)."""
        try:
            fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=self.root)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(b"\0" * _PROBE_BYTES)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                Path(name).unlink(missing_ok=True)
        except OSError as exc:
            self.write_error = f"{exc.strerror or exc} ({self.root})"
            return self.write_error
        self.write_error = None
        return None

    def put(
        self,
        data: bytes | memoryview | HashedBytes,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[str, int]:
        """Store ``data`` (see :meth:`put_stream`; :class:`~qflare.hashed.HashedBytes` are not hashed again)."""
        chunks: Iterable[bytes | memoryview] | HashedBytes = data if isinstance(data, HashedBytes) else [data]
        return self.put_stream(chunks, expected_sha256=expected_sha256, max_bytes=max_bytes)

    # -- reading ------------------------------------------------------------------------------

    def _open(self, sha256: str) -> tuple[str, BinaryIO]:
        digest = _digest(sha256)
        try:
            return digest, (self.root / digest[:2] / digest[2:]).open("rb")
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob {digest}") from None

    def open_stream(self, sha256: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the blob in chunks, verifying its hash.

        The file is opened now (a missing blob raises BlobNotFoundError immediately).  Chunks are
        read one ahead and the final chunk is only yielded after the whole content has hashed
        correctly, so a consumer of a corrupted blob gets ValidationError("blob_corrupt") before
        it has received the complete content.
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        digest, handle = self._open(sha256)
        return self._verified_chunks(digest, handle, chunk_size)

    @staticmethod
    def _verified_chunks(digest: str, handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        with handle:
            hasher = hashlib.sha256()
            pending = handle.read(chunk_size)
            hasher.update(pending)
            while True:
                nxt = handle.read(chunk_size)
                if not nxt:
                    break
                hasher.update(nxt)
                yield pending
                pending = nxt
            if hasher.hexdigest() != digest:
                raise ValidationError(_corrupt_message(handle.name, digest), code="blob_corrupt")
            if pending:
                yield pending

    def get(self, sha256: str) -> bytes:
        """The whole blob, hash-verified."""
        digest, handle = self._open(sha256)
        with handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValidationError(_corrupt_message(self.path_for(digest), digest), code="blob_corrupt")
        return data

    def digests(self) -> Iterator[str]:
        """The digest of every stored blob (by file name; not re-hashed), in no particular order."""
        for shard in self.root.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for entry in shard.iterdir():
                name = shard.name + entry.name
                if _DIGEST_RE.fullmatch(name) and entry.is_file():
                    yield name

    def check(self, sha256: str) -> Literal["missing", "corrupt"] | None:
        """Re-hash one stored blob: ``None`` if intact, else ``"missing"`` or ``"corrupt"``."""
        return check_stream(self.open_stream, sha256)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def written_at(self, sha256: str) -> float | None:
        """The file's modification time (a rewrite replaces the file, so it moves); None if absent."""
        try:
            return self.path_for(sha256).stat().st_mtime
        except FileNotFoundError:
            return None

    def size(self, sha256: str) -> int:
        try:
            return self.path_for(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob {_digest(sha256)}") from None

    def delete(self, sha256: str) -> bool:
        """Remove a blob; ``True`` if it existed."""
        path = self.path_for(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by a crash mid-put (older than ``older_than_s``); return count."""
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.root.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
