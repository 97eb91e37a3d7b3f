"""Fault drills for the coordinator's storage and rounds: refused updates that leave no blob, stored
signatures that re-verify, failed rounds that do not wedge the federation, a full disk (a typed 503 and
recovery without a restart), corrupt blobs found by the scrub, and a crash between blob write and record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from protocol_fixtures import FakeClock, Federation

from qflare.crypto import SignedEnvelope, VerifyKey
from qflare.crypto.envelope import Field, MsgType, u64
from qflare.crypto.payloads import SignedUpdate, pack_signed
from qflare.crypto.suite import sha256
from qflare.errors import QflareError, Retry, StorageFullError
from qflare.protocol import Coordinator, RoundConfig
from qflare.storage import BlobStore
from qflare.strategy import fedavg
from qflare.wire import encode_update


def blob_files(root: Path) -> set[str]:
    """Every file under a blob store root (blobs and temporary files), relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def restart(fed: Federation, blobs: BlobStore | None, clock=None, **rounds) -> Coordinator:
    """A new coordinator process on the same database and blobs (the strategy state comes from them)."""
    cfg = {"rounds": 3, "per_round": 2, "seed": 0, **rounds}
    return Coordinator(
        layout=fed.layout,
        initial_flat=torch.zeros(fed.layout.numel),
        strategy=fedavg(),
        identity=fed.identity,
        store=fed.store,
        rounds=RoundConfig(**cfg),
        blobs=blobs,
        clock=clock or time.time,
    )


def submit_all(fed: Federation, devices=None) -> None:
    for k, dev in enumerate(devices or fed.selected()):
        dev.submit(fed.prepare(dev, seed=k))


# ---------------------------------------------------------------------------- item 5: refused before written
def test_non_finite_metadata_is_refused_before_the_blob_is_written(tmp_path: Path) -> None:
    """METADATA {"loss": NaN} used to be refused by the database after the update blob was on disk: a new
    blob per attempt filled the disk.  Now it is refused first, recorded, and leaves no file."""
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, blobs=blobs)
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    task = dev.task()
    model = dev.fetch_model(task)
    before = blob_files(blobs.root)
    for attempt in range(3):  # each attempt with a new blob
        blob = encode_update(fed.layout, fed.result(seed=attempt).delta, {"round": str(task.round)})
        fields = {
            Field.DEVICE_KEY_ID: dev.identity.public.key_id_bytes,
            Field.ROUND: u64(task.round),
            Field.BASE_MODEL_HASH: bytes.fromhex(model.sha256),
            Field.UPDATE_HASH: sha256(blob),
            Field.NUM_EXAMPLES: u64(5),
            Field.PAYLOAD_SIZE: u64(len(blob)),
            Field.METADATA: b'{"loss":NaN}',
        }
        env = SignedEnvelope.sign(dev.suite, MsgType.UPDATE, fields, dev.identity)
        events = len(fed.events())
        with pytest.raises(QflareError) as info:
            dev.submit(SignedUpdate(task.round, pack_signed(env.to_bytes(), blob), sha256(blob).hex()))
        assert info.value.code == "malformed"  # the signed metrics are parsed strictly before anything else
        assert fed.events()[: len(fed.events()) - events] == ["malformed"]
    assert blob_files(blobs.root) == before  # no orphan blob, no temporary file
    assert fed.store.count_updates(1) == 0


# ---------------------------------------------------------------------------- item 7: re-verifiable updates
def test_every_stored_update_signature_reverifies_from_the_database(tmp_path: Path) -> None:
    """The exact signed envelope is stored: every stored signature re-verifies with the device's enrolled
    key, and its signed fields are the row's, even when the signed metric names are longer than the
    64 characters kept in the metrics column."""
    fed = Federation(tmp_path, n=3, per_round=3, rounds=2)
    rm = fed.coordinator.rounds
    long_name = "a_training_metric_whose_name_is_much_longer_than_sixty_four_characters_in_all"
    for _ in range(2):
        rm.open_next()
        for k, dev in enumerate(fed.selected()):
            task = dev.task()
            model = dev.fetch_model(task)
            result = fed.result(seed=k)
            blob = encode_update(fed.layout, result.delta, {"round": str(task.round)})
            from qflare.crypto import sign_update

            dev.submit(sign_update(dev.identity, dev.suite, task.round, model.sha256, 5, blob, {long_name: 1.5}))
    rows = [u for r in (1, 2) for u in fed.store.updates_for_round(r)]
    assert len(rows) == 6
    for row in rows:
        assert row.envelope is not None
        env = SignedEnvelope.parse(row.envelope)
        device = fed.store.get_device(row.device_id)
        assert device is not None
        env.verify(VerifyKey.from_bytes(device.sig_alg, device.sig_public_key))
        assert env.signature == row.signature
        assert env.get(Field.UPDATE_HASH).hex() == row.update_hash
        assert env.get_int(Field.ROUND) == row.round_number
        assert env.get(Field.BASE_MODEL_HASH).hex() == row.base_model_hash
        assert json.loads(env.fields[Field.METADATA]) == {long_name: 1.5}


def test_an_envelope_that_does_not_carry_the_signature_is_refused(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=2, per_round=2)
    rnd = fed.coordinator.rounds.open_next()
    dev = fed.devices[0].device_id
    with pytest.raises(QflareError) as info:
        fed.store.record_update(1, dev, "ab" * 32, rnd.base.sha256, 5, b"sig", {}, envelope=b"other bytes")
    assert info.value.code == "validation_error"
    assert fed.store.count_updates(1) == 0


# ---------------------------------------------------------------------------- item 10: failed rounds
def test_outage_longer_than_the_deadline_fails_one_round_and_the_next_ones_publish(tmp_path: Path) -> None:
    """Round 2's devices are cut off past its deadline: round 2 fails, round 3 publishes model v2 (not
    "v3", which storage refused as stale and wedged the federation), and a restart proceeds."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, rounds=4, round_timeout_s=60.0, blobs=blobs, clock=clock)
    rm = fed.coordinator.rounds
    rm.open_next()
    submit_all(fed)
    assert rm.model.version == 1
    rm.open_next()  # round 2: nobody gets through
    clock.advance(61.0)
    rm.tick()
    assert fed.store.get_round(2).state == "failed"
    assert rm.open_next().number == 3
    submit_all(fed)  # Device.fetch_model asks for the task's model version (1), not the round number
    assert fed.store.get_round(3).state == "closed"
    assert rm.model.version == 2 and rm.model.round_number == 3
    assert [(m.version, m.round_number) for m in fed.store.list_models()] == [(0, None), (1, 1), (2, 3)]

    again = restart(fed, blobs, clock, rounds=4)
    assert again.rounds.model.version == 2 and again.rounds.model.sha256 == rm.model.sha256
    assert again.rounds.open_next().number == 4


def test_restart_after_the_deadline_keeps_acknowledged_updates(tmp_path: Path) -> None:
    """One of two updates was acknowledged, then the coordinator was down past the deadline: the restart
    gives the round a new deadline instead of failing it and discarding the acknowledged update."""
    clock = FakeClock()
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, round_timeout_s=60.0, blobs=blobs, clock=clock)
    fed.coordinator.rounds.open_next()
    first, second = fed.selected()
    first.submit(fed.prepare(first, seed=0))
    clock.advance(3600.0)  # the outage
    again = restart(fed, blobs, clock, round_timeout_s=60.0)
    again.rounds.tick()
    rnd = again.rounds.current
    assert rnd is not None and rnd.number == 1 and set(rnd.accepted) == {first.device_id}
    assert fed.store.get_round(1).state == "open" and rnd.deadline > clock()
    fed.transport.inner.coordinator = again  # the devices reach the restarted coordinator
    second.connect()
    second.submit(fed.prepare(second, seed=1))
    assert fed.store.get_round(1).state == "closed" and again.rounds.model.version == 1
    assert fed.store.count_updates(1) == 2


def test_an_unreadable_acknowledged_update_fails_its_round_at_restart_instead_of_blocking_it(tmp_path: Path) -> None:
    """A blob of the open round damaged while the coordinator was down: the restart records the damage,
    fails that round visibly and opens the next one, instead of refusing to start for ever."""
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, round_timeout_s=60.0, blobs=blobs)
    fed.coordinator.rounds.open_next()
    first, _ = fed.selected()
    first.submit(fed.prepare(first, seed=0))
    (stored,) = fed.store.updates_for_round(1)
    path = blobs.path_for(stored.update_hash)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    again = restart(fed, blobs)  # used to raise blob_corrupt here, on every start
    assert fed.store.get_round(1).state == "failed" and again.rounds.current is None
    assert "blob_corrupt" in fed.events()
    assert again.rounds.open_next().number == 2


# ---------------------------------------------------------------------------- item 13: full storage
class FlakyBlobs(BlobStore):
    """A blob store whose writes fail as a full disk does while ``full`` is set."""

    full = False

    def put_stream(self, chunks, expected_sha256=None, max_bytes=None):  # type: ignore[no-untyped-def]
        if self.full:
            self.write_error = "No space left on device"
            raise StorageFullError("the coordinator cannot write its blob store: No space left on device")
        return super().put_stream(chunks, expected_sha256, max_bytes)


def test_an_update_whose_blob_cannot_be_written_is_refused_as_storage_full_and_retried(tmp_path: Path) -> None:
    blobs = FlakyBlobs(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, blobs=blobs)
    rm = fed.coordinator.rounds
    rm.open_next()
    first, second = fed.selected()
    first.submit(fed.prepare(first, seed=0))
    update = fed.prepare(second, seed=1)
    blobs.full = True
    with pytest.raises(StorageFullError) as info:  # its blob cannot be written: refused, retryable
        second.submit(update)
    assert info.value.retry is Retry.TRANSIENT and info.value.http_status == 503
    assert fed.events()[0] == "storage_full" and fed.store.count_updates(1) == 1
    blobs.full = False
    second.connect()
    receipt = second.submit(update)  # the same signed update, once space is back
    assert receipt.updates_in_round == 2 and not receipt.duplicate
    assert fed.store.get_round(1).state == "closed" and rm.model.version == 1


def test_a_round_whose_publication_cannot_be_written_is_retried_and_survives_a_restart(tmp_path: Path) -> None:
    blobs = FlakyBlobs(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, blobs=blobs)
    rm = fed.coordinator.rounds
    rm.open_next()
    first, second = fed.selected()
    first.submit(fed.prepare(first, seed=0))
    update = fed.prepare(second, seed=1)
    rm_blobs_put = blobs.put_stream
    calls = {"n": 0}

    def fail_after_update(chunks, expected_sha256=None, max_bytes=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:  # the update's blob is written, the model's is not
            raise StorageFullError("No space left on device")
        return rm_blobs_put(chunks, expected_sha256, max_bytes)

    blobs.put_stream = fail_after_update  # type: ignore[method-assign]
    receipt = second.submit(update)
    assert receipt.updates_in_round == 2 and not receipt.duplicate  # acknowledged
    assert fed.store.get_round(1).state == "aggregating" and rm.model.version == 0
    assert rm.status()["state"] == "aggregating"
    rm.tick()  # still full: still waiting, nothing lost
    assert fed.store.get_round(1).state == "aggregating" and fed.store.count_updates(1) == 2

    again = restart(fed, blobs)  # a restart while the disk is full proceeds
    assert again.rounds.current is not None and again.rounds.current.number == 1
    blobs.put_stream = rm_blobs_put  # type: ignore[method-assign]
    again.rounds.tick()  # space is back: published without a restart
    assert fed.store.get_round(1).state == "closed" and again.rounds.model.version == 1
    assert again.rounds.open_next().number == 2


def test_a_round_waiting_for_storage_asks_nobody_else_to_train(tmp_path: Path) -> None:
    """Closed at its deadline with two of three updates, the round's publication waits for storage: the
    third device is not told to train, and its upload is refused from the session alone."""
    clock = FakeClock()
    blobs = FlakyBlobs(tmp_path / "blobs")
    fed = Federation(tmp_path, n=3, per_round=3, min_participants=2, round_timeout_s=60.0, blobs=blobs, clock=clock)
    rm = fed.coordinator.rounds
    rm.open_next()
    devices = fed.selected()
    for k, dev in enumerate(devices[:2]):
        dev.submit(fed.prepare(dev, seed=k))
    late = devices[2]
    blobs.full = True
    clock.advance(61.0)
    rm.tick()  # aggregates the two at the deadline; the model cannot be written
    assert fed.store.get_round(1).state == "aggregating"
    task = late.task()
    assert task.state == "open" and not task.selected
    with pytest.raises(QflareError) as info:
        fed.coordinator.check_upload_admissible(late._session_id)
    assert info.value.code == "round_not_open"
    blobs.full = False
    rm.tick()
    assert fed.store.get_round(1).state == "closed" and rm.model.version == 1


# ---------------------------------------------------------------------------- the drills over HTTP / processes
def _server_with_two_devices(data_dir: Path):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient
    from server_fixtures import make_runtime, new_device

    from qflare.server import create_app

    runtime = make_runtime(data_dir, per_round=2, min_devices=2, rounds=2, evaluate=False)
    client = TestClient(create_app(runtime))
    client.__enter__()
    devices = [new_device(client) for _ in range(2)]
    for dev, token in zip(devices, runtime.coordinator.create_tokens(2), strict=True):
        dev.enroll(token)
        dev.connect()
    runtime.step()
    return runtime, client, devices


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte with one file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a small tmpfs needs root on Linux")
def test_full_disk_is_a_typed_503_readiness_reports_it_and_service_resumes_without_restart(tmp_path: Path) -> None:
    from server_fixtures import train_and_submit

    blobs_dir = tmp_path / "blobs"
    blobs_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(blobs_dir)], check=True)
    try:
        runtime, client, devices = _server_with_two_devices(tmp_path)
        try:
            before = blob_files(blobs_dir)
            filler = _fill(blobs_dir)
            events = {e.id for e in runtime.store.security_events(limit=1000)}
            sent: list = []
            real_post = client.post

            def post(*args, **kwargs):  # type: ignore[no-untyped-def]
                sent.append(resp := real_post(*args, **kwargs))
                return resp

            client.post = post  # type: ignore[method-assign]
            with pytest.raises(QflareError) as info:
                train_and_submit(devices[0], 0, 2)
            assert info.value.code == "storage_full" and info.value.retry is Retry.TRANSIENT
            assert sent[-1].status_code == 503 and int(sent[-1].headers["Retry-After"]) >= 1
            assert sent[-1].json()["code"] == "storage_full"
            new = [e.reason for e in runtime.store.security_events(limit=1000) if e.id not in events]
            assert new == ["storage_full"]
            assert blob_files(blobs_dir) == before | {"filler"}  # no orphan blob, no temporary file
            assert runtime.store.count_updates(1) == 0
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["storage"] is False

            filler.unlink()  # space returns: no restart
            assert client.get("/readyz").status_code == 200
            devices[0].connect()
            for i, dev in enumerate(devices):
                train_and_submit(dev, i, 2)
            assert runtime.store.get_round(1).state == "closed"
            assert runtime.coordinator.rounds.model.version == 1
        finally:
            client.__exit__(None, None, None)
    finally:
        subprocess.run(["umount", str(blobs_dir)], check=False)


def test_flipped_bytes_in_a_stored_blob_are_reported_by_path_and_recorded(tmp_path: Path) -> None:
    from server_fixtures import train_and_submit
    from typer.testing import CliRunner

    from qflare.cli import app

    runtime, client, devices = _server_with_two_devices(tmp_path)
    try:
        for i, dev in enumerate(devices):
            train_and_submit(dev, i, 2)
        update = runtime.store.updates_for_round(1)[0]
        path = runtime.blobs.path_for(update.update_hash)
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        report = runtime.scrub()  # the background scrub: the blob is never read again otherwise
        assert [(p.path, p.problem) for p in report.problems] == [(str(path), "corrupt")]
        assert runtime.scrub().problems and [
            e.reason for e in runtime.store.security_events(limit=100) if "verify-store" in e.detail
        ] == ["blob_corrupt"]  # recorded once, not every scrub
    finally:
        client.__exit__(None, None, None)
        runtime.stop()

    result = CliRunner().invoke(app, ["server", "verify-store", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["problems"] == [
        {"path": str(path), "sha256": update.update_hash, "problem": "corrupt", "referenced": True}
    ]
    from qflare.storage import Database, Store

    db = Database.from_env(tmp_path, {})
    try:
        details = [e.detail for e in Store(db).security_events(limit=100) if e.reason == "blob_corrupt"]
    finally:
        db.dispose()
    assert len(details) == 2 and all(str(path) in d and "backup" in d for d in details)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from protocol_fixtures import Federation
    from qflare.storage import BlobStore

    tmp = Path({tmp!r})
    fed = Federation(tmp, n=2, per_round=2, blobs=BlobStore(tmp / "blobs"))
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    update = fed.prepare(dev)
    print(update.update_hash, flush=True)
    fed.store.record_update = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    dev.submit(update)
    """
)


def test_kill_9_between_blob_write_and_record_leaves_no_orphan_after_restart(tmp_path: Path) -> None:
    from server_fixtures import GENEROUS, SPEC

    from qflare.server import ServerConfig, ServerRuntime
    from qflare.storage.scrub import verify_store

    code = _CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == -9, child.stderr
    digest = child.stdout.split()[0]
    orphan = tmp_path / "blobs" / digest[:2] / digest[2:]
    assert orphan.is_file()  # written, never recorded, never acknowledged

    config = ServerConfig(
        data_dir=tmp_path, federation=SPEC.replace(per_round=2), round_loop=False, evaluate=False, http=GENEROUS
    )
    runtime = ServerRuntime(config, environ={"QFLARE_DATABASE_URL": f"sqlite:///{tmp_path}/coordinator.db"})
    try:
        assert not orphan.exists()  # collected at start-up
        assert runtime.store.count_updates(1) == 0 and runtime.coordinator.rounds.current is not None
        report = verify_store(runtime.store, runtime.blobs, record_events=False)
        assert report.ok and report.unreferenced == 0 and report.checked == 1  # the model v0 blob
    finally:
        runtime.stop()
