"""Coordinators that share their sessions (``CoordinatorConfig.shared_sessions``).

Two :class:`Coordinator` objects on one database (each with its own engine, as two processes would
have), one blob directory and one identity key serve one federation: a device's requests alternate
between them.  Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from protocol_fixtures import FakeClock
from sqlalchemy import event, select, update
from storage_fixtures import BACKENDS, race, scratch

from qflare.crypto import Channel, SigningKey, open_task, open_task_request, seal_task, seal_task_request
from qflare.crypto.channel import FRAME_HEADER_LEN
from qflare.crypto.shared_channel import SharedChannel
from qflare.crypto.wrap import StateKey
from qflare.errors import AuthError, QflareError
from qflare.models import create_model
from qflare.protocol import Coordinator, CoordinatorConfig, Device, RoundConfig, Route
from qflare.storage import BlobStore, Database, Store
from qflare.storage import tables as t
from qflare.strategy import fedavg
from qflare.training import TrainResult
from qflare.wire import ParamLayout

LIFETIME_S = 600


class Workers:
    """A transport that hands each request to the worker named next in ``plan`` (else ``default``)."""

    def __init__(self, workers: dict[str, Coordinator]) -> None:
        self.workers = workers
        self.plan: list[str] = []
        self.default = "A"
        self.sent: list[tuple[str, Route, bytes, str | None]] = []

    def then(self, *names: str) -> Workers:
        self.plan.extend(names)
        return self

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        name = self.plan.pop(0) if self.plan else self.default
        self.sent.append((name, Route(route), body, session_id))
        return self.workers[name].handle(route, body, session_id=session_id, remote=f"worker-{name}")


@dataclass
class Cluster:
    dbs: list[Database]
    stores: list[Store]
    a: Coordinator
    b: Coordinator
    clock: FakeClock
    layout: ParamLayout
    identity: SigningKey
    transport: Workers = field(init=False)

    def __post_init__(self) -> None:
        self.transport = Workers({"A": self.a, "B": self.b})

    @property
    def store(self) -> Store:
        return self.stores[0]

    def device(self) -> Device:
        dev = Device(
            transport=self.transport,
            identity=SigningKey.generate(),
            server_key=self.identity.public,
            layout=self.layout,
            clock=self.clock,
        )
        self.transport.then("A")
        dev.enroll(self.a.create_tokens(1, ttl_s=60)[0])
        return dev

    def row(self, sid: str) -> tuple[int | None, int | None, datetime | None]:
        found = self.store.shared_session(sid)
        assert found is not None
        return found.last_recv, found.next_send, found.closed_at

    def event_ids(self) -> set[int]:
        return {e.id for e in self.store.security_events(limit=10_000)}

    def new_events(self, before: set[int]) -> list[tuple[str, str | None]]:
        """Security events since ``before`` was taken, oldest first."""
        events = reversed(self.store.security_events(limit=10_000))
        return [(e.reason, e.device_id) for e in events if e.id not in before]


def _coordinator(
    db: Database, identity: SigningKey, clock: FakeClock, blobs: Path, shared: bool = True
) -> tuple[Coordinator, Store, ParamLayout]:
    store = Store(db, clock=lambda: datetime.fromtimestamp(clock(), UTC))
    torch.manual_seed(0)
    model = create_model("mlp", (1, 8, 8), 10)
    layout = ParamLayout.from_module(model)
    coordinator = Coordinator(
        layout=layout,
        initial_flat=layout.module_to_flat(model),
        strategy=fedavg(),
        identity=identity,
        store=store,
        rounds=RoundConfig(rounds=3, per_round=1, seed=0, round_timeout_s=600.0, min_participants=1),
        config=CoordinatorConfig(shared_sessions=shared, session_lifetime_s=LIFETIME_S, crypto_ops_per_s=None),
        blobs=BlobStore(blobs),
        clock=clock,
    )
    return coordinator, store, layout


@pytest.fixture(params=BACKENDS)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with scratch(request.param, tmp_path) as first:
        second = Database(first.engine.url.render_as_string(hide_password=False))
        try:
            identity, clock = SigningKey.generate(), FakeClock()
            a, store_a, layout = _coordinator(first, identity, clock, tmp_path / "blobs")  # makes model version 0
            b, store_b, _ = _coordinator(second, identity, clock, tmp_path / "blobs")  # recovers it
            yield Cluster([first, second], [store_a, store_b], a, b, clock, layout, identity)
        finally:
            second.dispose()


def _refused(code: str, fn, *args, **kwargs) -> QflareError:  # type: ignore[no-untyped-def]
    with pytest.raises(QflareError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value}"
    return info.value


# -- a device served by both ----------------------------------------------------------------------


def test_a_session_made_on_one_worker_is_honoured_by_the_other(cluster: Cluster) -> None:
    dev = cluster.device()  # enrolled on A
    cluster.transport.then("A", "B")
    sid = dev.connect()
    assert [(n, r) for n, r, _, _ in cluster.transport.sent[-2:]] == [("A", Route.HELLO), ("B", Route.FINISH)]
    assert cluster.row(sid) == (-1, 0, None)
    cluster.transport.then("B")
    task = dev.task()
    assert task.state == "waiting"
    assert cluster.row(sid)[:2] == (0, 1)
    cluster.transport.then("A")
    assert dev.task().state == "waiting"
    assert cluster.row(sid)[:2] == (1, 2)
    cluster.transport.then("B")
    model = dev.fetch_model(dev.task())  # two more requests, both on B: the model verifies
    assert model.version == 0 and cluster.row(sid)[:2] == (3, 4)
    assert cluster.a.pending_handshakes == cluster.b.pending_handshakes == 0
    # the keys are in the database only wrapped
    with cluster.dbs[0].connect(write=False) as conn:
        wrapped = conn.execute(select(t.Session.wrapped_keys).where(t.Session.session_id == sid)).scalar_one()
    assert dev._channel is not None
    for key in dev._channel.unsafe_keys():
        assert key not in wrapped


def test_an_update_is_accepted_on_a_session_finished_by_another_worker(cluster: Cluster) -> None:
    dev = cluster.device()
    cluster.transport.then("B", "B")
    dev.connect()  # the whole handshake on B; the round is A's (rounds across workers are not this test's)
    rnd = cluster.a.rounds.open_next()
    assert rnd is not None and dev.device_id in rnd.selected
    cluster.a.check_upload_admissible(dev._session_id)  # the HTTP layer's header check reads the shared row
    _refused("unknown_session", cluster.a.check_upload_admissible, "cd" * 32)
    task = dev.task()
    model = dev.fetch_model(task)
    delta = torch.full((cluster.layout.numel,), 0.01)
    receipt = dev.submit(dev.prepare_update(task, model, TrainResult(delta, 5, 1.0, 0.01, 1)))
    assert receipt.round == rnd.number and not receipt.duplicate
    assert cluster.store.count_updates(rnd.number) == 1


def test_a_frame_replayed_to_the_other_worker_is_refused(cluster: Cluster) -> None:
    dev = cluster.device()
    sid = dev.connect()
    dev.task()  # on A
    _, route, frame, _ = cluster.transport.sent[-1]
    before, ids = cluster.row(sid), cluster.event_ids()
    exc = _refused("replay", cluster.b.handle, route, frame, session_id=sid, remote="attacker")
    assert exc.device_id is None  # the frame was refused before it authenticated: sender unproven
    assert cluster.row(sid) == before
    assert cluster.new_events(ids) == [("replay", None)]
    _refused("replay", cluster.a.handle, route, frame, session_id=sid)  # and on the worker that took it
    assert cluster.row(sid) == before
    cluster.transport.then("B")
    assert dev.task().state == "waiting"  # the device carries on


def test_a_finish_replayed_to_the_other_worker_is_refused(cluster: Cluster) -> None:
    dev = cluster.device()
    cluster.transport.then("A", "A")
    dev.connect()
    (_, _, hello, _), (_, _, finish, _) = cluster.transport.sent[-2:]
    ids = cluster.event_ids()
    _refused("unknown_handshake", cluster.b.handle, Route.FINISH, finish)
    _refused("replay", cluster.b.handle, Route.HELLO, hello)  # the hello replay cache is shared too
    assert cluster.new_events(ids) == [("unknown_handshake", None), ("replay", None)]


def test_exactly_one_worker_finishes_a_handshake(cluster: Cluster) -> None:
    dev = cluster.device()
    from qflare.crypto import ClientHandshake

    hs = ClientHandshake(dev.identity, cluster.identity.public, clock=cluster.clock)
    reply = cluster.a.handle(Route.HELLO, hs.start())
    finish, channel = hs.finish(reply)
    body = hashlib.sha256(reply).digest() + finish
    outcomes = race(2, lambda i: (cluster.a, cluster.b)[i].handle(Route.FINISH, body))
    won = [o for o in outcomes if isinstance(o, bytes)]
    lost = [o for o in outcomes if isinstance(o, QflareError)]
    assert won == [channel.session_id.hex().encode()] and [e.code for e in lost] == ["unknown_handshake"]


def test_a_new_handshake_on_one_worker_ends_the_session_on_the_other(cluster: Cluster) -> None:
    dev = cluster.device()
    old = dev.connect()
    cluster.transport.then("A")
    dev.task()  # A holds the old session's keys now
    cluster.transport.then("B", "B")
    new = dev.connect()
    assert cluster.row(old)[2] is not None and cluster.row(new)[2] is None
    _refused("unknown_session", cluster.a.handle, Route.TASK, b"\x00" * 40, session_id=old)
    cluster.transport.then("A")
    assert dev.task().state == "waiting"


def test_a_revoked_devices_session_is_refused_on_the_other_worker(cluster: Cluster) -> None:
    dev = cluster.device()
    sid = dev.connect()
    cluster.transport.then("B")
    dev.task()  # B holds the session's keys
    assert dev._channel is not None
    frame = seal_task_request(dev._channel)
    cluster.a.revoke(dev.device_id, "lost device")
    exc = _refused("revoked", cluster.b.handle, Route.TASK, frame, session_id=sid)
    assert exc.device_id is None
    cluster.transport.then("B")
    _refused("revoked", dev.connect)  # and it cannot make another


def test_an_expired_session_is_refused_on_both_workers(cluster: Cluster) -> None:
    dev = cluster.device()
    sid = dev.connect()
    assert dev._channel is not None
    first, second = seal_task_request(dev._channel), seal_task_request(dev._channel)
    cluster.clock.advance(LIFETIME_S + 1)
    before = cluster.row(sid)
    _refused("session_expired", cluster.a.handle, Route.TASK, first, session_id=sid)
    _refused("session_expired", cluster.b.handle, Route.TASK, second, session_id=sid)
    assert cluster.row(sid) == before


def test_a_handshake_finished_too_late_is_refused(cluster: Cluster) -> None:
    dev = cluster.device()
    from qflare.crypto import ClientHandshake

    hs = ClientHandshake(dev.identity, cluster.identity.public, clock=cluster.clock)
    reply = cluster.a.handle(Route.HELLO, hs.start())
    assert cluster.b.pending_handshakes == 1  # every worker's are counted
    finish, _ = hs.finish(reply)
    cluster.clock.advance(cluster.b.config.handshake_timeout_s + 1)
    assert cluster.b.pending_handshakes == 0
    _refused("handshake_expired", cluster.b.handle, Route.FINISH, hashlib.sha256(reply).digest() + finish)


# -- tampering ---------------------------------------------------------------------------------------


def test_tampered_wrapped_keys_give_unknown_session(cluster: Cluster) -> None:
    dev = cluster.device()
    cluster.transport.then("A", "A")
    sid = dev.connect()  # B has never seen this session: it must unwrap the row
    with cluster.dbs[0].connect() as conn:
        wrapped = conn.execute(select(t.Session.wrapped_keys).where(t.Session.session_id == sid)).scalar_one()
        flipped = wrapped[:-1] + bytes((wrapped[-1] ^ 1,))
        conn.execute(update(t.Session).where(t.Session.session_id == sid).values(wrapped_keys=flipped))
    assert dev._channel is not None
    frame = seal_task_request(dev._channel)
    before, ids = cluster.row(sid), cluster.event_ids()
    exc = _refused("unknown_session", cluster.b.handle, Route.TASK, frame, session_id=sid)
    assert isinstance(exc, AuthError) and "do not open" in exc.message
    assert cluster.row(sid) == before and cluster.new_events(ids) == [("unknown_session", None)]
    cluster.transport.then("B", "B", "B")
    assert dev.task().state == "waiting"  # the device runs the handshake again and carries on


def test_wrapped_keys_moved_to_another_session_do_not_open(cluster: Cluster) -> None:
    one, two = cluster.device(), cluster.device()
    cluster.transport.then("A", "A")
    sid_one = one.connect()
    cluster.transport.then("A", "A")
    sid_two = two.connect()
    with cluster.dbs[0].connect() as conn:
        stolen = conn.execute(select(t.Session.wrapped_keys).where(t.Session.session_id == sid_one)).scalar_one()
        conn.execute(update(t.Session).where(t.Session.session_id == sid_two).values(wrapped_keys=stolen))
    assert two._channel is not None
    _refused("unknown_session", cluster.b.handle, Route.TASK, seal_task_request(two._channel), session_id=sid_two)


def test_a_tampered_pending_handshake_gives_unknown_handshake(cluster: Cluster) -> None:
    dev = cluster.device()
    from qflare.crypto import ClientHandshake

    hs = ClientHandshake(dev.identity, cluster.identity.public, clock=cluster.clock)
    reply = cluster.a.handle(Route.HELLO, hs.start())
    with cluster.dbs[0].connect() as conn:
        state = conn.execute(select(t.PendingHandshake.state)).scalar_one()
        conn.execute(update(t.PendingHandshake).values(state=state[:30] + bytes((state[30] ^ 1,)) + state[31:]))
    finish, _ = hs.finish(reply)
    _refused("unknown_handshake", cluster.b.handle, Route.FINISH, hashlib.sha256(reply).digest() + finish)


def test_state_wrapped_under_another_coordinator_key_does_not_open() -> None:
    old, new = StateKey.from_identity(SigningKey.generate()), StateKey.from_identity(SigningKey.generate())
    wrapped = old.wrap(b"session", b"row", b"secret keys")
    assert old.unwrap(b"session", b"row", wrapped) == b"secret keys"
    with pytest.raises(AuthError, match="kek_mismatch"):
        new.unwrap(b"session", b"row", wrapped)
    for purpose, bound in ((b"session", b"other row"), (b"pending-handshake", b"row")):
        with pytest.raises(AuthError):
            old.unwrap(purpose, bound, wrapped)


def test_an_unknown_session_is_refused_before_any_unwrap(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    original = StateKey.unwrap

    def spy(self: StateKey, purpose: bytes, bound: bytes, wrapped: bytes) -> bytes:
        calls.append(purpose)
        return original(self, purpose, bound, wrapped)

    monkeypatch.setattr(StateKey, "unwrap", spy)
    for sid in ("ab" * 32, "not hex", ""):
        _refused("unknown_session", cluster.b.handle, Route.TASK, b"\x01" * 60, session_id=sid)
    assert calls == []


# -- counters, liveness, the replay cache --------------------------------------------------------------


def test_a_shared_channel_seals_only_with_a_reserved_counter() -> None:
    reservations = iter([7, 3])
    advanced: list[int] = []

    def advance(counter: int) -> int:
        advanced.append(counter)
        return next(reservations)

    sid, c2s, s2c = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    device = Channel(sid, c2s, s2c)
    server = SharedChannel(sid, s2c, c2s, advance=advance, last_recv=-1, expires_at=2e9, clock=lambda: 1e9)
    with pytest.raises(QflareError, match="no send counter is reserved") as info:
        seal_task(server, b"{}")
    assert info.value.code == "bad_state"
    open_task_request(server, seal_task_request(device))
    reply = seal_task(server, b"{}")
    assert int.from_bytes(reply[FRAME_HEADER_LEN - 8 : FRAME_HEADER_LEN], "big") == 7 and advanced == [0]
    assert open_task(device, reply) == b"{}"
    with pytest.raises(QflareError) as info:
        seal_task(server, b"{}")  # one reservation, one reply
    assert info.value.code == "bad_state"
    old = seal_task_request(device)
    open_task_request(server, seal_task_request(device))
    _refused("replay", open_task_request, server, old)  # below the last accepted: refused before decryption
    assert advanced == [0, 2]
    with pytest.raises(QflareError) as info:
        server.rekey()
    assert info.value.code == "bad_state"


def test_send_counters_reserved_by_two_workers_at_once_never_repeat(cluster: Cluster) -> None:
    dev = cluster.device()
    sid = dev.connect()
    assert dev._channel is not None
    frames = [seal_task_request(dev._channel) for _ in range(16)]
    send_key, recv_key = dev._channel.unsafe_keys()

    def send(i: int) -> bytes:
        return (cluster.a, cluster.b)[i % 2].handle(Route.TASK, frames[i], session_id=sid)

    outcomes = race(len(frames), send)
    replies = [o for o in outcomes if isinstance(o, bytes)]
    refusals = [o for o in outcomes if not isinstance(o, bytes)]
    assert replies and all(isinstance(o, QflareError) and o.code == "replay" for o in refusals)
    counters = [int.from_bytes(r[FRAME_HEADER_LEN - 8 : FRAME_HEADER_LEN], "big") for r in replies]
    assert len(set(counters)) == len(counters)
    for reply in replies:  # each authenticates under its own counter
        fresh = Channel(dev._channel.session_id, send_key, recv_key, unsafe_initial_counters=(0, -1))
        open_task(fresh, reply)
    last_recv, next_send, _ = cluster.row(sid)
    assert next_send == len(replies) and last_recv is not None and last_recv <= len(frames) - 1


def test_store_reservations_from_two_processes_never_repeat(cluster: Cluster) -> None:
    dev = cluster.device()
    sid = dev.connect()
    now = datetime.fromtimestamp(cluster.clock(), UTC)
    counters = iter(range(10_000))
    lock = threading.Lock()

    def reserve(i: int) -> list[int]:
        got = []
        for _ in range(25):
            with lock:
                counter = next(counters)
            reserved = cluster.stores[i % 2].advance_session(sid, counter, now=now)
            if reserved is not None:
                got.append(reserved)
        return got

    outcomes = race(8, reserve)
    reserved = [r for o in outcomes for r in o]  # type: ignore[attr-defined]
    assert len(reserved) == len(set(reserved)) and reserved
    assert cluster.row(sid)[1] == len(reserved)
    assert cluster.stores[1].advance_session(sid, 0, now=now) is None  # an old counter: nothing changes


def test_liveness_counts_every_workers_sightings(cluster: Cluster) -> None:
    one, two = cluster.device(), cluster.device()
    ids = [one.device_id, two.device_id]
    cluster.transport.then("A", "A")
    one.connect()
    cluster.transport.then("B", "B")
    two.connect()
    assert cluster.a.live_devices(ids) == ids and cluster.b.live_devices(ids) == ids
    cluster.clock.advance(LIFETIME_S + 301)  # both sessions expired, neither seen within the window
    assert cluster.a.live_devices(ids) == ids  # nobody live: all are offered
    cluster.transport.then("B", "B", "B")
    two.task()  # a new handshake on B and a request
    assert cluster.a.live_devices(ids) == [two.device_id] == cluster.b.live_devices(ids)
    assert cluster.store.last_seen()[two.device_id] == datetime.fromtimestamp(cluster.clock(), UTC)


def test_expired_hello_digests_and_handshakes_are_purged(cluster: Cluster) -> None:
    store, now = cluster.store, datetime.fromtimestamp(cluster.clock(), UTC)
    assert store.record_hello("aa" * 32, expires_at=now + timedelta(seconds=10), now=now)
    assert not store.record_hello("aa" * 32, expires_at=now + timedelta(seconds=10), now=now)  # a replay
    assert store.record_hello("bb" * 32, expires_at=now + timedelta(seconds=100), now=now)
    later = now + timedelta(seconds=50)
    assert store.record_hello("cc" * 32, expires_at=later + timedelta(seconds=10), now=later, purge=True)
    assert not store.hello_seen("aa" * 32) and store.hello_seen("bb" * 32) and store.hello_seen("cc" * 32)
    assert store.purge_shared_state(now=later + timedelta(seconds=200)) == 2


def test_closed_and_expired_sessions_keep_no_wrapped_keys(cluster: Cluster) -> None:
    """Once a session is closed (replaced, revoked) or expired, its keys leave the database: a later copy
    of the database and the coordinator key must not open the sessions of the past."""

    def wrapped(sid: str) -> bytes | None:
        with cluster.dbs[0].connect(write=False) as conn:
            return conn.execute(select(t.Session.wrapped_keys).where(t.Session.session_id == sid)).scalar_one()

    dev = cluster.device()
    old = dev.connect()
    new = dev.connect()  # replaces the old one
    assert wrapped(old) is None and wrapped(new) is not None
    cluster.a.revoke(dev.device_id, "lost device")
    assert wrapped(new) is None
    other = cluster.device()
    sid = other.connect()
    assert wrapped(sid) is not None
    cluster.clock.advance(LIFETIME_S + 1)
    cluster.store.purge_shared_state(now=datetime.fromtimestamp(cluster.clock(), UTC))
    assert wrapped(sid) is None


# -- the single-process default ------------------------------------------------------------------------


def test_in_memory_sessions_add_no_shared_state_queries(tmp_path: Path) -> None:
    with scratch("sqlite", tmp_path) as db:
        identity, clock = SigningKey.generate(), FakeClock()
        coordinator, store, layout = _coordinator(db, identity, clock, tmp_path / "blobs", shared=False)
        transport = Workers({"A": coordinator})
        dev = Device(transport=transport, identity=SigningKey.generate(), server_key=identity.public, layout=layout)
        dev.enroll(coordinator.create_tokens(1)[0])
        statements: list[str] = []

        def seen(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
            statements.append(statement)

        event.listen(db.engine, "before_cursor_execute", seen)
        sid = dev.connect()
        dev.task()
        dev.task()
        event.remove(db.engine, "before_cursor_execute", seen)
        # the new columns ride along in the statements the ORM already made; no statement is added
        assert not [s for s in statements if "hello_digests" in s or "pending_handshakes" in s]
        assert not [s for s in statements if s.startswith("UPDATE sessions")]
        touching = [s.split()[0] for s in statements if " sessions" in s]
        assert touching == ["SELECT", "INSERT"]  # add_session's existence check and insert: the handshake only
        assert store.shared_session(sid) is not None and store.shared_session(sid).last_recv is None  # type: ignore[union-attr]
        assert coordinator.pending_handshakes == 0
