"""Signed payloads over a session (updates, global models, receipts)."""

from __future__ import annotations

import struct

import pytest

from qflare.crypto.channel import Channel
from qflare.crypto.envelope import Field, MsgType, SignedEnvelope, u64
from qflare.crypto.handshake import ClientHandshake, ServerHandshake, handshake_in_process
from qflare.crypto.identity import SigningKey
from qflare.crypto.payloads import (
    UPDATE_STATUS_ACCEPTED,
    open_global_model,
    open_update,
    seal_global_model,
    seal_update,
    sign_update_ack,
)
from qflare.crypto.suite import HIGH_SUITE, sha256
from qflare.errors import (
    AuthError,
    BadSignatureError,
    MalformedError,
    PolicyError,
    ReplayError,
    StaleModelError,
    WrongRoundError,
)

BASE = sha256(b"global model r4")


@pytest.fixture()
def session() -> tuple[SigningKey, SigningKey, Channel, Channel]:
    device, server = SigningKey.generate(), SigningKey.generate()
    c, s = handshake_in_process(
        ClientHandshake(device, server.public), ServerHandshake(server, {device.key_id: device.public}.get)
    )
    return device, server, c, s


def test_update_round_trip_and_receipt(session) -> None:  # type: ignore[no-untyped-def]
    device, server, c, s = session
    payload = bytes(range(256)) * 100
    frame = seal_update(c, device, 4, BASE, 321, payload, metadata=b'{"loss":0.5}')
    env, got = open_update(s, device.public, 4, frame, expected_base_model_hash=BASE)
    assert got == payload
    assert env.get_int(Field.ROUND) == 4 and env.get_int(Field.NUM_EXAMPLES) == 321
    assert env.fields.get(Field.METADATA) == b'{"loss":0.5}'
    assert env.get(Field.UPDATE_HASH) == sha256(payload) and env.get_key_id(Field.DEVICE_KEY_ID) == device.key_id
    # the envelope is a self-standing provenance record
    SignedEnvelope.open(env.to_bytes(), device.public, expected_type=MsgType.UPDATE)
    ack = sign_update_ack(server, env, UPDATE_STATUS_ACCEPTED, timestamp=1)
    back = SignedEnvelope.open(ack.to_bytes(), server.public, expected_type=MsgType.UPDATE_ACK)
    assert back.get(Field.UPDATE_HASH) == env.get(Field.UPDATE_HASH) and back.get(Field.STATUS) == b"\x00"
    with pytest.raises(ReplayError):
        open_update(s, device.public, 4, frame)


def test_global_model_round_trip(session) -> None:  # type: ignore[no-untyped-def]
    _, server, c, s = session
    frame = seal_global_model(s, server, 5, b"model bytes", timestamp=123)
    env, got = open_global_model(c, server.public, 5, frame)
    assert got == b"model bytes" and env.get_int(Field.TIMESTAMP) == 123
    with pytest.raises(BadSignatureError):
        open_global_model(c, SigningKey.generate().public, 5, seal_global_model(s, server, 5, b"m"))


def test_update_checks(session) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    with pytest.raises(StaleModelError):
        open_update(s, device.public, 1, seal_update(c, device, 1, BASE, 1, b"u"), expected_base_model_hash=bytes(32))
    with pytest.raises(BadSignatureError):
        open_update(s, SigningKey.generate().public, 2, seal_update(c, device, 2, BASE, 1, b"u"))


def _raw_update(
    c: Channel,
    device: SigningKey,
    frame_round: int,
    env_round: int,
    payload: bytes,
    size: int | None = None,
    digest: bytes | None = None,
) -> bytes:
    env = SignedEnvelope.sign(
        c.suite,
        MsgType.UPDATE,
        {
            Field.DEVICE_KEY_ID: bytes.fromhex(device.key_id),
            Field.ROUND: u64(env_round),
            Field.BASE_MODEL_HASH: BASE,
            Field.UPDATE_HASH: sha256(payload) if digest is None else digest,
            Field.NUM_EXAMPLES: u64(1),
            Field.PAYLOAD_SIZE: u64(len(payload) if size is None else size),
        },
        device,
    ).to_bytes()
    return c.seal(MsgType.UPDATE, frame_round, struct.pack(">I", len(env)) + env + payload)


def test_inner_round_must_match(session) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    with pytest.raises(WrongRoundError):
        open_update(s, device.public, 7, _raw_update(c, device, 7, 6, b"u"))


def test_payload_size_and_hash_must_match(session) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    with pytest.raises(AuthError) as exc:
        open_update(s, device.public, 1, _raw_update(c, device, 1, 1, b"u", size=2))
    assert exc.value.code == "payload_mismatch"
    with pytest.raises(AuthError) as exc:
        open_update(s, device.public, 1, _raw_update(c, device, 1, 1, b"u", digest=bytes(32)))
    assert exc.value.code == "payload_hash_mismatch"


def test_update_from_another_device_refused(session) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    other = SigningKey.generate()
    with pytest.raises(BadSignatureError) as exc:
        open_update(s, device.public, 1, seal_update(c, other, 1, BASE, 1, b"u"))
    assert exc.value.code == "bad_signature"


def test_update_naming_another_device_refused(session) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    other = SigningKey.generate()
    env = SignedEnvelope.sign(
        c.suite,
        MsgType.UPDATE,
        {
            Field.DEVICE_KEY_ID: bytes.fromhex(other.key_id),
            Field.ROUND: u64(1),
            Field.BASE_MODEL_HASH: BASE,
            Field.UPDATE_HASH: sha256(b"u"),
            Field.NUM_EXAMPLES: u64(1),
            Field.PAYLOAD_SIZE: u64(1),
        },
        device,
    ).to_bytes()
    with pytest.raises(AuthError) as exc:
        open_update(s, device.public, 1, c.seal(MsgType.UPDATE, 1, struct.pack(">I", len(env)) + env + b"u"))
    assert exc.value.code == "device_mismatch"


def test_envelope_suite_must_match_session(session) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    hi = SigningKey.generate(HIGH_SUITE.sig)
    env = SignedEnvelope.sign(
        HIGH_SUITE,
        MsgType.UPDATE,
        {
            Field.DEVICE_KEY_ID: bytes.fromhex(hi.key_id),
            Field.ROUND: u64(1),
            Field.BASE_MODEL_HASH: BASE,
            Field.UPDATE_HASH: sha256(b"u"),
            Field.NUM_EXAMPLES: u64(1),
            Field.PAYLOAD_SIZE: u64(1),
        },
        hi,
    ).to_bytes()
    frame = c.seal(MsgType.UPDATE, 1, struct.pack(">I", len(env)) + env + b"u")
    with pytest.raises(PolicyError) as exc:
        open_update(s, hi.public, 1, frame)
    assert exc.value.code == "suite_mismatch"


@pytest.mark.parametrize("plaintext", [b"", b"\x00\x00", struct.pack(">I", 10) + b"abc", struct.pack(">I", 0xFFFFFFFF)])
def test_malformed_inner_layout(session, plaintext: bytes) -> None:  # type: ignore[no-untyped-def]
    device, _, c, s = session
    with pytest.raises(MalformedError):
        open_update(s, device.public, 1, c.seal(MsgType.UPDATE, 1, plaintext))
