"""Content-addressed blob store: atomic, hash-verified, size-limited, concurrency-safe."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflare.errors import OversizeError, ValidationError
from qflare.storage import BlobNotFoundError, BlobStore


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _temps(root: Path) -> list[Path]:
    return [p for p in _files(root) if p.name.startswith(".tmp-")]


def _flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_round_trip_and_layout(blobs: BlobStore) -> None:
    chunks = [b"alpha-", b"", b"beta-" * 1000, b"gamma"]
    data = b"".join(chunks)
    digest, size = blobs.put_stream(iter(chunks))
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert blobs.path_for(digest) == blobs.root / digest[:2] / digest[2:]
    assert _files(blobs.root) == [blobs.path_for(digest)]
    assert blobs.exists(digest) and blobs.exists(digest.upper()) and blobs.size(digest) == size
    assert blobs.get(digest) == data
    streamed = list(blobs.open_stream(digest, chunk_size=777))
    assert b"".join(streamed) == data and max(len(c) for c in streamed) == 777
    assert blobs.put(data) == (digest, size)  # idempotent
    assert _files(blobs.root) == [blobs.path_for(digest)]
    assert blobs.put(b"") == (hashlib.sha256(b"").hexdigest(), 0)
    assert list(blobs.open_stream(hashlib.sha256(b"").hexdigest())) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=300), max_size=8), chunk_size=st.integers(1, 64))
def test_property_put_then_read(blobs: BlobStore, chunks: list[bytes], chunk_size: int) -> None:
    data = b"".join(chunks)
    digest, size = blobs.put_stream(chunks, expected_sha256=hashlib.sha256(data).hexdigest())
    assert size == len(data)
    assert b"".join(blobs.open_stream(digest, chunk_size)) == data == blobs.get(digest)


def test_corruption_detected_on_read_and_healed_by_put(blobs: BlobStore) -> None:
    data = os.urandom(10_000)
    digest, _ = blobs.put(data)
    _flip_byte(blobs.path_for(digest), 5_000)
    with pytest.raises(ValidationError) as exc:
        blobs.get(digest)
    assert exc.value.code == "blob_corrupt"
    received: list[bytes] = []
    with pytest.raises(ValidationError) as exc:
        for chunk in blobs.open_stream(digest, chunk_size=1024):
            received.append(chunk)
    assert exc.value.code == "blob_corrupt"
    assert len(b"".join(received)) < len(data)  # the complete content was never handed out
    blobs.put(data)
    assert blobs.get(digest) == data


def test_hash_mismatch_stores_nothing(blobs: BlobStore) -> None:
    with pytest.raises(ValidationError) as exc:
        blobs.put_stream([b"payload"], expected_sha256=hashlib.sha256(b"other").hexdigest())
    assert exc.value.code == "hash_mismatch"
    assert _files(blobs.root) == []


def test_max_bytes(blobs: BlobStore) -> None:
    consumed: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in range(1_000_000):
            consumed.append(i)
            yield b"x" * 100

    with pytest.raises(OversizeError):
        blobs.put_stream(endless(), max_bytes=1_000)
    assert len(consumed) == 11  # stopped as soon as the limit was passed
    assert _files(blobs.root) == []
    assert blobs.put_stream([b"x" * 1_000], max_bytes=1_000)[1] == 1_000


def test_failing_source_leaves_no_temp_file(blobs: BlobStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"partial data"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        blobs.put_stream(broken())
    with pytest.raises(TypeError):
        blobs.put_stream(["not bytes"])  # type: ignore[list-item]
    assert _files(blobs.root) == []


def test_concurrent_puts_of_same_content(blobs: BlobStore) -> None:
    data = os.urandom(256 * 1024)
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    barrier = threading.Barrier(8)
    results: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            out: object = blobs.put_stream(iter(chunks))
        except Exception as exc:
            out = exc
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    digest = hashlib.sha256(data).hexdigest()
    assert results == [(digest, len(data))] * 8
    assert _files(blobs.root) == [blobs.path_for(digest)]
    assert blobs.get(digest) == data


def test_missing_bad_digest_and_delete(blobs: BlobStore) -> None:
    absent = "ab" * 32
    with pytest.raises(BlobNotFoundError):
        blobs.get(absent)
    with pytest.raises(BlobNotFoundError):
        blobs.open_stream(absent)
    with pytest.raises(BlobNotFoundError):
        blobs.size(absent)
    for bad in ("../" * 10 + "etc/passwd", "ab" * 31, "zz" * 32, ""):
        with pytest.raises(ValidationError) as exc:
            blobs.get(bad)
        assert exc.value.code == "bad_digest"
    digest, _ = blobs.put(b"bye")
    assert blobs.delete(digest) is True and blobs.delete(digest) is False
    assert not blobs.exists(digest)


def test_remove_stale_temp_files(blobs: BlobStore) -> None:
    stale = blobs.root / ".tmp-crashed.part"
    stale.write_bytes(b"half a model")
    os.utime(stale, (1, 1))
    fresh = blobs.root / ".tmp-inflight.part"
    fresh.write_bytes(b"being written")
    assert blobs.remove_stale_temp_files(older_than_s=60) == 1
    assert not stale.exists() and fresh.exists()
