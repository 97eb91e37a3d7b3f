"""Known-answer tests against tests/vectors/crypto_v1.json (fail if any byte layout changes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qflare.crypto.channel import Channel, unsafe_seal_frame
from qflare.crypto.envelope import HEADER_LEN, Field, MsgType, SignedEnvelope, encode_fields
from qflare.crypto.handshake import ServerHandshake
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.kem import EphemeralKem, Role, SharedSecrets, derive_session_keys
from qflare.crypto.suite import Suite, sha256
from qflare.errors import QflareError

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "crypto_v1.json").read_text())
x = bytes.fromhex


def test_header() -> None:
    assert VECTORS["format"] == "qflare-crypto-vectors" and VECTORS["version"] == 1
    assert sha256(b"abc").hex() == VECTORS["sha256_abc"]


@pytest.mark.parametrize("row", VECTORS["suites"], ids=lambda r: r["name"])
def test_suites(row: dict[str, str]) -> None:
    s = Suite.from_bytes(x(row["bytes"]))
    assert s.name == row["name"] and s.to_bytes().hex() == row["bytes"]


@pytest.mark.parametrize("row", VECTORS["identities"], ids=lambda r: r["alg"])
def test_identities(row: dict[str, str]) -> None:
    key = SigningKey.from_seed(row["alg"], x(row["seed"]))
    assert key.public.raw.hex() == row["public"]
    assert key.key_id == row["key_id"] == sha256(x(row["public"])).hex()
    vk = VerifyKey.from_bytes(row["alg"], x(row["public"]))
    vk.verify(x(row["signature"]), x(row["message"]), x(row["context"]))  # recorded hedged signature


@pytest.mark.parametrize("row", VECTORS["kem"], ids=lambda r: r["suite"])
def test_kem(row: dict[str, str]) -> None:
    suite = Suite.from_bytes(x(row["suite"]))
    kem = EphemeralKem.unsafe_from_seeds(suite, x(row["mlkem_seed"]), x(row["x25519_private"]))
    assert kem.public_bytes().hex() == row["public"]
    got = kem.decapsulate(x(row["ciphertext"]))  # decapsulation is deterministic
    assert got.mlkem.hex() == row["shared_mlkem"] and (got.x25519 or b"").hex() == row["shared_x25519"]


@pytest.mark.parametrize("row", VECTORS["key_schedule"], ids=lambda r: f"hybrid={r['shared_x25519'] is not None}")
def test_key_schedule(row: dict[str, Any]) -> None:
    ss = SharedSecrets(x(row["shared_mlkem"]), x(row["shared_x25519"]) if row["shared_x25519"] else None)
    for role in (Role.CLIENT, Role.SERVER):
        keys = derive_session_keys(ss, x(row["transcript_hash"]), role)
        assert (keys.c2s.hex(), keys.s2c.hex(), keys.session_id.hex()) == (row["c2s"], row["s2c"], row["session_id"])


def test_channel_frames() -> None:
    v = VECTORS["channel"]
    sid, k1, k2 = x(v["session_id"]), x(v["send_key"]), x(v["recv_key"])
    sender, receiver = Channel(sid, k1, k2), Channel(sid, k2, k1)
    for f in v["frames"]:
        if f["counter"] == sender.send_counter:
            assert sender.seal(f["msg_type"], f["round"], x(f["plaintext"])).hex() == f["frame"]
        frame = unsafe_seal_frame(k1, sid, f["msg_type"], f["round"], f["counter"], x(f["plaintext"]))
        assert frame.hex() == f["frame"]
        assert receiver.open(f["msg_type"], f["round"], x(f["frame"])) == x(f["plaintext"])
    rk = v["rekey"]
    sender = Channel(sid, k1, k2, unsafe_initial_counters=(rk["frame"]["counter"], -1))
    receiver = Channel(sid, k2, k1)
    sender.rekey()
    receiver.rekey()
    assert sender.unsafe_keys() == (x(rk["send_key"]), x(rk["recv_key"]))
    f = rk["frame"]
    assert sender.seal(f["msg_type"], f["round"], x(f["plaintext"])).hex() == f["frame"]
    assert receiver.open(f["msg_type"], f["round"], x(f["frame"])) == x(f["plaintext"])


@pytest.mark.parametrize("row", VECTORS["envelopes"], ids=lambda r: f"{r['signer_alg']}-{r['msg_type']}")
def test_envelopes(row: dict[str, Any]) -> None:
    suite = Suite.from_bytes(x(row["suite"]))
    mt = MsgType[row["msg_type"]]
    fields = {Field[k]: x(v) for k, v in row["fields"].items()}
    key = SigningKey.from_seed(row["signer_alg"], x(row["signer_seed"]))
    assert encode_fields(mt, fields, suite).hex() == row["fields_encoding"]
    fresh = SignedEnvelope.sign(suite, mt, fields, key)
    assert fresh.body.hex() == row["body"]  # exact bytes before the signature
    assert row["body"] == (b"QFL\x01" + suite.to_bytes() + bytes([mt])).hex() + row["fields_encoding"]
    recorded = SignedEnvelope.open(x(row["envelope"]), key.public, expected_type=mt)
    assert recorded.body.hex() == row["body"] and dict(recorded.fields) == fields
    assert len(x(row["envelope"])) == len(fresh.to_bytes())


@pytest.mark.parametrize("row", VECTORS["handshakes"], ids=lambda r: r["suite"])
def test_handshake_transcript(row: dict[str, str]) -> None:
    suite = Suite.from_bytes(x(row["suite"]))
    device = SigningKey.from_seed(suite.sig, x(row["device_seed"]))
    server = SigningKey.from_seed(suite.sig, x(row["server_seed"]))
    kem = EphemeralKem.unsafe_from_seeds(suite, x(row["mlkem_seed"]), x(row["x25519_private"]))
    ch, sh, cf = x(row["client_hello"]), x(row["server_hello"]), x(row["client_finish"])
    hello = SignedEnvelope.open(ch, device.public, expected_type=MsgType.CLIENT_HELLO)
    assert hello.body.hex() == row["client_hello_body"]
    assert hello.get_int(Field.TIMESTAMP) == row["server_time"]
    assert hello.get(Field.KEM_PUBLIC) == kem.public_bytes()
    assert hello.get_key_id(Field.DEVICE_KEY_ID) == device.key_id
    reply = SignedEnvelope.open(sh, server.public, expected_type=MsgType.SERVER_HELLO)
    assert reply.get(Field.HELLO_HASH) == sha256(ch)
    assert reply.get(Field.LIFETIME).hex() == row["lifetime_s"]
    th = sha256(ch, sh)
    assert th.hex() == row["transcript_hash"]
    keys = derive_session_keys(kem.decapsulate(reply.get(Field.KEM_CIPHERTEXT)), th, Role.CLIENT)
    assert (keys.c2s.hex(), keys.s2c.hex(), keys.session_id.hex()) == (row["c2s"], row["s2c"], row["session_id"])
    finish = SignedEnvelope.open(cf, device.public, expected_type=MsgType.CLIENT_FINISH)
    assert finish.get(Field.TRANSCRIPT_HASH) == th
    assert len(ch) > HEADER_LEN
    # a live coordinator accepts the recorded CLIENT_HELLO and produces a reply of the same shape
    live = ServerHandshake(
        server, {device.key_id: device.public}.get, lifetime_s=900, clock=lambda: row["server_time"]
    ).respond(ch)
    assert len(live) == len(sh) and live[: HEADER_LEN + 5 + 32] == sh[: HEADER_LEN + 5 + 32]


@pytest.mark.parametrize("row", VECTORS["hello_refusals"], ids=lambda r: f"{r['suite']}-{r['name']}")
def test_hello_refusals(row: dict[str, Any]) -> None:
    suite = Suite.from_bytes(x(row["suite"]))
    device = SigningKey.from_seed(suite.sig, x(row["device_seed"]))
    server = SigningKey.from_seed(suite.sig, x(row["server_seed"]))
    ch = x(row["client_hello"])
    assert SignedEnvelope.parse(ch, expected_type=MsgType.CLIENT_HELLO).body.hex() == row["client_hello_body"]
    hs = ServerHandshake(server, {device.key_id: device.public}.get, clock=lambda: row["server_time"])
    with pytest.raises(QflareError) as exc:
        hs.respond(ch)
    assert exc.value.code == row["code"]
