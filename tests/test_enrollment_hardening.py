"""Enrollment and handshake floods, lost enrollment replies, and ghosts in the selection.

Cheap checks come before expensive ones (a token lookup before a signature; an enrolled key id, a replay
lookup and the device's signature over a fresh timestamp before a SERVER_HELLO is signed); expensive work is drawn from one budget that serves handshakes of enrolled
devices before enrollments; pending handshakes expire; enrollment is idempotent for the same key and
token; rounds select among devices that have shown they are alive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from protocol_fixtures import FakeClock, Federation
from server_fixtures import admin, make_runtime, new_device
from test_protocol import event_ids, new_events, refused

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

import qflare.crypto.handshake as handshake_module
from qflare.crypto import DEFAULT_SUITE, ClientHandshake, Field, MsgType, SignedEnvelope, SigningKey, VerifyKey
from qflare.crypto.envelope import u64
from qflare.errors import CoordinatorBusyError, QflareError, RateLimitedError, Retry
from qflare.protocol import Coordinator, RandomSelector, RoundConfig, Route
from qflare.protocol.budget import CryptoBudget, Work
from qflare.server import create_app
from qflare.storage import BlobStore
from qflare.strategy import fedavg


@pytest.fixture
def fed(tmp_path):
    return Federation(tmp_path)


@pytest.fixture
def crypto_calls(monkeypatch):
    """Counts ML-DSA signatures, verifications and KEM encapsulations done from now on."""
    calls: Counter[str] = Counter()
    sign, verify, encapsulate = SigningKey.sign, VerifyKey.verify, handshake_module.encapsulate

    def counted_sign(self, data, context):
        calls["sign"] += 1
        return sign(self, data, context)

    def counted_verify(self, signature, data, context):
        calls["verify"] += 1
        return verify(self, signature, data, context)

    def counted_encapsulate(*args, **kwargs):
        calls["encapsulate"] += 1
        return encapsulate(*args, **kwargs)

    monkeypatch.setattr(SigningKey, "sign", counted_sign)
    monkeypatch.setattr(VerifyKey, "verify", counted_verify)
    monkeypatch.setattr(handshake_module, "encapsulate", counted_encapsulate)
    return calls


def enroll_request(key: SigningKey, token: str, *, suite=DEFAULT_SUITE, ts: int | None = None, sign=True) -> bytes:
    """An ENROLL_REQUEST as a device (or an attacker) builds it; ``sign=False`` puts garbage where the
    proof-of-possession signature goes."""
    fields = {
        Field.DEVICE_ID: key.key_id.encode(),
        Field.SIGNING_PUBLIC: key.public.raw,
        Field.ENROLL_TOKEN: token.encode(),
        Field.CLIENT_NONCE: os.urandom(32),
        Field.TIMESTAMP: u64(int(time.time()) if ts is None else ts),
    }
    env = SignedEnvelope.sign(suite, MsgType.ENROLL_REQUEST, fields, key).to_bytes()
    if sign:
        return env
    sig_len = suite.sig_alg.signature_len
    return env[:-sig_len] + bytes(sig_len)


def client_hello(key: SigningKey) -> tuple[ClientHandshake, bytes]:
    hs = ClientHandshake(key, SigningKey.generate().public)  # the server key is not checked here
    return hs, hs.start()


# ---------------------------------------------------------------- cheap checks first


def test_garbage_token_enrollment_costs_no_signature_work(fed, crypto_calls):
    """Unknown, used and expired tokens are refused by one hash lookup, before the proof of possession
    is verified and before the record is signed."""
    used = fed.coordinator.create_tokens(1)[0]
    fed.new_device().enroll(used)
    expired = fed.store.create_tokens(1, timedelta(hours=1), now=datetime.now(UTC) - timedelta(hours=2))[0]
    cases = [
        (code, enroll_request(SigningKey.generate(), token))
        for token, code in (("not-a-token", "token_unknown"), (used, "token_used"), (expired, "token_expired"))
    ]
    crypto_calls.clear()  # building the requests signed with the attackers' keys; from here on, the coordinator
    for code, body in cases:
        refused(fed, code, fed.coordinator.handle, Route.ENROLL, body)
    assert crypto_calls == Counter()


def test_already_enrolled_key_with_a_fresh_token_costs_no_signature_work(fed, crypto_calls):
    dev = fed.devices[0]
    token = fed.coordinator.create_tokens(1)[0]
    body = enroll_request(dev.identity, token)
    crypto_calls.clear()
    refused(fed, "device_exists", fed.coordinator.handle, Route.ENROLL, body)
    assert crypto_calls == Counter()
    assert fed.store.get_token(token).used_at is None  # the token is still good for another device


def test_enrollment_with_a_key_of_another_algorithm_is_a_policy_refusal(fed, crypto_calls):
    """An ML-DSA-87 key (in a suite the policy allows) cannot hold sessions with an ML-DSA-65
    coordinator: refused as a policy violation, with an event, before any signature work."""
    high = dataclasses.replace(DEFAULT_SUITE, sig="ML-DSA-87")
    token = fed.coordinator.create_tokens(1)[0]
    body = enroll_request(SigningKey.generate("ML-DSA-87"), token, suite=high)
    crypto_calls.clear()
    err = refused(fed, "key_alg_mismatch", fed.coordinator.handle, Route.ENROLL, body)
    assert err.http_status == 403 and crypto_calls == Counter()
    assert fed.store.get_token(token).used_at is None


def test_bad_proof_of_possession_is_still_refused_and_consumes_nothing(fed):
    token = fed.coordinator.create_tokens(1)[0]
    refused(
        fed,
        "bad_signature",
        fed.coordinator.handle,
        Route.ENROLL,
        enroll_request(SigningKey.generate(), token, sign=False),
    )
    assert fed.store.get_token(token).used_at is None
    fed.new_device().enroll(token)


def test_hello_for_an_unknown_or_revoked_key_costs_no_signature_work(fed, crypto_calls):
    revoked = fed.devices[0]
    fed.coordinator.revoke(revoked.device_id, "lost")
    fed.coordinator.budget = CryptoBudget(1.0, 5.0, clock=FakeClock())
    hellos = [client_hello(SigningKey.generate())[1], client_hello(revoked.identity)[1]]
    crypto_calls.clear()
    refused(fed, "unknown_device", fed.coordinator.handle, Route.HELLO, hellos[0])
    refused(fed, "revoked", fed.coordinator.handle, Route.HELLO, hellos[1], device_id=revoked.device_id)
    assert crypto_calls == Counter()
    assert fed.coordinator.budget.level == 5.0  # nothing drawn


def forged_hello(key_id: str, *, suite=DEFAULT_SUITE) -> bytes:
    """A CLIENT_HELLO naming ``key_id`` (read off the wire) signed with the attacker's own fresh key."""
    attacker = SigningKey.generate(suite.sig)
    hello = SignedEnvelope.parse(client_hello(attacker)[1])
    fields = {**hello.fields, Field.DEVICE_KEY_ID: bytes.fromhex(key_id)}
    return SignedEnvelope.sign(suite, MsgType.CLIENT_HELLO, fields, attacker).to_bytes()


def test_forged_hello_for_an_enrolled_key_costs_one_verification_and_no_budget(fed, crypto_calls):
    """Anyone can read an enrolled key id off the wire; without the device key their hello is refused
    ``bad_signature`` after one verification: no encapsulation, no signature, nothing drawn."""
    dev = fed.devices[0]
    fed.coordinator.budget = CryptoBudget(1.0, 5.0, clock=FakeClock())
    forged = forged_hello(dev.device_id)
    _, honest = client_hello(dev.identity)
    sig_len = DEFAULT_SUITE.sig_alg.signature_len
    unsigned = honest[:-sig_len] + bytes(sig_len)  # the honest body with no real signature
    crypto_calls.clear()
    for body in (forged, unsigned):
        refused(fed, "bad_signature", fed.coordinator.handle, Route.HELLO, body)
    assert crypto_calls == Counter({"verify": 2})
    assert fed.coordinator.budget.level == 5.0 and fed.coordinator.pending_handshakes == 0


def test_replayed_hello_is_refused_after_one_lookup(fed, crypto_calls):
    """A captured honest hello is answered once; a replay costs a digest lookup (no verification, no
    encapsulation, no signature, no budget) and is refused ``replay``."""
    dev = fed.devices[0]
    _, hello = client_hello(dev.identity)
    fed.coordinator.handle(Route.HELLO, hello)
    fed.coordinator.budget = CryptoBudget(1.0, 5.0, clock=FakeClock())
    pending = fed.coordinator.pending_handshakes
    crypto_calls.clear()
    for _ in range(3):
        refused(fed, "replay", fed.coordinator.handle, Route.HELLO, hello)
    assert crypto_calls == Counter()
    assert fed.coordinator.budget.level == 5.0 and fed.coordinator.pending_handshakes == pending
    dev.connect()  # the device itself still connects with a fresh hello


@pytest.mark.parametrize("skew", [-121, 121])
def test_stale_hello_is_refused_before_the_budget(fed, crypto_calls, skew):
    dev = fed.devices[0]
    fed.coordinator.budget = CryptoBudget(1.0, 5.0, clock=FakeClock())
    hs = ClientHandshake(dev.identity, fed.coordinator.public_key, clock=lambda: time.time() + skew)
    hello = hs.start()
    crypto_calls.clear()
    refused(fed, "stale_request", fed.coordinator.handle, Route.HELLO, hello)
    assert crypto_calls == Counter({"verify": 1})
    assert fed.coordinator.budget.level == 5.0


def test_hello_replay_cache_expires_and_is_bounded():
    from qflare.protocol.coordinator import _HelloReplayCache

    clock = FakeClock()
    cache = _HelloReplayCache(clock, ttl_s=240.0, limit=3)
    assert not cache.seen(b"a") and cache.record(b"a")
    assert cache.seen(b"a") and not cache.record(b"a")
    clock.advance(241)
    assert not cache.seen(b"a")  # expired: a hello this old is refused as stale anyway
    for d in (b"a", b"b", b"c", b"d"):
        assert cache.record(d)
    assert len(cache) == 3 and not cache.seen(b"a")  # the oldest entry was evicted to make room
    assert cache.seen(b"d")


# ---------------------------------------------------------------- pending handshakes expire


def test_expired_pending_handshake_cannot_be_finished_and_is_dropped(tmp_path):
    clock = FakeClock()
    fed = Federation(tmp_path, clock=clock)
    coord, dev = fed.coordinator, fed.devices[0]
    hs = ClientHandshake(dev.identity, coord.public_key, clock=clock)
    reply = coord.handle(Route.HELLO, hs.start())
    finish, _ = hs.finish(reply)
    clock.advance(coord.config.handshake_timeout_s + 1)
    sessions = len(coord._sessions)
    refused(fed, "handshake_expired", coord.handle, Route.FINISH, hashlib.sha256(reply).digest() + finish)
    assert len(coord._sessions) == sessions
    # the table of pending handshakes is bounded by time, not only by its size
    for _ in range(5):
        coord.handle(Route.HELLO, client_hello(dev.identity)[1])
    assert coord.pending_handshakes == 5
    clock.advance(coord.config.handshake_timeout_s + 1)
    coord.handle(Route.HELLO, client_hello(dev.identity)[1])
    assert coord.pending_handshakes == 1
    dev.connect()  # a prompt handshake still works
    assert coord.pending_handshakes == 1


# ---------------------------------------------------------------- the budget


def test_budget_serves_handshakes_before_enrollments():
    clock = FakeClock(1000.0)
    budget = CryptoBudget(2.0, 4.0, enrollment_share=0.5, clock=clock)
    budget.take(Work.ENROLLMENT)
    budget.take(Work.ENROLLMENT)
    with pytest.raises(CoordinatorBusyError) as info:
        budget.take(Work.ENROLLMENT)  # would go below the handshakes' reserve of 2
    assert info.value.code == "coordinator_busy" and info.value.retry_after_s == pytest.approx(0.5)
    budget.take(Work.HANDSHAKE)
    budget.take(Work.HANDSHAKE)
    with pytest.raises(CoordinatorBusyError) as info:
        budget.take(Work.HANDSHAKE)
    assert info.value.retry_after_s == pytest.approx(0.5)
    clock.advance(1.0)  # refills 2: below the reserve, so handshakes only
    with pytest.raises(CoordinatorBusyError) as info:
        budget.take(Work.ENROLLMENT)
    assert info.value.retry_after_s == pytest.approx(0.5)
    budget.take(Work.HANDSHAKE)
    clock.advance(-50.0)  # a clock stepped back refills nothing and breaks nothing
    budget.take(Work.HANDSHAKE)
    with pytest.raises(CoordinatorBusyError):
        budget.take(Work.HANDSHAKE)


def test_busy_is_a_transient_503_refusal():
    err = CoordinatorBusyError("busy", retry_after_s=2.0)
    assert isinstance(err, RateLimitedError) and err.http_status == 503 and err.retry is Retry.TRANSIENT


def test_enrollment_flood_is_refused_while_enrolled_devices_still_connect(tmp_path, crypto_calls):
    """A flood of enrollment requests with a leaked token and bad signatures costs a verification each
    (the token is only consumed by a good one), until the budget refuses them; the enrolled devices'
    handshakes are served from the reserve and the refill below it."""
    clock = FakeClock()
    fed = Federation(tmp_path, clock=clock)
    coord = fed.coordinator
    coord.budget = CryptoBudget(1.0, 6.0, enrollment_share=0.5, clock=clock)
    token = coord.create_tokens(1)[0]
    flood = [enroll_request(SigningKey.generate(), token, sign=False) for _ in range(10)]
    crypto_calls.clear()
    codes = []
    for body in flood:
        with pytest.raises(QflareError) as info:
            coord.handle(Route.ENROLL, body)
        codes.append(info.value.code)
    assert codes == ["bad_signature"] * 3 + ["coordinator_busy"] * 7
    assert crypto_calls["verify"] == 3 and crypto_calls["sign"] == 0
    ids = event_ids(fed)
    for dev in fed.devices:  # three handshakes: the reserve
        dev.connect()
    assert new_events(fed, ids) == []
    # the busy refusal is typed, changes nothing, is recorded, and says when to come back
    before = Counter(crypto_calls)
    err = refused(fed, "coordinator_busy", fed.devices[0].connect, device_id=None)
    # the device signed its hello and the coordinator verified it; refused before the encapsulation and
    # the coordinator's signature
    assert crypto_calls - before == Counter({"sign": 1, "verify": 1}) and crypto_calls["encapsulate"] == 3
    assert err.retry_after_s == pytest.approx(1.0)
    clock.advance(err.retry_after_s)
    fed.devices[0].connect()
    # enrollments wait until the bucket is back above the reserve
    refused(fed, "coordinator_busy", fed.new_device().enroll, token)
    clock.advance(4.0)
    fed.new_device().enroll(token)


def test_unknown_key_ids_do_not_draw_on_the_budget(tmp_path):
    clock = FakeClock()
    fed = Federation(tmp_path, clock=clock)
    fed.coordinator.budget = CryptoBudget(1.0, 1.0, clock=clock)
    for _ in range(20):
        with pytest.raises(QflareError) as info:
            fed.coordinator.handle(Route.HELLO, client_hello(SigningKey.generate())[1])
        assert info.value.code == "unknown_device"
    fed.devices[0].connect()


def test_busy_over_http_is_503_with_retry_after(tmp_path):
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        token = client.post("/v1/admin/tokens", json={"count": 1}, headers=admin(runtime)).json()["tokens"][0]
        dev = new_device(client)
        dev.enroll(token)
        clock = FakeClock()
        runtime.coordinator.budget = CryptoBudget(0.25, 1.0, clock=clock)
        dev.connect()
        _, hello = client_hello(dev.identity)
        resp = client.post(
            f"/v1/{Route.HELLO.value}", content=hello, headers={"Content-Type": "application/octet-stream"}
        )
        assert resp.status_code == 503 and resp.json()["code"] == "coordinator_busy"
        assert resp.headers["Retry-After"] == "4"


# ---------------------------------------------------------------- lost enrollment replies


def test_enrollment_is_idempotent_for_the_same_key_and_token(fed):
    token = fed.coordinator.create_tokens(1)[0]
    dev = fed.new_device()
    record = dev.enroll(token)
    devices = len(fed.store.list_devices())
    _, lost, _ = fed.transport.sent[-1]
    ids = event_ids(fed)
    assert fed.coordinator.handle(Route.ENROLL, lost) == record  # the same request again (reply lost)
    assert dev.enroll(token) == record  # a new request (new nonce and time) with the same key and token
    assert len(fed.store.list_devices()) == devices and new_events(fed, ids) == []
    dev.connect()
    # another key with the used token is still refused, and so is a retry that fails its proof
    refused(fed, "token_used", fed.new_device().enroll, token)
    refused(fed, "bad_signature", fed.coordinator.handle, Route.ENROLL, enroll_request(dev.identity, token, sign=False))
    # a revoked device gets no record back
    fed.coordinator.revoke(dev.device_id, "lost")
    refused(fed, "revoked", dev.enroll, token, device_id=dev.device_id)


# ---------------------------------------------------------------- selection prefers live devices


def test_a_ghost_device_is_not_selected_while_live_devices_exist(tmp_path):
    """A device that enrolled and never came back (e.g. it died right after enrolling) is left out of
    the selection once it has not been seen for liveness_window_s; the devices that poll are chosen."""
    clock = FakeClock()
    fed = Federation(tmp_path, n=3, per_round=3, rounds=5, clock=clock)
    ghost = fed.new_device()
    ghost.enroll(fed.coordinator.create_tokens(1)[0])
    clock.advance(fed.coordinator.config.liveness_window_s + 1)
    for dev in fed.devices:
        dev.task()  # waiting devices poll
    active = [d.device_id for d in fed.store.list_devices(status="active")]
    assert ghost.device_id in active and len(active) == 4
    rm = fed.coordinator.rounds
    for number in range(1, 4):
        rnd = rm.open_next()
        assert rnd.number == number and ghost.device_id not in rnd.selected and len(rnd.selected) == 3
        clock.advance(rnd.deadline - clock.now)
        rm.tick()  # nobody submitted: the round fails at its deadline
        assert fed.store.get_round(number).state == "failed"
        for dev in fed.devices:
            assert dev.task().state == "waiting"


def test_selection_is_unchanged_when_every_device_is_alive(fed):
    active = [d.device_id for d in fed.store.list_devices(status="active")]
    assert fed.coordinator.live_devices(active) == active
    expected = RandomSelector().select(1, tuple(active), 2, 0)
    assert list(fed.coordinator.rounds.open_next().selected) == expected


def test_a_coordinator_that_has_seen_nobody_selects_among_all_active_devices(tmp_path):
    """After a restart nobody has been seen yet: the selection falls back to every active device."""
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, blobs=blobs)
    restarted = Coordinator(
        layout=fed.layout,
        initial_flat=fed.coordinator.rounds.model.flat,
        strategy=fedavg(),
        identity=fed.identity,
        store=fed.store,
        rounds=RoundConfig(rounds=3, per_round=3, seed=0),
        blobs=blobs,
    )
    active = [d.device_id for d in fed.store.list_devices(status="active")]
    assert restarted.live_devices(active) == active
    assert sorted(restarted.rounds.open_next().selected) == sorted(active)


def test_devices_holding_a_live_session_stay_candidates_while_silent(tmp_path):
    """Waiting devices that hold an unexpired session count as alive without polling (the network
    benchmark's devices only talk when selected); once sessions expire only recent contact counts."""
    clock = FakeClock()
    fed = Federation(tmp_path, n=3, per_round=2, clock=clock)
    coord = fed.coordinator
    active = [d.device_id for d in fed.store.list_devices(status="active")]
    clock.advance(coord.config.liveness_window_s + 1)
    assert coord.live_devices(active) == active
    clock.advance(coord.config.session_lifetime_s)
    assert coord.live_devices(active) == active  # nobody is live: every active device, not none
    back = fed.devices[1]
    assert back.task().state == "waiting"  # its session expired: it handshakes again, then polls
    assert coord.live_devices(active) == [back.device_id]
