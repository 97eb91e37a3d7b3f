"""The round-protocol recipes (qflare.crypto.payloads): every frame, every check, one code per failure."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare.crypto.channel import Channel
from qflare.crypto.envelope import Field, MsgType, SignedEnvelope, u64
from qflare.crypto.handshake import ClientHandshake, ServerHandshake, handshake_in_process
from qflare.crypto.identity import SigningKey
from qflare.crypto.payloads import (
    AckStatus,
    Frame,
    OpenedUpdate,
    SignedUpdate,
    canonical_json,
    open_global_model,
    open_model_request,
    open_receipt,
    open_task,
    open_task_request,
    open_update,
    pack_signed,
    seal_model,
    seal_model_request,
    seal_receipt,
    seal_task,
    seal_task_request,
    seal_update,
    sign_global_model,
    sign_update,
    sign_update_ack,
)
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Suite, sha256
from qflare.errors import (
    AuthError,
    BadSignatureError,
    MalformedError,
    PolicyError,
    ReplayError,
    StaleModelError,
    ValidationError,
    WrongRoundError,
)
from qflare.protocol import messages

BASE = sha256(b"global model r4").hex()
Session = tuple[SigningKey, SigningKey, Channel, Channel]


@pytest.fixture()
def session() -> Session:
    device, server = SigningKey.generate(), SigningKey.generate()
    c, s = handshake_in_process(
        ClientHandshake(device, server.public), ServerHandshake(server, {device.key_id: device.public}.get)
    )
    return device, server, c, s


def _update_env(key: SigningKey, suite: Suite, payload: bytes, **over: bytes) -> bytes:
    fields = {
        Field.DEVICE_KEY_ID: key.public.key_id_bytes,
        Field.ROUND: u64(1),
        Field.BASE_MODEL_HASH: bytes.fromhex(BASE),
        Field.UPDATE_HASH: sha256(payload),
        Field.NUM_EXAMPLES: u64(1),
        Field.PAYLOAD_SIZE: u64(len(payload)),
    }
    fields.update({Field[k.upper()]: v for k, v in over.items()})
    return SignedEnvelope.sign(suite, MsgType.UPDATE, fields, key).to_bytes()


def _ack_fields(signed: SignedUpdate, device: SigningKey) -> dict[Field, bytes]:
    return {
        Field.DEVICE_KEY_ID: device.public.key_id_bytes,
        Field.ROUND: u64(signed.round),
        Field.UPDATE_HASH: bytes.fromhex(signed.update_hash),
        Field.STATUS: b"\x00",
        Field.TIMESTAMP: u64(0),
    }


def _raw_update(c: Channel, env: bytes, payload: bytes, frame_round: int = 1) -> bytes:
    return c.seal(Frame.UPDATE, frame_round, pack_signed(env, payload))


def test_frame_types_are_the_protocols() -> None:
    assert [(f.name, int(f)) for f in Frame] == [
        ("TASK_REQUEST", 0x30),
        ("TASK", 0x31),
        ("MODEL_REQUEST", 0x32),
        ("MODEL", 0x33),
        ("UPDATE", 0x34),
        ("RECEIPT", 0x35),
        ("PROOF_REQUEST", 0x36),
        ("PROOF", 0x37),
        ("SECAGG_CONFIG_REQUEST", 0x38),
        ("SECAGG_CONFIG", 0x39),
        ("SECAGG_RELAY_REQUEST", 0x3A),
        ("SECAGG_RELAY", 0x3B),
        ("SECAGG_ADVERTISE", 0x3C),
        ("SECAGG_SHARES", 0x3D),
        ("SECAGG_MASKED", 0x3E),
        ("SECAGG_UNMASK", 0x3F),
        ("SECAGG_ACK", 0x40),
        ("SECAGG_CONSISTENCY", 0x41),
    ]
    assert messages.Frame is Frame
    assert [(s.name, int(s)) for s in AckStatus] == [("ACCEPTED", 0), ("DUPLICATE", 1)]


def test_update_round_trip_and_receipt(session: Session) -> None:
    device, server, c, s = session
    payload = bytes(range(256)) * 100
    signed = sign_update(device, c.suite, 4, BASE, 321, payload, {"loss": 0.5, "steps": 3})
    assert signed.round == 4 and signed.update_hash == sha256(payload).hex()
    frame = seal_update(c, signed)
    assert frame[1] == Frame.UPDATE and int.from_bytes(frame[2:10], "big") == 4
    opened = open_update(s, device.public, frame, 4, base_model_hash=BASE)
    assert bytes(opened.blob) == payload
    assert opened.round == 4 and opened.num_examples == 321 and opened.base_model_hash == BASE
    assert opened.update_hash == signed.update_hash and opened.device_key_id == device.key_id
    assert opened.metrics() == {"loss": 0.5, "steps": 3.0}
    assert opened.envelope.fields[Field.METADATA] == b'{"loss":0.5,"steps":3}'  # canonical JSON
    # the envelope is a self-standing provenance record
    SignedEnvelope.open(opened.envelope.to_bytes(), device.public, expected_type=MsgType.UPDATE)
    with pytest.raises(ReplayError):
        open_update(s, device.public, frame, 4)

    for status in AckStatus:
        ack = sign_update_ack(server, s.suite, opened, status, 1)
        rframe = seal_receipt(s, 4, ack, b'{"receipt":1}')
        assert rframe[1] == Frame.RECEIPT
        got, body = open_receipt(c, server.public, rframe, device.key_id, signed)
        assert got is status and bytes(body) == b'{"receipt":1}'


def test_update_without_metrics_has_no_metadata(session: Session) -> None:
    device, _, c, s = session
    opened = open_update(s, device.public, seal_update(c, sign_update(device, c.suite, 1, BASE, 1, b"u")), 1)
    assert Field.METADATA not in opened.envelope.fields and opened.metrics() == {}


def test_global_model_round_trip(session: Session) -> None:
    _, server, c, s = session
    env, digest = sign_global_model(server, s.suite, 5, b"model bytes", 123)
    assert digest == sha256(b"model bytes").hex()
    frame = seal_model(s, 5, env, b"model bytes")
    assert frame[1] == Frame.MODEL and int.from_bytes(frame[2:10], "big") == 5
    opened, blob = open_global_model(c, server.public, frame, 5, digest)
    assert bytes(blob) == b"model bytes" and opened.get_int(Field.TIMESTAMP) == 123
    assert opened.get_int(Field.MODEL_VERSION) == 5
    with pytest.raises(BadSignatureError):
        open_global_model(c, SigningKey.generate().public, seal_model(s, 5, env, b"model bytes"), 5, digest)


def test_model_must_be_the_one_asked_for(session: Session) -> None:
    _, server, c, s = session
    env, digest = sign_global_model(server, s.suite, 5, b"m", 0)
    with pytest.raises(StaleModelError) as exc:
        open_global_model(c, server.public, seal_model(s, 5, env, b"m"), 5, "00" * 32)
    assert exc.value.code == "stale_model"
    env6, digest6 = sign_global_model(server, s.suite, 6, b"m", 0)
    with pytest.raises(StaleModelError):  # signed as version 6, sent in a version-5 frame
        open_global_model(c, server.public, seal_model(s, 5, env6, b"m"), 5, digest6)
    with pytest.raises(ValidationError) as exc:
        open_global_model(c, server.public, seal_model(s, 5, env, b"mm"), 5, digest)
    assert exc.value.code == "payload_mismatch"
    with pytest.raises(ValidationError) as exc:
        open_global_model(c, server.public, seal_model(s, 5, env, b"n"), 5, digest)
    assert exc.value.code == "hash_mismatch"


def test_task_and_model_request_frames(session: Session) -> None:
    _, _, c, s = session
    assert open_task_request(s, seal_task_request(c)) is None
    assert open_task(c, seal_task(s, b'{"task":1}')) == b'{"task":1}'
    assert open_model_request(s, seal_model_request(c, 7)) == 7
    with pytest.raises(MalformedError):
        open_task_request(s, c.seal(Frame.TASK_REQUEST, 0, b"x"))
    for body in (b"", b"[]", b'{"version":"7"}', b'{"version":true}', b'{"version":-1}', b'{"version":1,"x":2}'):
        with pytest.raises(MalformedError):
            open_model_request(s, c.seal(Frame.MODEL_REQUEST, 0, body))
    with pytest.raises(AuthError) as exc:  # a frame of another type never opens as a model request
        open_model_request(s, seal_task_request(c))
    assert exc.value.code == "wrong_msg_type"


def test_update_on_another_base_model_refused(session: Session) -> None:
    device, _, c, s = session
    with pytest.raises(StaleModelError):
        frame = seal_update(c, sign_update(device, c.suite, 1, BASE, 1, b"u"))
        open_update(s, device.public, frame, 1, base_model_hash="00" * 32)


def test_inner_round_must_match(session: Session) -> None:
    device, _, c, s = session
    with pytest.raises(WrongRoundError):
        open_update(s, device.public, _raw_update(c, _update_env(device, c.suite, b"u", round=u64(6)), b"u", 7), 7)


@pytest.mark.parametrize(
    ("over", "payload", "code"),
    [
        ({"payload_size": u64(2)}, b"u", "payload_mismatch"),
        ({"update_hash": bytes(32)}, b"u", "hash_mismatch"),
        ({}, b"uu", "payload_mismatch"),
    ],
)
def test_payload_size_and_hash_must_match(session: Session, over: dict[str, bytes], payload: bytes, code: str) -> None:
    device, _, c, s = session
    with pytest.raises(ValidationError) as exc:
        open_update(s, device.public, _raw_update(c, _update_env(device, c.suite, b"u", **over), payload), 1)
    assert exc.value.code == code


def test_update_from_another_device_refused(session: Session) -> None:
    device, _, c, s = session
    other = SigningKey.generate()
    with pytest.raises(AuthError) as exc:  # names the other device: refused before the signature is checked
        open_update(s, device.public, seal_update(c, sign_update(other, c.suite, 1, BASE, 1, b"u")), 1)
    assert exc.value.code == "device_mismatch"
    forged = _update_env(other, c.suite, b"u", device_key_id=device.public.key_id_bytes)
    with pytest.raises(BadSignatureError) as exc:  # names this device, signed by another key
        open_update(s, device.public, _raw_update(c, forged, b"u"), 1)
    assert exc.value.code == "bad_signature"


def test_envelope_suite_must_match_session_both_ways(session: Session) -> None:
    device, _, c, s = session
    hi = SigningKey.generate(HIGH_SUITE.sig)
    env = _update_env(hi, HIGH_SUITE, b"u")
    with pytest.raises(PolicyError) as exc:
        open_update(s, hi.public, _raw_update(c, env, b"u"), 1)
    assert exc.value.code == "suite_mismatch"
    model_env, digest = sign_global_model(hi, HIGH_SUITE, 1, b"m", 0)
    with pytest.raises(PolicyError) as exc:
        open_global_model(c, hi.public, seal_model(s, 1, model_env, b"m"), 1, digest)
    assert exc.value.code == "suite_mismatch"
    signed = sign_update(device, c.suite, 1, BASE, 1, b"u")
    open_update(s, device.public, seal_update(c, signed), 1)
    ack = SignedEnvelope.sign(HIGH_SUITE, MsgType.UPDATE_ACK, _ack_fields(signed, device), hi)
    with pytest.raises(PolicyError) as exc:
        open_receipt(c, hi.public, seal_receipt(s, 1, ack.to_bytes(), b"{}"), device.key_id, signed)
    assert exc.value.code == "suite_mismatch"


def test_receipt_must_acknowledge_this_update(session: Session) -> None:
    device, server, c, s = session
    signed = sign_update(device, c.suite, 3, BASE, 1, b"u")
    opened = open_update(s, device.public, seal_update(c, signed), 3)
    good = _ack_fields(signed, device)
    for tag, value in (
        (Field.DEVICE_KEY_ID, SigningKey.generate().public.key_id_bytes),
        (Field.ROUND, u64(2)),
        (Field.UPDATE_HASH, sha256(b"v")),
    ):
        ack = SignedEnvelope.sign(c.suite, MsgType.UPDATE_ACK, good | {tag: value}, server).to_bytes()
        with pytest.raises(AuthError) as exc:
            open_receipt(c, server.public, seal_receipt(s, 3, ack, b"{}"), device.key_id, signed)
        assert exc.value.code == "bad_receipt", tag
    ack = SignedEnvelope.sign(c.suite, MsgType.UPDATE_ACK, good | {Field.STATUS: b"\x02"}, server).to_bytes()
    with pytest.raises(MalformedError):
        open_receipt(c, server.public, seal_receipt(s, 3, ack, b"{}"), device.key_id, signed)
    with pytest.raises(BadSignatureError):
        ack = sign_update_ack(SigningKey.generate(), c.suite, opened, AckStatus.ACCEPTED, 0)
        open_receipt(c, server.public, seal_receipt(s, 3, ack, b"{}"), device.key_id, signed)
    with pytest.raises(AuthError) as exc:  # a receipt sealed for another round never opens
        open_receipt(c, server.public, seal_receipt(s, 4, ack, b"{}"), device.key_id, signed)
    assert exc.value.code == "wrong_round"
    wrong = SignedUpdate(3, signed.payload, sha256(b"v").hex())
    ack = sign_update_ack(server, c.suite, opened, AckStatus.ACCEPTED, 0)
    with pytest.raises(AuthError):
        open_receipt(c, server.public, seal_receipt(s, 3, ack, b"{}"), device.key_id, wrong)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (b'{"a":1,"b":2.5}', {"a": 1.0, "b": 2.5}),
        (json.dumps({"k" * 100: 1}).encode(), {"k" * 64: 1.0}),
        (b'{"a":true}', None),
        (b'{"a":"1"}', None),
        (b"[1]", None),
        (b"\xff", None),
        (b"{", None),
        (b"[" * 2000 + b"]" * 2000, None),
    ],
)
def test_update_metrics(session: Session, metadata: bytes, expected: dict[str, float] | None) -> None:
    device, _, c, s = session
    opened = open_update(
        s, device.public, _raw_update(c, _update_env(device, c.suite, b"u", metadata=metadata), b"u"), 1
    )
    if expected is None:
        with pytest.raises(MalformedError):
            opened.metrics()
    else:
        assert opened.metrics() == expected


_SIGNER = SigningKey.generate()


def _metrics_of(metadata: bytes) -> dict[str, float]:
    """``OpenedUpdate.metrics()`` of an UPDATE envelope carrying ``metadata`` (signature not the point)."""
    env = SignedEnvelope.parse(
        _update_env(_SIGNER, DEFAULT_SUITE, b"u", metadata=metadata), expected_type=MsgType.UPDATE
    )
    return OpenedUpdate(env, memoryview(b"u")).metrics()


@pytest.mark.parametrize(
    "metadata",
    [
        b'{"loss":' + b"9" * 400 + b"}",  # float() of it overflowed: HTTP 500 on the coordinator
        b'{"loss":-' + b"9" * 400 + b"}",
        b'{"loss":NaN}',
        b'{"loss":Infinity}',
        b'{"loss":-Infinity}',
        b'{"loss":1e400}',  # parses to inf
        b'{"loss":1e16}',  # finite but absurd
        b'{"loss":12345678901234567}',
        b'{"loss":1,"loss":2}',  # ambiguous: which one was signed?
        json.dumps({"k" * 64 + "a": 1, "k" * 64 + "b": 2}).encode(),  # the same key once clipped
        b'{"loss":{"a":1}}',
        b'{"loss":null}',
    ],
)
def test_hostile_update_metrics_refused(metadata: bytes) -> None:
    with pytest.raises(MalformedError) as info:
        _metrics_of(metadata)
    assert info.value.code == "malformed"


_JSON_NUMBER = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" * 500, "0.0", "-0"]),
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(min_size=1, max_size=300),
        st.dictionaries(st.text(max_size=80), _JSON_NUMBER, max_size=6).map(
            lambda d: ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}").encode()
        ),
    )
)
def test_update_metrics_parser_is_total(metadata: bytes) -> None:
    """Whatever a device signs, the parser returns bounded finite floats or refuses with ``malformed``."""
    try:
        out = _metrics_of(metadata)
    except MalformedError as exc:
        assert exc.code == "malformed"
        return
    assert all(isinstance(v, float) and math.isfinite(v) and abs(v) <= 1e15 for v in out.values())
    assert all(isinstance(k, str) and len(k) <= 64 for k in out)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=64),
        st.one_of(st.integers(-(10**15), 10**15), st.floats(-1e15, 1e15, allow_nan=False)),
        min_size=1,
        max_size=8,
    )
)
def test_honest_update_metrics_round_trip(metrics: dict[str, float]) -> None:
    assert _metrics_of(canonical_json(metrics)) == {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("plaintext", [b"", b"\x00\x00", struct.pack(">I", 10) + b"abc", struct.pack(">I", 0xFFFFFFFF)])
def test_malformed_inner_layout(session: Session, plaintext: bytes) -> None:
    device, _, c, s = session
    with pytest.raises(MalformedError):
        open_update(s, device.public, c.seal(Frame.UPDATE, 1, plaintext), 1)


def test_envelope_of_another_type_refused(session: Session) -> None:
    device, _, c, s = session
    env, _ = sign_global_model(device, c.suite, 1, b"u", 0)
    with pytest.raises(MalformedError) as exc:
        open_update(s, device.public, _raw_update(c, env, b"u"), 1)
    assert exc.value.code == "unexpected_message"
