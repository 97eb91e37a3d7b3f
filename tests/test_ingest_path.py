"""The single-process upload path: each update hashed once, the device status cache, group commits.

Revocation must still take effect on the very next message with the status cache; the blob store may
skip its own hash only for bytes hashed by :class:`qflare.hashed.HashedBytes`; several uploads may share
one commit, but none is acknowledged before the commit recording it, so a crash between two batches
loses no acknowledged update.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from protocol_fixtures import Federation
from storage_fixtures import BACKENDS, scratch

from qflare.errors import PolicyError, QflareError, RevokedError
from qflare.hashed import HashedBytes
from qflare.protocol.commits import GroupCommit
from qflare.protocol.records import NewUpdate
from qflare.storage import BlobStore, Store, key_id
from qflare.storage.status_cache import ActiveDeviceCache

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def refused(code: str, fn, *args) -> QflareError:  # type: ignore[no-untyped-def]
    with pytest.raises(QflareError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return info.value


# ---------------------------------------------------------------------------- hashed once
def test_hashed_bytes_are_made_only_by_hashing_and_cannot_change() -> None:
    with pytest.raises(TypeError):
        HashedBytes(memoryview(b"x"), hashlib.sha256(b"y").hexdigest(), object())
    data = bytearray(b"update bytes")
    hashed = HashedBytes.of(data)
    data[0] ^= 0xFF  # the caller's buffer changes: the carried bytes do not (a mutable buffer is copied)
    assert bytes(hashed.data) == b"update bytes" and hashed.sha256 == hashlib.sha256(b"update bytes").hexdigest()
    assert hashed.data.readonly
    view = memoryview(b"0123456789")[2:6]  # a view of immutable bytes is kept as it is
    assert HashedBytes.of(view).data.obj is view.obj


def test_blob_store_trusts_a_carried_digest_only_from_hashed_bytes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    blobs = BlobStore(tmp_path)
    payload = os.urandom(100_000)
    hashed = HashedBytes.of(payload)
    calls: list[int] = []
    real = hashlib.sha256

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(len(args[0]) if args else 0)
        return real(*args)

    monkeypatch.setattr("qflare.storage.blobs.hashlib.sha256", counting)
    assert blobs.put(hashed, expected_sha256=hashed.sha256) == (hashed.sha256, len(payload))
    assert calls == []  # written under the carried digest, not hashed again
    wrong = hashlib.sha256(b"other").hexdigest()
    assert refused("hash_mismatch", blobs.put, hashed, wrong)
    # A digest handed over as a plain string is always checked against the bytes.
    assert refused("hash_mismatch", blobs.put, b"tampered", hashed.sha256)
    assert calls  # that path hashed
    monkeypatch.undo()
    assert blobs.check(hashed.sha256) is None  # the stored file really hashes to its name


def test_an_accepted_update_is_hashed_once_on_the_server(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fed = Federation(tmp_path, n=2, per_round=2, blobs=BlobStore(tmp_path / "blobs"))
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    update = fed.prepare(dev)
    size = len(update.payload)
    hashed_sizes: list[int] = []
    real_of, real_sha = HashedBytes.of.__func__, hashlib.sha256  # type: ignore[attr-defined]

    def counting_of(cls, data):  # type: ignore[no-untyped-def]
        hashed_sizes.append(len(memoryview(data)))
        return real_of(cls, data)

    def counting_sha(*args):  # type: ignore[no-untyped-def]
        hashed_sizes.append(len(args[0]) if args else 0)
        return real_sha(*args)

    monkeypatch.setattr(HashedBytes, "of", classmethod(counting_of))
    monkeypatch.setattr("qflare.storage.blobs.hashlib.sha256", counting_sha)
    receipt = dev.submit(update)
    monkeypatch.undo()
    big = [n for n in hashed_sizes if n > size // 2]
    assert len(big) == 1, hashed_sizes  # the update blob: once, when checked against the signed hash
    assert not receipt.duplicate and BlobStore(tmp_path / "blobs").check(receipt.update_hash) is None


# ---------------------------------------------------------------------------- status cache
def test_status_cache_reads_once_and_a_revocation_during_a_read_is_not_undone() -> None:
    cache = ActiveDeviceCache()
    reads: list[str] = []

    def read(device: str) -> str | None:
        reads.append(device)
        return "active"

    assert cache.status("d", read) == "active" and cache.status("d", read) == "active"
    assert reads == ["d"]
    cache.forget("d")
    assert cache.status("d", read) == "active" and reads == ["d", "d"]

    def racing(device: str) -> str | None:  # the revocation commits while this read is in flight
        cache.forget(device)
        return "active"

    cache.forget("e")
    assert cache.status("e", racing) == "active"
    assert cache.status("e", read) == "active" and reads[-1] == "e"  # the stale answer was not cached
    assert cache.status("f", lambda _: "revoked") == "revoked" and len(cache) == 2  # only "active" is kept


@pytest.mark.parametrize("via", ["coordinator", "store"])
def test_revocation_takes_effect_on_the_very_next_message_with_the_cache(tmp_path: Path, monkeypatch, via) -> None:  # type: ignore[no-untyped-def]
    fed = Federation(tmp_path, n=2, per_round=2)
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    update = fed.prepare(dev)
    reads: list[str] = []
    real = fed.store._read_device_status
    monkeypatch.setattr(fed.store, "_read_device_status", lambda d: reads.append(d) or real(d))
    dev.task()
    dev.task()
    fed.coordinator.check_upload_admissible(dev._session_id)
    assert reads.count(dev.device_id) <= 1  # served from the cache after the first read
    if via == "coordinator":
        fed.coordinator.revoke(dev.device_id, "lost")  # its sessions die too: the device's reconnect is refused
        refused("revoked", dev.task)
        refused("revoked", dev.connect)
    else:
        fed.store.revoke_device(dev.device_id, "revoked through the store")  # the session stays in memory
        refused("revoked", dev.task)
        refused("revoked", fed.coordinator.check_upload_admissible, dev._session_id)
        refused("revoked", dev.submit, update)


# ---------------------------------------------------------------------------- group commit
def test_group_commit_batches_waiters_and_gives_each_its_own_outcome() -> None:
    release, entered = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def flush(items: list[int]) -> list[int | BaseException]:
        batches.append(list(items))
        if len(batches) == 1:
            entered.set()
            assert release.wait(10)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    gc: GroupCommit[int, int] = GroupCommit(flush)
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            results[i] = gc.submit(i)
        except ValueError as exc:
            results[i] = str(exc)

    first = threading.Thread(target=one, args=(0,))
    first.start()
    assert entered.wait(10)
    others = [threading.Thread(target=one, args=(i,)) for i in range(1, 6)]
    for t in others:
        t.start()
    while len(gc._queue) < 5:  # all queued behind the running flush
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert batches == [[0], [1, 2, 3, 4, 5]] and gc.largest == 5 and gc.batches == 2
    assert results == {0: 0, 1: "odd 1", 2: 20, 3: "odd 3", 4: 40, 5: "odd 5"}


def test_group_commit_flush_failure_reaches_every_waiter_of_the_batch() -> None:
    def flush(items: list[int]) -> list[int]:
        raise OSError("disk gone")

    gc: GroupCommit[int, int] = GroupCommit(flush)
    with pytest.raises(OSError, match="disk gone"):
        gc.submit(1)
    gc2: GroupCommit[int, int] = GroupCommit(lambda items: [1])  # a flush that loses an outcome
    gc2.submit(1)
    with pytest.raises(RuntimeError, match="outcomes"):
        GroupCommit(lambda items: []).submit(1)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with scratch(request.param, tmp_path) as database:
        yield Store(database, clock=lambda: T0)


def test_record_updates_one_transaction_refuses_entries_one_by_one(store: Store) -> None:
    ids = []
    for i in range(4):
        key = bytes([65 + i]) * 32
        store.add_device(key_id(key), "ML-DSA-65", key, b"rec")
        ids.append(key_id(key))
    a, b, c, d = ids
    store.open_round(1, "m0", [a, b, d], 1, 3, T0 + timedelta(minutes=10))
    store.record_update(1, d, "ud", "m0", 1, b"sig", {})
    store.revoke_device(b, "compromised")
    batch = [
        NewUpdate(1, a, "ua", "m0", 10, b"sig", {"loss": 0.5}),
        NewUpdate(1, b, "ub", "m0", 10, b"sig", {}),  # revoked
        NewUpdate(1, c, "uc", "m0", 10, b"sig", {}),  # not selected
        NewUpdate(1, d, "ud", "m0", 1, b"sig", {}),  # already recorded: idempotent
        NewUpdate(1, a, "ua", "m0", 10, b"", {}),  # bad argument, refused before the transaction
    ]
    out = store.record_updates(batch)
    assert isinstance(out[0], tuple) and out[0][1] and out[0][0].metrics == {"loss": 0.5}
    assert isinstance(out[1], RevokedError)
    assert isinstance(out[2], PolicyError) and out[2].code == "not_selected"
    assert isinstance(out[3], tuple) and not out[3][1]
    assert isinstance(out[4], QflareError)
    assert sorted(u.device_id for u in store.updates_for_round(1)) == sorted([a, d])


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from protocol_fixtures import Federation
    from qflare.storage import BlobStore

    tmp = Path({tmp!r})
    fed = Federation(tmp, n=6, per_round=6, blobs=BlobStore(tmp / "blobs"))
    rm = fed.coordinator.rounds
    rm.open_next()
    devices = fed.selected()
    updates = [fed.prepare(d, seed=i) for i, d in enumerate(devices)]
    flushes = [0]
    real_one, real_many = fed.store.record_update, fed.store.record_updates

    def hold_first():
        flushes[0] += 1
        if flushes[0] == 1:  # let the other two uploads queue up behind this commit: they share the next
            while len(rm._commits._queue) < 2:
                time.sleep(0.01)
        if flushes[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # between two batches: before the third one commits

    def one(*a, **k):
        hold_first()
        return real_one(*a, **k)

    def many(batch):
        hold_first()
        return real_many(batch)

    fed.store.record_update, fed.store.record_updates = one, many
    lock = threading.Lock()

    def submit(i):
        receipt = devices[i].submit(updates[i])
        with lock:
            print("ACK", devices[i].device_id, receipt.update_hash, flush=True)

    for wave in ((0, 1, 2), (3, 4, 5)):
        threads = [threading.Thread(target=submit, args=(i,)) for i in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("LARGEST", rm._commits.largest, flush=True)
    """
)


def test_kill_9_between_commit_batches_loses_no_acknowledged_update(tmp_path: Path) -> None:
    code = _CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert child.returncode == -9, child.stderr
    lines = child.stdout.split("\n")
    acked = {tuple(line.split()[1:]) for line in lines if line.startswith("ACK")}
    assert len(acked) == 3 and "LARGEST 2" in lines, child.stdout  # one commit of 1, then one of 2
    restarted = Federation(tmp_path, n=1, per_round=6, blobs=BlobStore(tmp_path / "blobs"))
    stored = {(u.device_id, u.update_hash) for u in restarted.store.updates_for_round(1)}
    assert stored == acked  # every acknowledged update is durable; the batch that never committed is absent
    rnd = restarted.coordinator.rounds.current
    assert rnd is not None and set(rnd.accepted.items()) == acked  # and folded in again at the restart
    assert all(BlobStore(tmp_path / "blobs").check(h) is None for _, h in acked)


def test_a_retry_of_an_update_waiting_for_its_commit_waits_and_is_acknowledged_as_a_duplicate(tmp_path: Path) -> None:
    import torch

    from qflare.strategy import ClientUpdate

    fed = Federation(tmp_path, n=2, per_round=2)
    rm = fed.coordinator.rounds
    rnd = rm.open_next()
    assert rnd is not None
    device = rnd.selected[0]
    update = ClientUpdate(device, torch.zeros(fed.layout.numel), 5, {})
    digest = hashlib.sha256(b"an update").hexdigest()
    entered, release = threading.Event(), threading.Event()
    real = fed.store.record_update

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(10)
        return real(*args, **kwargs)

    fed.store.record_update = slow  # type: ignore[method-assign]
    results: list[tuple[int, bool]] = []

    def accept() -> None:
        results.append(rm.accept(update, digest, rnd.base.sha256, b"sig", b"blob", round_number=rnd.number))

    first = threading.Thread(target=accept)
    first.start()
    assert entered.wait(10)
    assert device in rnd.pending and device not in rnd.accepted  # not acknowledged before the commit
    retry = threading.Thread(target=accept)
    retry.start()
    retry.join(0.3)
    assert retry.is_alive() and results == []  # the retry waits for the first commit
    rm.tick()
    release.set()
    first.join(10)
    retry.join(10)
    assert sorted(results) == [(1, False), (1, True)] and fed.store.count_updates(1) == 1
    assert not rnd.pending and rnd.accepted == {device: digest}
