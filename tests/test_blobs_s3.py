"""The blob store interface: the same behaviour from the file store and from the S3 store, the latter
against a real S3-compatible server (moto's, on loopback), plus what only the S3 store has (opening a
bucket, outages, the store URL) and a coordinator whose blobs live in a bucket."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from qflare import hashed as hashed_module
from qflare.errors import ConfigError, OversizeError, Retry, StorageFullError, ValidationError
from qflare.hashed import HashedBytes
from qflare.storage import (
    BLOB_STORE_ENV,
    BlobNotFoundError,
    BlobStore,
    S3BlobStore,
    blob_store_from_env,
    open_blob_store,
)

PAGE = 2  # the S3 store lists two keys per request here, so any listing of a few blobs spans pages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """boto3's standard environment pointed at the local server (and nothing from the user's ~/.aws)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", BLOB_STORE_ENV, "QFLARE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A raw boto3 client on the local server (what the tests use to look behind the store's back)."""
    _aws_env(monkeypatch, tmp_path, s3_server)
    return boto3.client("s3")


def _bucket(s3: Any) -> str:
    name = f"qflare-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


@dataclass
class Backend:
    """A store and the raw view of what it holds, the same for both backends."""

    store: BlobStore | S3BlobStore
    names: Callable[[], list[str]]
    """Everything stored, blobs or not (files under the root, keys in the bucket)."""
    overwrite: Callable[[str, bytes], None]
    """Replace a stored blob's bytes behind the store's back."""
    list_requests: Callable[[], int]
    """Listing requests made so far (0 for the file store)."""


def _file_backend(tmp_path: Path) -> Backend:
    store = BlobStore(tmp_path / "blobs")

    def overwrite(digest: str, data: bytes) -> None:
        path = store.path_for(digest)
        path.chmod(0o644)
        path.write_bytes(data)

    def names() -> list[str]:
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())

    return Backend(store, names, overwrite, lambda: 0)


def _s3_backend(s3: Any) -> Backend:
    bucket = _bucket(s3)
    client = boto3.client("s3")
    listed: list[int] = []
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: listed.append(1))
    store = S3BlobStore(bucket, "fed/blobs", client=client, page_size=PAGE)

    def overwrite(digest: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=store.key_for(digest), Body=data)

    def names() -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))

    return Backend(store, names, overwrite, lambda: len(listed))


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return _file_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("s3"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the same behaviour from both backends


def test_round_trip(backend: Backend) -> None:
    store = backend.store
    chunks = [b"alpha-", b"", b"beta-" * 1000, b"gamma"]
    data = b"".join(chunks)
    digest, size = store.put_stream(iter(chunks))
    assert (digest, size) == (_sha(data), len(data))
    assert store.get(digest) == data and store.get(digest.upper()) == data
    assert store.exists(digest) and store.size(digest) == size
    streamed = list(store.open_stream(digest, chunk_size=777))
    assert b"".join(streamed) == data and max(len(c) for c in streamed) == 777
    assert store.check(digest) is None
    assert store.put(data) == (digest, size)  # idempotent
    assert len(backend.names()) == 1 and backend.names()[0].endswith(f"{digest[:2]}/{digest[2:]}")
    assert store.describe(digest).endswith(f"{digest[:2]}/{digest[2:]}")
    empty = _sha(b"")
    assert store.put(b"") == (empty, 0) and store.get(empty) == b""
    assert list(store.open_stream(empty)) == []
    assert store.put(memoryview(b"view bytes")) == (_sha(b"view bytes"), 10)
    assert store.get(_sha(b"view bytes")) == b"view bytes"


def test_hashed_bytes_are_stored_under_their_carried_digest(backend: Backend) -> None:
    store = backend.store
    payload = os.urandom(50_000)
    hashed = HashedBytes.of(memoryview(payload)[1000:])
    assert store.put(hashed, expected_sha256=hashed.sha256) == (hashed.sha256, len(payload) - 1000)
    assert store.get(hashed.sha256) == payload[1000:]
    with pytest.raises(ValidationError) as exc:
        store.put(hashed, expected_sha256=_sha(b"other"))
    assert exc.value.code == "hash_mismatch"
    with pytest.raises(OversizeError):
        store.put(hashed, max_bytes=100)
    # Not hashed again: bytes carried with a wrong digest are written under it as they are (only
    # HashedBytes.of can make one), and the read that re-hashes them refuses them.
    forged = HashedBytes(memoryview(b"not these bytes"), "ab" * 32, hashed_module._TOKEN)
    assert store.put(forged) == ("ab" * 32, 15)
    assert store.check("ab" * 32) == "corrupt"
    assert len(backend.names()) == 2


def test_expected_digest_mismatch_stores_nothing(backend: Backend) -> None:
    store = backend.store
    puts: list[Callable[[], object]] = [
        lambda: store.put(b"payload", _sha(b"other")),
        lambda: store.put_stream([b"payload"], _sha(b"x")),
    ]
    for put in puts:
        with pytest.raises(ValidationError) as exc:
            put()
        assert exc.value.code == "hash_mismatch"
    assert backend.names() == []
    with pytest.raises(ValidationError) as exc:
        store.put(b"payload", expected_sha256="not a digest")
    assert exc.value.code == "bad_digest"
    assert store.put(b"payload", _sha(b"payload").upper()) == (_sha(b"payload"), 7)


def test_corrupt_blob_is_detected_on_read_and_check_and_healed_by_put(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(10_000)
    digest, _ = store.put(data)
    flipped = bytearray(data)
    flipped[5_000] ^= 0x01
    backend.overwrite(digest, bytes(flipped))
    with pytest.raises(ValidationError) as exc:
        store.get(digest)
    assert exc.value.code == "blob_corrupt" and digest in str(exc.value)
    received: list[bytes] = []
    with pytest.raises(ValidationError) as exc:
        for chunk in store.open_stream(digest, chunk_size=1024):
            received.append(chunk)
    assert exc.value.code == "blob_corrupt"
    assert len(b"".join(received)) < len(data)  # the complete content was never handed out
    assert store.check(digest) == "corrupt"
    backend.overwrite(digest, data[:-1])  # truncated
    assert store.check(digest) == "corrupt"
    store.put(data)
    assert store.get(digest) == data and store.check(digest) is None


def test_missing_blob_and_bad_digest(backend: Backend) -> None:
    store = backend.store
    absent = "ab" * 32
    with pytest.raises(BlobNotFoundError):
        store.get(absent)
    with pytest.raises(BlobNotFoundError):
        store.open_stream(absent)
    with pytest.raises(BlobNotFoundError):
        store.size(absent)
    assert store.check(absent) == "missing" and not store.exists(absent) and store.delete(absent) is False
    for bad in ("../" * 10 + "etc/passwd", "ab" * 31, "zz" * 32, ""):
        with pytest.raises(ValidationError) as exc:
            store.get(bad)
        assert exc.value.code == "bad_digest"


def test_digests_lists_every_blob_over_several_pages_and_nothing_else(backend: Backend) -> None:
    store = backend.store
    stored = {store.put(f"blob {i}".encode())[0] for i in range(7)}
    assert set(store.digests()) == stored and len(list(store.digests())) == 7
    if isinstance(store, S3BlobStore):
        before = backend.list_requests()
        assert set(store.digests()) == stored
        assert backend.list_requests() - before == 4  # 7 keys, 2 a page
        s3 = boto3.client("s3")  # things under the prefix that are not blobs, and blobs under another prefix
        for key in ("fed/blobs/notes.txt", "fed/blobs/ab/short", f"fed/other/{next(iter(stored))[:2]}/x"):
            s3.put_object(Bucket=store.bucket, Key=key, Body=b"x")
        s3.put_object(Bucket=store.bucket, Key=f"fed/blobx/ab/{'c' * 62}", Body=b"x")
    else:
        assert isinstance(store, BlobStore)
        (store.root / "notes.txt").write_bytes(b"x")
        (store.root / "ab").mkdir(exist_ok=True)
        (store.root / "ab" / "short").write_bytes(b"x")
    assert set(store.digests()) == stored


def test_delete(backend: Backend) -> None:
    store = backend.store
    keep, _ = store.put(b"keep")
    gone, _ = store.put(b"bye")
    assert store.delete(gone) is True and store.delete(gone) is False
    assert not store.exists(gone) and store.exists(keep)
    with pytest.raises(BlobNotFoundError):
        store.get(gone)
    assert list(store.digests()) == [keep]


def test_probe_writes_and_leaves_nothing(backend: Backend) -> None:
    store = backend.store
    store.write_error = "left over from an earlier failure"
    assert store.probe() is None
    assert store.write_error is None and backend.names() == []
    assert store.remove_stale_temp_files(older_than_s=0.0) == 0


def test_oversize_and_failing_streams_store_nothing(backend: Backend) -> None:
    store = backend.store
    consumed: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in range(1_000_000):
            consumed.append(i)
            yield b"x" * 100

    with pytest.raises(OversizeError):
        store.put_stream(endless(), max_bytes=1_000)
    assert len(consumed) == 11  # stopped as soon as the limit was passed
    with pytest.raises(OversizeError):
        store.put(b"x" * 1_001, max_bytes=1_000)

    def broken() -> Iterator[bytes]:
        yield b"partial data"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):  # the caller's own failure, not turned into a storage error
        store.put_stream(broken())
    with pytest.raises(TypeError):
        store.put_stream(["not bytes"])
    assert backend.names() == []
    assert store.put_stream([b"x" * 1_000], max_bytes=1_000)[1] == 1_000


# ---------------------------------------------------------------- the S3 store's own behaviour


def test_keys_are_prefix_shard_digest(s3: Any) -> None:
    bucket = _bucket(s3)
    data = b"model bytes"
    for url, key_prefix in ((f"s3://{bucket}/a/b/", "a/b/"), (f"s3://{bucket}", "")):
        store = open_blob_store(url, "/nonexistent")
        assert isinstance(store, S3BlobStore)
        digest, _ = store.put(data)
        assert s3.get_object(Bucket=bucket, Key=f"{key_prefix}{digest[:2]}/{digest[2:]}")["Body"].read() == data
        assert store.describe(digest) == f"s3://{bucket}/{key_prefix}{digest[:2]}/{digest[2:]}"
    # the root store lists the blob at the top level only, not the one under a/b/
    assert list(store.digests()) == [digest]


def test_opening_a_missing_bucket_or_without_credentials_is_a_config_error(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as exc:
        open_blob_store("s3://no-such-bucket-here/x", "/nonexistent")
    assert "'no-such-bucket-here' does not exist" in str(exc.value)
    bucket = _bucket(s3)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError) as exc:
        S3BlobStore(bucket)
    assert "AWS_ACCESS_KEY_ID" in str(exc.value)


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 raises ImportError
    with pytest.raises(ConfigError) as exc:
        open_blob_store("s3://bucket/prefix", "/nonexistent")
    assert "pip install 'qflare[s3]'" in str(exc.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/var/lib/qflare/blobs", "unsupported"),
        ("file:///var/lib/qflare/blobs", "unsupported"),
        ("gs://bucket/prefix", "unsupported"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/a//b", "empty"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/prefix?region=eu", "AWS_ENDPOINT_URL"),
        ("s3://key:secret@bucket/prefix", "AWS_ENDPOINT_URL"),
        ("s3://bucket:9000/prefix", "AWS_ENDPOINT_URL"),
    ],
)
def test_unsupported_store_urls_are_refused(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        open_blob_store(url, "/nonexistent")
    assert expected in str(exc.value)


def test_no_url_is_the_file_store_and_the_environment_names_a_bucket(s3: Any, tmp_path: Path) -> None:
    for url in (None, "", "  "):
        store = open_blob_store(url, tmp_path)
        assert isinstance(store, BlobStore) and store.root == (tmp_path / "blobs").resolve()
    bucket = _bucket(s3)
    assert isinstance(blob_store_from_env(tmp_path, {}), BlobStore)
    from_env = blob_store_from_env(tmp_path, {BLOB_STORE_ENV: f"s3://{bucket}/p"})
    assert isinstance(from_env, S3BlobStore) and (from_env.bucket, from_env.prefix) == (bucket, "p")
    given = blob_store_from_env(tmp_path, {BLOB_STORE_ENV: f"s3://{bucket}/p"}, url=f"s3://{bucket}/q")
    assert isinstance(given, S3BlobStore) and given.prefix == "q"  # the explicit URL wins


def test_an_outage_is_a_typed_transient_error_and_the_probe_sees_recovery(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one try per call: the outage is seen at once
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        bucket = _bucket(boto3.client("s3"))
        store = S3BlobStore(bucket, "p")
        kept, _ = store.put(b"stored before the outage")
    finally:
        server.stop()
    calls: list[Callable[[], object]] = [
        lambda: store.put(b"during the outage"),
        lambda: store.get(kept),
        lambda: list(store.digests()),
        lambda: store.exists(kept),
        lambda: store.check(kept),
        lambda: store.delete(kept),
        lambda: S3BlobStore(bucket, "p"),
    ]
    for call in calls:
        with pytest.raises(StorageFullError) as exc:
            call()
        err = exc.value
        assert err.code == "storage_unavailable" and err.retry is Retry.TRANSIENT and err.http_status == 503
        assert f"s3://{bucket}/p" in err.message and err.retry_after_s > 0
    assert store.write_error is not None  # the failed put: readiness probes until a write succeeds
    problem = store.probe()
    assert problem is not None and store.write_error == problem
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # the service is back
    server.start()
    try:
        assert store.probe() is None and store.write_error is None
        assert store.get(kept) == b"stored before the outage"
    finally:
        server.stop()


def test_a_deleted_bucket_fails_writes_with_its_name(s3: Any) -> None:
    bucket = _bucket(s3)
    store = S3BlobStore(bucket, "p")
    s3.delete_bucket(Bucket=bucket)
    with pytest.raises(StorageFullError) as exc:
        store.put(b"x")
    assert exc.value.code == "storage_unavailable" and f"bucket '{bucket}' does not exist" in exc.value.message
    assert store.probe() is not None and bucket in str(store.write_error)


def test_stale_probe_objects_are_removed(s3: Any) -> None:
    bucket = _bucket(s3)
    store = S3BlobStore(bucket, "p")
    s3.put_object(Bucket=bucket, Key="p/.probe-left-by-a-crash", Body=b"\0")
    digest, _ = store.put(b"a blob")
    assert store.remove_stale_temp_files(older_than_s=3600.0) == 0  # written just now
    assert store.remove_stale_temp_files(older_than_s=0.0) == 1
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [store.key_for(digest)]


# ---------------------------------------------------------------- a coordinator on an S3 blob store


def test_server_runtime_publishes_into_the_bucket_and_verify_store_reads_it(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server_fixtures import make_runtime
    from typer.testing import CliRunner

    from qflare.cli import app
    from qflare.published import export_version

    bucket = _bucket(s3)
    url = f"s3://{bucket}/federation-1"
    runtime = make_runtime(tmp_path, blob_store=url)
    try:
        assert isinstance(runtime.blobs, S3BlobStore)
        model = runtime.coordinator.rounds.model
        key = f"federation-1/{model.sha256[:2]}/{model.sha256[2:]}"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == model.blob
        assert not (tmp_path / "blobs").exists()  # nothing in the data directory
        report = runtime.scrub()
        assert report.ok and report.checked == 1 and report.unreferenced == 0
        assert runtime.readiness()["storage"] is True
    finally:
        runtime.stop()

    # qflare models export reads the model from the store $QFLARE_BLOB_STORE names
    with pytest.raises(BlobNotFoundError):
        export_version(tmp_path, None, tmp_path / "no.safetensors")
    monkeypatch.setenv(BLOB_STORE_ENV, url)
    assert export_version(tmp_path, None, tmp_path / "model.safetensors").path.is_file()
    monkeypatch.delenv(BLOB_STORE_ENV)

    flipped = bytearray(model.blob)
    flipped[len(flipped) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))
    runner = CliRunner()
    result = runner.invoke(
        app, ["server", "verify-store", "--data-dir", str(tmp_path), "--blob-store", url, "--json"], env={}
    )
    assert result.exit_code == 1, result.output
    problem = {"path": f"s3://{bucket}/{key}", "sha256": model.sha256, "problem": "corrupt", "referenced": True}
    assert json.loads(result.stdout)["problems"] == [problem]
    result = runner.invoke(
        app, ["server", "verify-store", "--data-dir", str(tmp_path), "--json"], env={BLOB_STORE_ENV: url}
    )
    assert result.exit_code == 1 and json.loads(result.stdout)["problems"] == [problem]
    result = runner.invoke(app, ["server", "verify-store", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1  # the data directory's own blobs/: the model is missing there
    assert json.loads(result.stdout)["problems"][0]["problem"] == "missing"
