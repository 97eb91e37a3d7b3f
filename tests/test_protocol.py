"""The device <-> coordinator protocol, attacked message by message.

Every refusal must carry its specific reason code, change no federated state, and be recorded as a
security event.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_fixtures import FakeClock, Federation

from qflare.crypto import Field, MsgType, SignedEnvelope
from qflare.crypto.envelope import u64
from qflare.crypto.payloads import pack_signed
from qflare.crypto.suite import sha256
from qflare.errors import PolicyError, QflareError
from qflare.protocol import Device, Route, SignedUpdate
from qflare.training import TrainResult
from qflare.wire import encode_update


@pytest.fixture
def fed(tmp_path):
    return Federation(tmp_path)


_UNSET = object()


def event_ids(fed: Federation) -> set[int]:
    return {e.id for e in fed.store.security_events(limit=10_000)}


def new_events(fed: Federation, ids_before: set[int]) -> list:
    """Security events recorded since ``ids_before`` was taken, oldest first."""
    return [e for e in reversed(fed.store.security_events(limit=10_000)) if e.id not in ids_before]


def assert_one_event(fed: Federation, ids_before: set[int], code: str, device_id=_UNSET) -> None:
    """Exactly one security event was recorded since ``ids_before``, with reason ``code`` (and for
    ``device_id`` when given; ``None`` means "no device known")."""
    new = new_events(fed, ids_before)
    assert [e.reason for e in new] == [code], f"expected one security event {code!r}, got {[e.reason for e in new]}"
    if device_id is not _UNSET:
        assert new[0].device_id == device_id, f"event recorded for {new[0].device_id}, expected {device_id}"


def refused(fed: Federation, code: str, fn, *args, device_id=_UNSET, **kwargs):
    """``fn(*args, **kwargs)`` raises the typed error ``code``, changes no state, and records exactly one
    security event with reason ``code`` (for ``device_id`` when given)."""
    before, ids = fed.counts(), event_ids(fed)
    with pytest.raises(QflareError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value}"
    assert fed.counts() == before, "a refused message changed state"
    assert_one_event(fed, ids, code, device_id)
    return info.value


def refused_somehow(fed: Federation, fn, *args, **kwargs) -> QflareError:
    """Like :func:`refused` for inputs whose exact code is not the point: whatever the code, the refusal
    changes nothing and records exactly one security event with that code as its reason."""
    before, ids = fed.counts(), event_ids(fed)
    with pytest.raises(QflareError) as info:
        fn(*args, **kwargs)
    assert fed.counts() == before, "a refused message changed state"
    assert_one_event(fed, ids, info.value.code)
    return info.value


def test_round_trip_two_rounds(fed):
    start = fed.coordinator.rounds.model.flat.clone()
    for rnd in (1, 2):
        opened = fed.coordinator.rounds.open_next()
        assert opened.number == rnd
        for dev in fed.unselected():
            task = dev.task()
            assert task.state == "open" and not task.selected
        for k, dev in enumerate(fed.selected()):
            receipt = dev.submit(fed.prepare(dev, seed=k))
            assert receipt.round == rnd and not receipt.duplicate and receipt.updates_in_round == k + 1
        assert fed.coordinator.rounds.model.version == rnd
    assert not torch.equal(start, fed.coordinator.rounds.model.flat)
    assert fed.events() == []


def test_fedavg_of_submitted_updates(fed):
    fed.coordinator.rounds.open_next()
    base = fed.coordinator.rounds.model.flat.clone()
    a, b = fed.selected()
    a.submit(fed.prepare(a, seed=1, n=1))
    b.submit(fed.prepare(b, seed=2, n=3))
    expected = base + (fed.result(1).delta * 1 + fed.result(2).delta * 3) / 4
    assert torch.allclose(fed.coordinator.rounds.model.flat, expected, atol=1e-6)


def test_replayed_frame_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    dev.submit(fed.prepare(dev))
    route, frame, sid = fed.transport.sent[-1]
    assert route is Route.UPDATE
    # anyone can resend a captured frame: a refusal before the frame authenticates names no device
    refused(fed, "replay", fed.coordinator.handle, route, frame, session_id=sid, device_id=None)


def test_retried_update_is_idempotent(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    sealed = fed.prepare(dev)
    dev.submit(sealed)
    before = fed.counts()
    again = dev.submit(sealed)  # a client retry: new frame, same signed update
    assert again.duplicate and again.updates_in_round == 1
    assert fed.counts() == before


def test_second_different_update_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    dev.submit(fed.prepare(dev, seed=1))
    second = fed.prepare(dev, seed=2)
    refused(fed, "duplicate_submission", dev.submit, second, device_id=dev.device_id)


def test_unselected_device_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.unselected()[0]
    task = dev.task()
    model = dev.fetch_model(task)
    sealed = dev.prepare_update(task, model, fed.result())
    refused(fed, "not_selected", dev.submit, sealed, device_id=dev.device_id)


def test_update_for_an_old_round_refused(fed):
    fed.coordinator.rounds.open_next()
    a, b = fed.selected()
    stale = fed.prepare(a)
    a.submit(stale)
    b.submit(fed.prepare(b))
    fed.coordinator.rounds.open_next()  # round 2
    # Round 1's update re-sent in round 2: bound to round 1 in the frame AAD and the signature.
    err = refused(fed, "wrong_round", a.submit, stale, device_id=None)  # refused before the frame authenticates
    assert err.http_status in (401, 409)


def test_stale_base_model_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    task = dev.task()
    model = dev.fetch_model(task)
    wrong = dataclasses.replace(model, sha256="00" * 32)
    refused(fed, "stale_model", dev.submit, dev.prepare_update(task, wrong, fed.result()), device_id=dev.device_id)


def test_tampered_update_blob_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    sealed = fed.prepare(dev)
    payload = bytearray(sealed.payload)
    payload[-100] ^= 0x01  # inside the tensor data, after the signed header
    tampered = SignedUpdate(sealed.round, bytes(payload), sealed.update_hash)
    refused(fed, "hash_mismatch", dev.submit, tampered, device_id=dev.device_id)


def test_tampered_signed_header_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    sealed = fed.prepare(dev)
    payload = bytearray(sealed.payload)
    payload[60] ^= 0x01  # inside the signed UPDATE envelope
    before, ids = fed.counts(), event_ids(fed)
    with pytest.raises(QflareError) as info:
        dev.submit(SignedUpdate(sealed.round, bytes(payload), sealed.update_hash))
    assert info.value.code in ("bad_signature", "malformed", "device_mismatch", "wrong_round", "stale_model")
    assert fed.counts() == before and fed.store.count_updates(1) == 0
    assert_one_event(fed, ids, info.value.code, dev.device_id)


def test_update_signed_by_another_device_refused(fed):
    fed.coordinator.rounds.open_next()
    a, b = fed.selected()
    refused(fed, "device_mismatch", b.submit, fed.prepare(a), device_id=b.device_id)


def test_forged_signature_refused(fed):
    """An update claiming a's key id but signed by another key is refused (bad_signature)."""
    fed.coordinator.rounds.open_next()
    a = fed.selected()[0]
    task = a.task()
    model = a.fetch_model(task)
    genuine = a.prepare_update(task, model, fed.result())
    forger = fed.new_device()
    forged = forger.prepare_update(task, model, fed.result())
    # Splice: a's signed header fields with the forger's signature bytes.
    from qflare.crypto import SignedEnvelope, pack_signed, unpack_signed

    head, blob = unpack_signed(genuine.payload)
    env = SignedEnvelope.parse(head)
    fhead, _ = unpack_signed(forged.payload)
    fenv = SignedEnvelope.parse(fhead)
    spliced = env.body + len(fenv.signature).to_bytes(4, "big") + fenv.signature
    refused(
        fed,
        "bad_signature",
        a.submit,
        SignedUpdate(genuine.round, pack_signed(spliced, bytes(blob)), genuine.update_hash),
        device_id=a.device_id,
    )


def test_non_finite_update_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    task = dev.task()
    model = dev.fetch_model(task)
    bad = fed.result()
    bad.delta[3] = float("nan")
    refused(fed, "non_finite", dev.submit, dev.prepare_update(task, model, bad), device_id=dev.device_id)


def test_oversized_update_refused(fed, tmp_path):
    fed.coordinator.config = dataclasses.replace(fed.coordinator.config, max_update_bytes=1000)
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    sealed = fed.prepare(dev)
    refused(fed, "oversized", dev.submit, sealed, device_id=None)  # refused unopened: the sender is unproven


def test_revoked_device_refused_on_next_message(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    fed.coordinator.revoke(dev.device_id, "lost device")  # its sessions die with it
    sid, before, ids = dev._session_id, fed.counts(), event_ids(fed)
    with pytest.raises(QflareError) as info:
        dev.task()
    assert info.value.code == "revoked"
    assert fed.counts() == before
    # Two messages, two refusals: the task request finds its session gone, the device runs the
    # handshake again, and the handshake is refused because the device is revoked.
    assert [(e.reason, e.session_id) for e in new_events(fed, ids)] == [
        ("unknown_session", sid),
        ("revoked", None),
    ]
    refused(fed, "revoked", dev.connect)


def test_revoked_handshake_event_names_the_device(fed):
    dev = fed.devices[0]
    fed.coordinator.revoke(dev.device_id, "lost device")
    refused(fed, "revoked", dev.connect, device_id=dev.device_id)


def test_revocation_takes_effect_on_live_session(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    fed.store.revoke_device(dev.device_id, "revoked out of band")  # session still in memory
    refused(fed, "revoked", dev.task, device_id=None)  # refused before the frame is opened: sender unproven


def test_token_single_use_and_expiry(fed):
    token = fed.coordinator.create_tokens(1, ttl_s=60)[0]
    fed.new_device().enroll(token)
    refused(fed, "token_used", fed.new_device().enroll, token)
    past = datetime.now(UTC) - timedelta(hours=2)
    expired = fed.store.create_tokens(1, timedelta(hours=1), now=past)[0]  # expired an hour ago, no waiting
    refused(fed, "token_expired", fed.new_device().enroll, expired)
    refused(fed, "token_unknown", fed.new_device().enroll, "not-a-token")


def test_unenrolled_device_cannot_handshake(fed):
    refused(fed, "unknown_device", fed.new_device().connect)


def test_device_refuses_impostor_coordinator(fed, tmp_path):
    other = Federation(tmp_path / "other", n=1)
    token = other.coordinator.create_tokens(1)[0]
    # A device that pinned the real coordinator, talking to another one.
    dev = fed.new_device()
    dev.transport = other.transport
    with pytest.raises(QflareError) as info:
        dev.enroll(token)
    assert info.value.code in ("bad_signature", "server_key_mismatch")
    with pytest.raises(QflareError) as info:
        dev.connect()
    assert info.value.code in ("unknown_device", "server_key_mismatch")


def test_other_devices_session_refused(fed):
    fed.coordinator.rounds.open_next()
    a, b = fed.selected()
    frame = a._channel.seal(0x30, 0, b"")  # a's frame presented under b's session id
    # the session id is cleartext: a frame that fails authentication under it is not blamed on b
    refused(fed, "bad_mac", fed.coordinator.handle, Route.TASK, frame, session_id=b._session_id, device_id=None)


def test_tampered_model_refused_by_device(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    task = dev.task()

    def flip(route, body):
        if route is Route.MODEL:
            b = bytearray(body)
            b[-50] ^= 1
            return bytes(b)
        return body

    fed.transport.tamper_response = flip
    with pytest.raises(QflareError) as info:
        dev.fetch_model(task)
    assert info.value.code == "bad_mac"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(list(Route)), body=st.binary(max_size=300), sid=st.one_of(st.none(), st.text(max_size=70)))
def test_random_bytes_only_raise_typed_errors(fed, route, body, sid):
    if fed.coordinator.rounds.current is None:
        fed.coordinator.rounds.open_next()
    refused_somehow(fed, fed.coordinator.handle, route, body, session_id=sid)


def test_failed_aggregation_fails_the_round_and_acknowledges_the_update(tmp_path):
    """Krum(f=1) cannot aggregate 3 updates (needs n > 2f + 2): the round fails, it is not left stuck,
    the update that completed it is acknowledged (it was recorded), and the next round opens."""
    from qflare.strategy import krum

    fed = Federation(tmp_path, n=3, per_round=3, strategy=krum(f=1))
    fed.coordinator.rounds.open_next()
    receipts = [dev.submit(fed.prepare(dev, seed=k)) for k, dev in enumerate(fed.selected())]
    assert [r.updates_in_round for r in receipts] == [1, 2, 3]
    assert fed.store.get_round(1).state == "failed"
    assert fed.store.count_updates(1) == 3
    assert fed.coordinator.rounds.model.version == 0  # nothing published
    assert fed.coordinator.rounds.open_next().number == 2


def test_update_for_another_round_is_refused_by_the_round_manager(tmp_path):
    """An update verified against round 1 but arriving after round 1 failed and round 2 opened on the
    same model is refused, not folded into round 2 (check-then-act race between decode and accept)."""
    from qflare.errors import WrongRoundError
    from qflare.strategy import ClientUpdate

    clock = FakeClock()
    fed = Federation(tmp_path, n=2, per_round=2, round_timeout_s=0.3, clock=clock)
    rm = fed.coordinator.rounds
    clock.now = time.time()  # the store dates rounds by the real clock: setting up may have taken > 0.3 s
    rm.open_next()
    clock.advance(0.35)
    rm.tick()  # round 1 fails at its deadline with no updates
    assert fed.store.get_round(1).state == "failed"
    rnd2 = rm.open_next()
    dev = fed.devices[0].device_id
    update = ClientUpdate(dev, fed.result().delta, 5)
    with pytest.raises(WrongRoundError):
        rm.accept(update, "ab" * 32, rnd2.base.sha256, b"sig", b"", round_number=1)
    assert fed.store.count_updates(2) == 0 and rm.current.accepted == {}


def test_one_live_session_per_device(fed):
    dev = fed.devices[0]
    old = dev._session_id
    dev.connect()
    assert dev._session_id != old
    refused(fed, "unknown_session", fed.coordinator.handle, Route.TASK, b"\x00" * 40, session_id=old)
    assert dev.task().state in ("waiting", "open")


def test_restart_restores_the_server_optimiser_state(tmp_path):
    """FedAvgM's velocity (and FedAdam's moments) survive a coordinator restart on the same data."""
    from qflare.protocol import Coordinator, RoundConfig
    from qflare.storage import BlobStore
    from qflare.strategy import fedavgm

    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, strategy=fedavgm(), blobs=blobs)
    fed.coordinator.rounds.open_next()
    for k, dev in enumerate(fed.selected()):
        dev.submit(fed.prepare(dev, seed=k))
    velocity = fed.coordinator.rounds.strategy.server_opt.velocity
    assert velocity is not None and velocity.abs().sum() > 0
    restarted = Coordinator(
        layout=fed.layout,
        initial_flat=torch.zeros(fed.layout.numel),
        strategy=fedavgm(),
        identity=fed.identity,
        store=fed.store,
        rounds=RoundConfig(rounds=3, per_round=2, seed=0),
        blobs=blobs,
    )
    assert restarted.rounds.model.version == 1
    assert torch.equal(restarted.rounds.model.flat, fed.coordinator.rounds.model.flat)
    assert torch.equal(restarted.rounds.strategy.server_opt.velocity, velocity)


def test_signed_payloads_must_carry_the_session_suite(fed):
    """docs/protocol.md §1: a signed payload inside a session carries the session's suite, both ways."""
    from qflare.crypto import DEFAULT_SUITE, Suite, sign_update
    from qflare.wire import encode_update

    other = Suite(sig="ML-DSA-65", kem="ML-KEM-1024", x25519=True, aead="AES-256-GCM")  # same signature alg
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    alt = Device(
        transport=fed.transport,
        identity=dev.identity,
        server_key=fed.coordinator.public_key,
        layout=fed.layout,
        suite=other,
    )
    task = alt.task()  # the same enrolled key, in a session of another suite
    # coordinator -> device: the model is signed (once per version) in the coordinator's suite; the
    # device refuses it (a device-side refusal: nothing changes and the coordinator records nothing)
    before, ids = fed.counts(), event_ids(fed)
    with pytest.raises(PolicyError) as info:
        alt.fetch_model(task)
    assert info.value.code == "suite_mismatch" and fed.counts() == before and new_events(fed, ids) == []
    # device -> coordinator: an update signed in a suite other than the session's
    blob = encode_update(fed.layout, fed.result().delta)
    signed = sign_update(dev.identity, DEFAULT_SUITE, task.round, task.model_hash, 5, blob)
    refused(fed, "suite_mismatch", alt.submit, signed)
    assert "suite_mismatch" in fed.events()
    assert dev.submit(signed).updates_in_round == 1  # the same signed update, in a session of its suite


def test_receipt_must_acknowledge_the_update_sent(fed):
    """The device checks every signed field of the ack, and that the receipt JSON agrees with it."""
    from qflare.crypto import Field, Frame, MsgType, SignedEnvelope, pack_signed
    from qflare.crypto.envelope import u64
    from qflare.protocol import Receipt

    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    signed = fed.prepare(dev)
    channel = fed.coordinator._sessions[dev._session_id].channel

    def answer(status: int, duplicate: bool, **over: bytes) -> None:
        fields = {
            Field.DEVICE_KEY_ID: dev.identity.public.key_id_bytes,
            Field.ROUND: u64(signed.round),
            Field.UPDATE_HASH: bytes.fromhex(signed.update_hash),
            Field.STATUS: bytes([status]),
            Field.TIMESTAMP: u64(0),
        } | {Field[k.upper()]: v for k, v in over.items()}
        ack = SignedEnvelope.sign(channel.suite, MsgType.UPDATE_ACK, fields, fed.identity).to_bytes()
        body = Receipt(signed.round, signed.update_hash, 1, duplicate).to_bytes()
        plaintext = pack_signed(ack, body)
        fed.transport.tamper_response = lambda r, out: (
            channel.seal(Frame.RECEIPT, signed.round, plaintext) if r is Route.UPDATE else out
        )

    for status, duplicate, over in (
        (0, True, {}),  # the JSON claims a duplicate, the signed status says accepted
        (1, False, {}),
        (0, False, {"update_hash": bytes(32)}),
        (0, False, {"round": u64(signed.round + 1)}),
        (0, False, {"device_key_id": fed.devices[-1].identity.public.key_id_bytes}),
    ):
        answer(status, duplicate, **over)
        with pytest.raises(QflareError) as info:
            dev.submit(signed)
        assert info.value.code == "bad_receipt", (status, duplicate, over)
    answer(1, True)
    assert dev.submit(signed).duplicate


# ---------------------------------------------------------------------- aggregation: overflow and influence
def _attack(fed: Federation, dev: Device, *, value: float = 3e38, n: int = 5, loss: float = 1.0):
    """A validly signed update from ``dev`` whose every coordinate is ``value``."""
    task = dev.task()
    model = dev.fetch_model(task)
    delta = torch.full((fed.layout.numel,), value, dtype=torch.float32)
    return dev.prepare_update(task, model, TrainResult(delta, n, loss, 0.01, 1))


def test_huge_finite_update_refused(fed):
    """Every coordinate 3e38 is finite (FiniteCheck passes) but overflowed FedAvg's float32 running sum."""
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    refused(fed, "norm_exceeded", dev.submit, _attack(fed, dev), device_id=dev.device_id)


def test_inf_update_attack_does_not_change_the_published_model(tmp_path):
    """End to end: the attacker is refused at the door, the honest devices' round publishes a finite model."""
    clock = FakeClock()
    fed = Federation(tmp_path, n=3, per_round=3, min_participants=2, clock=clock)
    rm = fed.coordinator.rounds
    rm.open_next()
    base = rm.model.flat.clone()
    attacker, *honest = fed.selected()
    refused(fed, "norm_exceeded", attacker.submit, _attack(fed, attacker, n=1), device_id=attacker.device_id)
    for k, dev in enumerate(honest):
        dev.submit(fed.prepare(dev, seed=k, n=5))
    clock.advance(601)
    rm.tick()
    assert rm.model.version == 1 and bool(torch.isfinite(rm.model.flat).all())
    expected = base + (fed.result(0).delta + fed.result(1).delta) / 2
    assert torch.allclose(rm.model.flat, expected, atol=1e-6)


def test_unsafe_aggregate_fails_the_round_and_keeps_the_model(tmp_path):
    """Backstop: a pipeline without the magnitude bound lets the update in, but the new model is checked
    before it is signed: the round fails, the previous model stays, a security event names the device."""
    from qflare.strategy import FiniteCheck, ShapeCheck, fedavg

    fed = Federation(tmp_path, strategy=fedavg(checks=(ShapeCheck(), FiniteCheck())))
    rm = fed.coordinator.rounds
    rm.open_next()
    base, envelope = rm.model.flat.clone(), rm.model.envelope
    attacker, honest = fed.selected()
    ids = event_ids(fed)
    attacker.submit(_attack(fed, attacker))  # accepted and acknowledged: it is recorded
    honest.submit(fed.prepare(honest))
    assert fed.store.get_round(1).state == "failed"
    assert rm.model.version == 0 and rm.model.envelope == envelope and torch.equal(rm.model.flat, base)
    assert_one_event(fed, ids, "aggregate_out_of_bounds", attacker.device_id)
    assert rm.open_next().number == 2


def test_overclaimed_example_count_refused(fed):
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    sealed = dev.prepare_update(dev.task(), dev.fetch_model(dev.task()), fed.result(n=2**31 - 1))
    refused(fed, "bad_example_count", dev.submit, sealed, device_id=dev.device_id)


def test_one_device_cannot_own_the_round_by_claiming_examples(tmp_path):
    """Plain FedAvg gave a device claiming a huge example count the whole round (its update to 3.7e-7);
    within the example cap, a claim now weighs at most max(3/n, 1/5) of the round: 0.3 with 10 updates."""
    fed = Federation(tmp_path, n=10, per_round=10)
    rm = fed.coordinator.rounds
    rm.open_next()
    base = rm.model.flat.clone()
    attacker, *honest = fed.selected()
    task = attacker.task()
    attacker.submit(attacker.prepare_update(task, attacker.fetch_model(task), fed.result(99, n=10**7, scale=1.0)))
    for k, dev in enumerate(honest):
        dev.submit(fed.prepare(dev, seed=k, n=5))
    assert rm.model.version == 1
    tau = 0.3 * 45 / (1 - 0.3)  # the attacker's weight: tau / (tau + 9 * 5) == 0.3
    honest_sum = sum(fed.result(k).delta for k in range(9)) * 5
    expected = base + (fed.result(99, scale=1.0).delta * tau + honest_sum) / (tau + 45)
    assert torch.allclose(rm.model.flat, expected, atol=1e-6)


def _signed_with_metadata(dev: Device, fed: Federation, metadata: bytes) -> SignedUpdate:
    """A validly signed update whose METADATA field is ``metadata``, whatever it holds."""
    task = dev.task()
    model = dev.fetch_model(task)
    blob = encode_update(fed.layout, fed.result().delta, {"round": str(task.round)})
    fields = {
        Field.DEVICE_KEY_ID: dev.identity.public.key_id_bytes,
        Field.ROUND: u64(task.round),
        Field.BASE_MODEL_HASH: bytes.fromhex(model.sha256),
        Field.UPDATE_HASH: sha256(blob),
        Field.NUM_EXAMPLES: u64(5),
        Field.PAYLOAD_SIZE: u64(len(blob)),
        Field.METADATA: metadata,
    }
    env = SignedEnvelope.sign(dev.suite, MsgType.UPDATE, fields, dev.identity)
    return SignedUpdate(task.round, pack_signed(env.to_bytes(), blob), sha256(blob).hex())


@pytest.mark.parametrize(
    "metadata",
    [b'{"loss":' + b"9" * 400 + b"}", b'{"loss":NaN}', b'{"loss":-Infinity}', b'{"loss":1e400}', b'{"loss":1e300}'],
)
def test_hostile_update_metrics_refused_by_the_coordinator(fed, metadata):
    """A 400-digit integer metric made float() overflow in the coordinator: HTTP 500 from any device."""
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    refused(fed, "malformed", dev.submit, _signed_with_metadata(dev, fed, metadata), device_id=dev.device_id)
