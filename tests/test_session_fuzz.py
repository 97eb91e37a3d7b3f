"""Fuzz the parsers behind the AEAD: mutated plaintexts sealed inside a valid session.

Random bytes never get past the AES-GCM tag, so fuzzing frames only exercises the channel.  Here a real
device and coordinator (real handshake, real session keys) seal *structurally mutated plaintexts* as
UPDATE frames to the coordinator and as TASK / MODEL / RECEIPT frames to the device, so the signed-payload
framing, the envelope parser, the signed-field checks, the safetensors decoder and the JSON messages all
see hostile input that authenticates.  Some mutations are re-signed with the genuine keys, so that the
checks behind the signature (sizes, hashes, metadata, tensor headers) are reached too.

Every outcome must be success or a QflareError, and a refused update must change no state.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_fixtures import Federation

from qflare.crypto import Channel, Field, Frame, MsgType, SignedEnvelope, SignedUpdate, pack_signed
from qflare.crypto.envelope import u64
from qflare.crypto.payloads import sign_global_model, sign_update, unpack_signed
from qflare.crypto.suite import sha256
from qflare.errors import QflareError
from qflare.protocol import Device, Receipt, Route, TaskInfo

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)

# ---------------------------------------------------------------------------- mutators
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.integers(max_value=-1)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, hot: tuple[int, int] | None = None) -> bytes:
    """Byte-level mutations; ``hot`` is a region (start, end) where most of them land."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        lo, hi = hot if hot is not None and draw(st.booleans()) else (0, len(out))
        pos = draw(st.integers(min(lo, len(out)), max(min(lo, len(out)), min(hi, len(out)) - 1)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
        if op == "flip" and pos < len(out):
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < len(out):
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del out[pos:]
        else:
            out += draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


@st.composite
def mutated_json(draw: st.DrawFn, obj: dict[str, Any]) -> bytes:
    """A JSON object with keys set to hostile values, removed or added, or with an integer spliced in that
    is longer than Python converts by default."""
    obj = json.loads(json.dumps(obj))
    huge = False
    for _ in range(draw(st.integers(1, 3))):
        target = obj
        if draw(st.booleans()):  # one level down, where there is one
            nested = [k for k, v in obj.items() if isinstance(v, dict)]
            if nested:
                target = obj[draw(st.sampled_from(sorted(nested)))]
        op = draw(st.sampled_from(["set", "delete", "add", "huge_int"]))
        keys = sorted(target)
        if op == "set" and keys:
            target[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        elif op == "delete" and keys:
            del target[draw(st.sampled_from(keys))]
        elif op == "huge_int" and keys:
            target[draw(st.sampled_from(keys))] = "HUGE"
            huge = True
        else:
            target[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    text = json.dumps(obj)
    if huge:
        text = text.replace('"HUGE"', "9" * draw(st.integers(4301, 4400)))
    return text.encode()


@st.composite
def mutated_safetensors(draw: st.DrawFn, blob: bytes) -> bytes:
    """A safetensors blob with its header JSON, header length or data region mutated."""
    (n,) = struct.unpack_from("<Q", blob, 0)
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    op = draw(st.sampled_from(["json", "json", "header_bytes", "length", "data"]))
    if op == "json":
        text = draw(mutated_json(header))
        return struct.pack("<Q", len(text)) + text + data
    if op == "header_bytes":
        text = draw(mutated_bytes(blob[8 : 8 + n]))
        return struct.pack("<Q", len(text)) + text + data
    if op == "length":
        return struct.pack("<Q", draw(st.one_of(st.integers(0, len(blob)), st.integers(0, 2**64 - 1)))) + blob[8:]
    return draw(mutated_bytes(blob, hot=(8 + n, 8 + n + 64)))


def only_qflare_errors(fn: Callable[[], object]) -> QflareError | None:
    try:
        fn()
    except QflareError as exc:
        return exc
    return None


# ---------------------------------------------------------------------------- the federation
def _federation(tmp: Path) -> tuple[Federation, Device]:
    fed = Federation(tmp)
    fed.coordinator.rounds.open_next()
    return fed, fed.selected()[0]


def _state(fed: Federation) -> tuple[object, ...]:
    rnd = fed.coordinator.rounds.current
    assert rnd is not None
    return (*fed.counts(), dict(rnd.accepted), rnd.aggregation.total_examples, rnd.aggregation.count)


def _channel(dev: Device) -> Channel:
    channel = dev._channel
    assert channel is not None
    return channel


def _coordinator_channel(fed: Federation, dev: Device) -> Channel:
    return fed.coordinator._sessions[dev._session_id or ""].channel


@pytest.fixture(scope="module")
def update_target(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fed, dev = _federation(tmp_path_factory.mktemp("update-fuzz"))
    task = dev.task()
    model = dev.fetch_model(task)
    signed = fed.prepare(dev)
    env, blob = unpack_signed(signed.payload)
    return {"fed": fed, "dev": dev, "task": task, "model": model, "signed": signed, "env": env, "blob": bytes(blob)}


@st.composite
def update_plaintexts(draw: st.DrawFn, t: dict[str, Any]) -> bytes:
    fed, dev, task, signed = t["fed"], t["dev"], t["task"], t["signed"]
    env_len = len(t["env"])
    kind = draw(st.sampled_from(["framing", "blob", "fields", "envelope"]))
    if kind == "framing":  # the genuine signed payload, mutated (length prefix, envelope, blob, tail)
        hot = draw(st.sampled_from([(0, 4), (4, 4 + env_len), (4 + env_len, 4 + env_len + 256)]))
        return draw(mutated_bytes(signed.payload, hot=hot))
    if kind == "blob":  # a hostile safetensors blob, honestly signed by the device
        blob = draw(mutated_safetensors(t["blob"]))
        metrics = {"loss": 1.0}
        return sign_update(dev.identity, dev.suite, task.round, task.model_hash, 5, blob, metrics).payload
    if kind == "envelope":  # the envelope bytes mutated, the signature left as it was
        return pack_signed(draw(mutated_bytes(t["env"])), t["blob"])
    # hostile signed fields: counts, sizes, hashes, rounds, metadata - all correctly signed
    blob = t["blob"]
    fields = {
        Field.DEVICE_KEY_ID: dev.identity.public.key_id_bytes,
        Field.ROUND: u64(draw(st.sampled_from([task.round, task.round, 0, task.round + 1, 2**64 - 1]))),
        Field.BASE_MODEL_HASH: bytes.fromhex(draw(st.sampled_from([task.model_hash, task.model_hash, "00" * 32]))),
        Field.UPDATE_HASH: draw(st.sampled_from([sha256(blob), sha256(blob), sha256(blob[:-1])])),
        Field.NUM_EXAMPLES: u64(draw(st.one_of(st.integers(0, 10), st.integers(2**31 - 2, 2**64 - 1)))),
        Field.PAYLOAD_SIZE: u64(draw(st.sampled_from([len(blob), len(blob), len(blob) - 1, len(blob) + 1, 0]))),
    }
    meta = draw(
        st.one_of(
            st.none(),
            st.dictionaries(st.text(max_size=70), JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()[:4096]),
            st.binary(min_size=1, max_size=64),
        )
    )
    if meta:
        fields[Field.METADATA] = meta
    env = SignedEnvelope.sign(fed.coordinator.config.suite, MsgType.UPDATE, fields, dev.identity).to_bytes()
    return pack_signed(env, blob)


@FUZZ
@given(data=st.data())
def test_coordinator_survives_hostile_update_plaintexts(update_target: dict[str, Any], data: st.DataObject) -> None:
    t = update_target
    fed, dev = t["fed"], t["dev"]
    plaintext = data.draw(update_plaintexts(t))
    rnd = fed.coordinator.rounds.current
    assert rnd is not None
    before = _state(fed)
    frame = _channel(dev).seal(Frame.UPDATE, rnd.number, plaintext)
    err = only_qflare_errors(lambda: fed.coordinator.handle(Route.UPDATE, frame, session_id=dev._session_id))
    if err is not None:
        assert _state(fed) == before, f"refused update ({err.code}) changed state"
        assert err.code in fed.events()


# ---------------------------------------------------------------------------- device side
@pytest.fixture(scope="module")
def device_target(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fed, dev = _federation(tmp_path_factory.mktemp("device-fuzz"))
    task = dev.task()
    model = fed.coordinator.rounds.model
    signed = fed.prepare(dev)
    return {"fed": fed, "dev": dev, "task": task, "model": model, "signed": signed}


def _answer_with(fed: Federation, dev: Device, route: Route, frame: Frame, rnd: int, plaintext: bytes) -> None:
    """Let the coordinator serve the request, then answer with ``plaintext`` sealed in the real session."""

    def tamper(r: Route, out: bytes) -> bytes:
        return _coordinator_channel(fed, dev).seal(frame, rnd, plaintext) if r is route else out

    fed.transport.tamper_response = tamper


@st.composite
def task_plaintexts(draw: st.DrawFn, task: TaskInfo) -> bytes:
    genuine = task.to_bytes()
    return draw(st.one_of(mutated_bytes(genuine), mutated_json(json.loads(genuine))))


@FUZZ
@given(data=st.data())
def test_device_survives_hostile_task_plaintexts(device_target: dict[str, Any], data: st.DataObject) -> None:
    t = device_target
    fed, dev = t["fed"], t["dev"]
    _answer_with(fed, dev, Route.TASK, Frame.TASK, 0, data.draw(task_plaintexts(t["task"])))
    try:
        only_qflare_errors(dev.task)
    finally:
        fed.transport.tamper_response = None


@FUZZ
@given(data=st.data())
def test_device_survives_hostile_model_plaintexts(device_target: dict[str, Any], data: st.DataObject) -> None:
    t = device_target
    fed, dev, task, model = t["fed"], t["dev"], t["task"], t["model"]
    if data.draw(st.booleans()):  # the genuine signed model, mutated
        plaintext = data.draw(mutated_bytes(pack_signed(model.envelope, model.blob)))
        asked = task
    else:  # a hostile safetensors blob, signed by the coordinator and named by the task
        blob = data.draw(mutated_safetensors(model.blob))
        env, digest = sign_global_model(fed.identity, fed.coordinator.config.suite, model.version, blob, 0)
        size = data.draw(st.sampled_from([len(blob), len(blob), len(blob) + 1]))
        plaintext = pack_signed(env, blob + b"\x00" * (size - len(blob)))
        asked = TaskInfo(task.round, task.state, task.selected, digest, model.version)
    _answer_with(fed, dev, Route.MODEL, Frame.MODEL, model.version, plaintext)
    try:
        only_qflare_errors(lambda: dev.fetch_model(asked))
    finally:
        fed.transport.tamper_response = None


@st.composite
def receipt_plaintexts(draw: st.DrawFn, fed: Federation, dev: Device, signed: SignedUpdate) -> bytes:
    fields = {
        Field.DEVICE_KEY_ID: dev.identity.public.key_id_bytes,
        Field.ROUND: u64(signed.round),
        Field.UPDATE_HASH: bytes.fromhex(signed.update_hash),
        Field.STATUS: bytes([draw(st.sampled_from([0, 0, 1, 2, 255]))]),
        Field.TIMESTAMP: u64(draw(st.integers(0, 2**64 - 1))),
    }
    ack = SignedEnvelope.sign(fed.coordinator.config.suite, MsgType.UPDATE_ACK, fields, fed.identity).to_bytes()
    receipt = Receipt(signed.round, signed.update_hash, 1, fields[Field.STATUS] == b"\x01").to_bytes()
    kind = draw(st.sampled_from(["framing", "receipt_json", "receipt_bytes"]))
    if kind == "framing":
        return draw(mutated_bytes(pack_signed(ack, receipt), hot=(0, 4 + len(ack))))
    if kind == "receipt_json":
        return pack_signed(ack, draw(mutated_json(json.loads(receipt))))
    return pack_signed(ack, draw(mutated_bytes(receipt)))


@FUZZ
@given(data=st.data())
def test_device_survives_hostile_receipt_plaintexts(device_target: dict[str, Any], data: st.DataObject) -> None:
    t = device_target
    fed, dev, signed = t["fed"], t["dev"], t["signed"]
    _answer_with(fed, dev, Route.UPDATE, Frame.RECEIPT, signed.round, data.draw(receipt_plaintexts(fed, dev, signed)))
    try:
        err = only_qflare_errors(lambda: dev.submit(signed))
    finally:
        fed.transport.tamper_response = None
    assert err is None or err.code not in ("duplicate_submission", "not_selected", "wrong_round")


def test_mutators_reach_the_parsers_behind_the_signature(update_target: dict[str, Any]) -> None:
    """The structure-aware mutations get past the AEAD and the signature to the decoder and metadata."""
    t = update_target
    fed, dev, task = t["fed"], t["dev"], t["task"]
    rnd = fed.coordinator.rounds.current
    assert rnd is not None

    def send(plaintext: bytes) -> QflareError | None:
        frame = _channel(dev).seal(Frame.UPDATE, rnd.number, plaintext)
        return only_qflare_errors(lambda: fed.coordinator.handle(Route.UPDATE, frame, session_id=dev._session_id))

    blob = t["blob"]
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8 : 8 + n])
    header["delta"]["data_offsets"] = [0, 4]
    text = json.dumps(header).encode()
    bad = struct.pack("<Q", len(text)) + text + blob[8 + n :]
    err = send(sign_update(dev.identity, dev.suite, task.round, task.model_hash, 5, bad).payload)
    assert err is not None and err.code == "malformed_blob"
    err = send(sign_update(dev.identity, dev.suite, task.round, task.model_hash, 5, blob, {"loss": 1}).payload[:-1])
    assert err is not None and err.code == "payload_mismatch"
    fields = {
        Field.DEVICE_KEY_ID: dev.identity.public.key_id_bytes,
        Field.ROUND: u64(task.round),
        Field.BASE_MODEL_HASH: bytes.fromhex(task.model_hash),
        Field.UPDATE_HASH: sha256(blob),
        Field.NUM_EXAMPLES: u64(5),
        Field.PAYLOAD_SIZE: u64(len(blob)),
        Field.METADATA: b'{"loss": "low"}',
    }
    env = SignedEnvelope.sign(dev.suite, MsgType.UPDATE, fields, dev.identity).to_bytes()
    err = send(pack_signed(env, blob))
    assert err is not None and err.code == "malformed"
