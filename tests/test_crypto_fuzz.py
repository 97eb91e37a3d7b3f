"""Property tests: every parser of untrusted bytes raises only QflareError subclasses."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflare.crypto.channel import Channel
from qflare.crypto.envelope import Field, MsgType, SignedEnvelope, decode_fields, u64
from qflare.crypto.handshake import ClientHandshake, ServerHandshake
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.kem import EphemeralKem, encapsulate
from qflare.crypto.payloads import (
    Frame,
    open_global_model,
    open_receipt,
    open_update,
    seal_model,
    seal_update,
    sign_global_model,
    sign_update,
)
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Suite, sha256
from qflare.errors import QflareError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEVICE, SERVER = SigningKey.generate(), SigningKey.generate()
DIRECTORY = {DEVICE.key_id: DEVICE.public}


def _valid_messages() -> dict[str, bytes]:
    client = ClientHandshake(DEVICE, SERVER.public)
    server = ServerHandshake(SERVER, DIRECTORY.get)
    ch = client.start()
    sh = server.respond(ch)
    cf, c = client.finish(sh)
    s = server.finish(cf)
    upd = seal_update(c, sign_update(DEVICE, c.suite, 1, sha256(b"base").hex(), 10, b"update payload"))
    model_env, _ = sign_global_model(SERVER, s.suite, 1, b"model payload", 0)
    model = seal_model(s, 1, model_env, b"model payload")
    env = SignedEnvelope.sign(
        DEFAULT_SUITE,
        MsgType.GLOBAL_MODEL,
        {
            Field.MODEL_VERSION: u64(1),
            Field.MODEL_HASH: sha256(b"m"),
            Field.PAYLOAD_SIZE: u64(1),
            Field.TIMESTAMP: u64(0),
        },
        SERVER,
    ).to_bytes()
    frame = Channel(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32).seal(Frame.UPDATE, 1, b"frame payload")
    return {"ch": ch, "sh": sh, "cf": cf, "update": upd, "model": model, "env": env, "frame": frame}


VALID = _valid_messages()


@st.composite
def mutated(draw: st.DrawFn, key: str) -> bytes:
    data = bytearray(VALID[key])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def only_qflare_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except QflareError:
        pass


def envelope_like(draw_bytes: bytes) -> bytes:
    return b"QFL\x01" + draw_bytes


@FUZZ
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(envelope_like), mutated("env"), mutated("cf")))
def test_envelope_parser(data: bytes) -> None:
    only_qflare_errors(lambda: SignedEnvelope.parse(data).verify(SERVER.public))
    only_qflare_errors(lambda: SignedEnvelope.parse(data, max_size=200))


@FUZZ
@given(
    st.sampled_from(list(MsgType) + [0, 0x99]), st.binary(max_size=300), st.sampled_from([DEFAULT_SUITE, HIGH_SUITE])
)
def test_decode_fields(mt: int, data: bytes, suite: Suite) -> None:
    only_qflare_errors(lambda: decode_fields(mt, data, suite))  # type: ignore[arg-type]


@FUZZ
@given(st.binary(max_size=8))
def test_suite_parser(data: bytes) -> None:
    only_qflare_errors(lambda: Suite.from_bytes(data))


@FUZZ
@given(st.one_of(st.binary(max_size=120), mutated("frame")), st.integers(0, 255), st.integers(0, 3))
def test_channel_open(data: bytes, mt: int, rnd: int) -> None:
    receiver = Channel(b"\x01" * 32, b"\x03" * 32, b"\x02" * 32, max_plaintext=64)
    only_qflare_errors(lambda: receiver.open(mt, rnd, data))
    only_qflare_errors(lambda: receiver.open(Frame.UPDATE, 1, data))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(envelope_like), mutated("ch")))
def test_server_respond(data: bytes) -> None:
    only_qflare_errors(lambda: ServerHandshake(SERVER, DIRECTORY.get).respond(data))


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated("sh")))
def test_client_finish_step(data: bytes) -> None:
    client = ClientHandshake(DEVICE, SERVER.public)
    client.start()
    only_qflare_errors(lambda: client.finish(data))


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated("cf")))
def test_server_finish_step(data: bytes) -> None:
    client = ClientHandshake(DEVICE, SERVER.public)
    server = ServerHandshake(SERVER, DIRECTORY.get)
    server.respond(client.start())
    only_qflare_errors(lambda: server.finish(data))


def _session() -> tuple[Channel, Channel]:
    client = ClientHandshake(DEVICE, SERVER.public)
    server = ServerHandshake(SERVER, DIRECTORY.get)
    cf, c = client.finish(server.respond(client.start()))
    return c, server.finish(cf)


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated("update")))
def test_open_update(data: bytes) -> None:
    _, s = _session()
    only_qflare_errors(lambda: open_update(s, DEVICE.public, data, 1))


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated("model"), mutated("update")))
def test_open_model_and_receipt(data: bytes) -> None:
    c, _ = _session()
    signed = sign_update(DEVICE, c.suite, 1, sha256(b"base").hex(), 10, b"update payload")
    only_qflare_errors(lambda: open_global_model(c, SERVER.public, data, 1, sha256(b"model payload").hex()))
    only_qflare_errors(lambda: open_receipt(c, SERVER.public, data, DEVICE.key_id, signed))


@FUZZ
@given(st.binary(max_size=2000), st.binary(max_size=3400), st.binary(max_size=64))
def test_verify_key_and_signature(raw: bytes, sig: bytes, msg: bytes) -> None:
    only_qflare_errors(lambda: VerifyKey.from_bytes("ML-DSA-65", raw))
    only_qflare_errors(lambda: DEVICE.public.verify(sig, msg, b"qflare/v1/update"))


@FUZZ
@given(st.binary(max_size=1300), st.binary(max_size=1200))
def test_kem_inputs(pub: bytes, ct: bytes) -> None:
    only_qflare_errors(lambda: encapsulate(DEFAULT_SUITE, pub))
    only_qflare_errors(lambda: EphemeralKem.generate(DEFAULT_SUITE).decapsulate(ct))


@FUZZ
@given(st.binary(min_size=1184 + 32, max_size=1184 + 32), st.binary(min_size=1088 + 32, max_size=1088 + 32))
def test_kem_inputs_right_length(pub: bytes, ct: bytes) -> None:
    only_qflare_errors(lambda: encapsulate(DEFAULT_SUITE, pub))
    only_qflare_errors(lambda: EphemeralKem.generate(DEFAULT_SUITE).decapsulate(ct))
