"""Known-answer tests against tests/vectors/protocol_v1.json (docs/protocol.md, "Test vectors")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qflare import errors
from qflare.crypto.channel import Channel, unsafe_seal_frame
from qflare.crypto.envelope import HEADER_LEN, Field, MsgType, SignedEnvelope, context_for, encode_fields
from qflare.crypto.handshake import ServerHandshake
from qflare.crypto.identity import SigningKey
from qflare.crypto.kem import EphemeralKem, Role, derive_session_keys
from qflare.crypto.payloads import (
    AckStatus,
    Frame,
    SignedUpdate,
    open_global_model,
    open_model_request,
    open_parts,
    open_proof,
    open_proof_request,
    open_receipt,
    open_task,
    open_task_request,
    open_update,
    pack_parts,
    pack_signed,
    unpack_parts,
    unpack_signed,
)
from qflare.crypto.suite import DEFAULT_POLICY, DEFAULT_SUITE, Policy, Suite, sha256
from qflare.device.announce import check_model, parse_announcement
from qflare.device.state import pin_server_key, read_pin_file
from qflare.models import create_model
from qflare.protocol.messages import TaskInfo, encode_json
from qflare.protocol.proofs import verify_answer
from qflare.storage.identity import hash_token
from qflare.wire import ParamLayout

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "protocol_v1.json").read_text())
x = bytes.fromhex


def test_header() -> None:
    assert VECTORS["format"] == "qflare-protocol-vectors" and VECTORS["version"] == 1
    for name, wire in VECTORS["suites"].items():
        assert Suite.from_bytes(x(wire)).to_bytes().hex() == wire, name


@pytest.mark.parametrize("row", VECTORS["canonical_json"], ids=lambda r: r["what"])
def test_canonical_json(row: dict[str, Any]) -> None:
    assert encode_json(row["value"]).hex() == row["encoding"]
    assert json.loads(x(row["encoding"])) == row["value"]


def test_task_body_is_taskinfo() -> None:
    row = next(r for r in VECTORS["canonical_json"] if r["what"].startswith("TASK body"))
    assert TaskInfo.from_bytes(x(row["encoding"])).to_bytes().hex() == row["encoding"]


@pytest.mark.parametrize("row", VECTORS["key_files"], ids=lambda r: r["alg"])
def test_key_files(row: dict[str, str], tmp_path: Path) -> None:
    key = SigningKey.from_seed(row["alg"], x(row["seed"]))
    assert key.to_pem(None).decode("ascii") == row["pkcs8_pem"]  # unencrypted PKCS#8 is deterministic
    assert SigningKey.from_pem(row["pkcs8_pem"].encode(), None).unsafe_seed_bytes().hex() == row["seed"]
    enc = row["encrypted_pkcs8_pem"].encode()
    assert SigningKey.from_pem(enc, x(row["passphrase"])).public == key.public  # recorded (random salt/IV)
    with pytest.raises(errors.AuthError) as bad:
        SigningKey.from_pem(enc, b"wrong")
    assert bad.value.code == "bad_passphrase"
    with pytest.raises(errors.AuthError) as missing:
        SigningKey.from_pem(enc, None)
    assert missing.value.code == "passphrase_required"
    assert row["coordinator_pub"] == key.public.raw.hex() + "\n"
    assert row["coordinator_keyid"] == key.key_id + "\n"
    for name in ("coordinator_pub", "coordinator_keyid"):
        (tmp_path / name).write_text(row[name])
        assert read_pin_file(tmp_path / name) == key.key_id


def test_identity_document_pins() -> None:
    v = VECTORS["identity_document"]
    doc = v["document"]
    key, suite = pin_server_key(doc, v["pinned_key_id"])
    assert key.raw.hex() == doc["public_key"] and key.key_id == doc["key_id"] and suite == DEFAULT_SUITE
    with pytest.raises(errors.AuthError) as exc:  # the document's own key_id claim is never trusted
        pin_server_key({**doc, "key_id": "00" * 32}, "00" * 32)
    assert exc.value.code == "server_key_mismatch"
    announced = parse_announcement(doc)  # the model a device must bring (section 9.1 step 5)
    assert announced is not None and announced.input_shape == (1, 8, 8) and announced.num_classes == 10
    check_model(announced, "mlp", ParamLayout.from_module(create_model("mlp", (1, 8, 8), 10)))
    with pytest.raises(errors.ConfigError) as exc:
        check_model(announced, "mlp", ParamLayout.from_module(create_model("mlp", (1, 28, 28), 10)))
    assert exc.value.code == "arch_mismatch"


def test_enroll_token() -> None:
    v = VECTORS["enroll_token"]
    assert v["token"].encode("utf-8").hex() == v["enroll_token_field"]
    assert hash_token(v["token"]) == v["stored_hash"] == sha256(x(v["enroll_token_field"])).hex()


@pytest.mark.parametrize("row", VECTORS["envelopes"], ids=lambda r: f"{r['signer_alg']}-{r['name']}")
def test_envelopes(row: dict[str, Any]) -> None:
    suite = Suite.from_bytes(x(row["suite"]))
    mt = MsgType[row["msg_type"]]
    assert context_for(mt).hex() == row["context"]
    fields = {Field[k]: x(v) for k, v in row["fields"].items()}
    signer = SigningKey.from_seed(row["signer_alg"], x(row["signer_seed"]))
    fresh = SignedEnvelope.sign(suite, mt, fields, signer)
    assert fresh.body.hex() == row["body"]
    assert row["body"] == (b"QFL\x01" + suite.to_bytes() + bytes([mt])).hex() + encode_fields(mt, fields, suite).hex()
    env = x(row["envelope"])
    recorded = SignedEnvelope.open(env, signer.public, expected_type=mt)  # recorded hedged signature
    assert recorded.body.hex() == row["body"] and dict(recorded.fields) == fields
    sig_len = suite.sig_alg.signature_len
    assert env[len(recorded.body) : len(recorded.body) + 4] == sig_len.to_bytes(4, "big")
    assert len(env) == len(recorded.body) + 4 + sig_len
    signer.public.verify(env[-sig_len:], recorded.body, x(row["context"]))


def test_non_hybrid_handshake() -> None:
    v = VECTORS["non_hybrid_handshake"]
    suite = Suite.from_bytes(x(v["suite"]))
    assert not suite.x25519
    policy = Policy(**v["policy"])
    device = SigningKey.from_seed(suite.sig, x(v["device_seed"]))
    server = SigningKey.from_seed(suite.sig, x(v["server_seed"]))
    kem = EphemeralKem.unsafe_from_seeds(suite, x(v["mlkem_seed"]), None)
    ch, sh, cf = x(v["client_hello"]), x(v["server_hello"]), x(v["client_finish"])
    hello = SignedEnvelope.open(ch, device.public, expected_type=MsgType.CLIENT_HELLO)  # recorded signature
    assert hello.body.hex() == v["client_hello_body"] and hello.get_int(Field.TIMESTAMP) == v["server_time"]
    assert hello.get(Field.KEM_PUBLIC) == kem.public_bytes() and len(kem.public_bytes()) == suite.kem_alg.public_len
    assert hello.get(Field.CLIENT_NONCE).hex() == v["client_nonce"]
    reply = SignedEnvelope.open(sh, server.public, expected_type=MsgType.SERVER_HELLO)
    assert reply.get(Field.HELLO_HASH) == sha256(ch) and reply.get_int(Field.LIFETIME) == v["lifetime_s"]
    assert len(reply.get(Field.KEM_CIPHERTEXT)) == suite.kem_alg.ciphertext_len  # no X25519 share
    th = sha256(ch, sh)
    assert th.hex() == v["transcript_hash"]
    keys = derive_session_keys(kem.decapsulate(reply.get(Field.KEM_CIPHERTEXT)), th, Role.CLIENT)
    assert (keys.c2s.hex(), keys.s2c.hex(), keys.session_id.hex()) == (v["c2s"], v["s2c"], v["session_id"])
    assert v["session_id_text"] == keys.session_id.hex()
    finish = SignedEnvelope.open(cf, device.public, expected_type=MsgType.CLIENT_FINISH)
    assert finish.get(Field.TRANSCRIPT_HASH) == th
    assert x(v["finish_body"]) == sha256(sh) + cf
    now = float(v["server_time"])
    live = ServerHandshake(
        server, {device.key_id: device.public}.get, policy=policy, lifetime_s=900, clock=lambda: now
    ).respond(ch)
    assert len(live) == len(sh) and live[: HEADER_LEN + 5 + 32] == sh[: HEADER_LEN + 5 + 32]
    with pytest.raises(errors.PolicyError) as refused:  # the default policy requires the hybrid
        ServerHandshake(server, {device.key_id: device.public}.get, policy=DEFAULT_POLICY, clock=lambda: now).respond(
            ch
        )
    assert refused.value.code == "policy_violation"


def test_channel_frames() -> None:
    v = VECTORS["channel"]
    sid, keys = x(v["session_id"]), {"c2s": x(v["c2s"]), "s2c": x(v["s2c"])}
    coordinator = Channel(sid, keys["s2c"], keys["c2s"])  # receives the device's frames
    device = Channel(sid, keys["c2s"], keys["s2c"])
    assert {f["name"] for f in v["frames"]} == {f.name for f in Frame}
    envs = {e["msg_type"]: e for e in VECTORS["envelopes"] if e["suite"] == DEFAULT_SUITE.to_bytes().hex()}
    for f in v["frames"]:
        assert Frame[f["name"]] == f["frame_type"]
        pt, frame = x(f["plaintext"]), x(f["frame"])
        assert unsafe_seal_frame(keys[f["key"]], sid, f["frame_type"], f["round"], f["counter"], pt) == frame
        assert frame[:18] == bytes([1, f["frame_type"]]) + f["round"].to_bytes(8, "big") + f["counter"].to_bytes(
            8, "big"
        )
        if f["name"] in ("MODEL", "UPDATE", "RECEIPT"):
            head, payload = unpack_signed(pt)
            mt = {"MODEL": MsgType.GLOBAL_MODEL, "UPDATE": MsgType.UPDATE, "RECEIPT": MsgType.UPDATE_ACK}[f["name"]]
            row = envs[mt.name]
            signer = SigningKey.from_seed(row["signer_alg"], x(row["signer_seed"])).public
            env = SignedEnvelope.open(head, signer, expected_type=mt)
        _open_with_recipe(f["name"], coordinator if f["sender"] == "device" else device, frame, f["round"], pt, envs)
        if f["name"] in ("MODEL", "UPDATE", "RECEIPT"):
            if mt is not MsgType.UPDATE_ACK:
                assert env.get_int(Field.PAYLOAD_SIZE) == len(payload)
                assert env.get(Field.MODEL_HASH if mt is MsgType.GLOBAL_MODEL else Field.UPDATE_HASH) == sha256(payload)
            else:
                assert json.loads(bytes(payload))["update_hash"] == env.get(Field.UPDATE_HASH).hex()


def _open_with_recipe(
    name: str, receiver: Channel, frame: bytes, rnd: int, pt: bytes, envs: dict[str, dict[str, Any]]
) -> None:
    """Open one recorded frame with the payload recipe the receiving side uses (qflare.crypto.payloads)."""

    def signer(msg_type: str) -> SigningKey:
        row = envs[msg_type]
        return SigningKey.from_seed(row["signer_alg"], x(row["signer_seed"]))

    if name.startswith("SECAGG_"):
        parts = open_parts(receiver, Frame[name], rnd, frame)
        assert pack_parts(parts) == pt and unpack_parts(pt) == parts
    elif name == "TASK_REQUEST":
        open_task_request(receiver, frame)
    elif name == "TASK":
        assert open_task(receiver, frame) == pt
    elif name == "MODEL_REQUEST":
        assert open_model_request(receiver, frame) == json.loads(pt)["version"]
    elif name == "PROOF_REQUEST":
        assert open_proof_request(receiver, frame) == json.loads(pt)["round"]
    elif name == "PROOF":
        assert open_proof(receiver, frame, rnd) == pt
        leaf = VECTORS["channel"]["proof_leaf"]
        srv = SigningKey.from_seed("ML-DSA-65", x(envs["UPDATE_ACK"]["signer_seed"])).public
        verified = verify_answer(
            pt,
            round_number=rnd,
            device_id=leaf["device_key_id"],
            update_hash=leaf["update_hash"],
            examples=leaf["examples"],
            keys={srv.key_id: srv},
        )
        assert verified.included and verified.proof is not None and verified.proof.size == 2
    elif name == "MODEL":
        model_hash = x(envs["GLOBAL_MODEL"]["fields"]["MODEL_HASH"]).hex()
        env, blob = open_global_model(receiver, signer("GLOBAL_MODEL").public, frame, rnd, model_hash)
        assert env.get_int(Field.MODEL_VERSION) == rnd and pack_signed(env.to_bytes(), blob) == pt
    elif name == "UPDATE":
        dev = signer("UPDATE")
        opened = open_update(receiver, dev.public, frame, rnd)
        assert (
            opened.device_key_id == dev.key_id
            and opened.metrics()
            and pack_signed(opened.envelope.to_bytes(), opened.blob) == pt
        )
    else:
        fields = envs["UPDATE_ACK"]["fields"]  # both recorded acks name the same device and update
        dev_key_id, update_hash = fields["DEVICE_KEY_ID"], fields["UPDATE_HASH"]
        status, body = open_receipt(
            receiver, signer("UPDATE_ACK").public, frame, dev_key_id, SignedUpdate(rnd, b"", update_hash)
        )
        assert status is AckStatus.ACCEPTED and json.loads(bytes(body))["duplicate"] is False
        assert bytes(unpack_signed(pt)[1]) == bytes(body)


def test_signed_payload() -> None:
    v = VECTORS["signed_payload"]
    env, payload = x(v["envelope"]), x(v["payload"])
    assert pack_signed(env, payload).hex() == v["packed"] == v["length_prefix"] + v["envelope"] + v["payload"]
    head, rest = unpack_signed(x(v["packed"]))
    assert head == env and bytes(rest) == payload


def _apply(vec: dict[str, Any]) -> None:
    p = vec["params"]
    data = x(vec["input"]) + bytes(p.get("append_zero_bytes", 0))
    fed = vec["fed_to"]
    if fed == "Suite.from_bytes":
        Suite.from_bytes(data)
    elif fed == "SignedEnvelope.parse":
        SignedEnvelope.parse(data, expected_type=MsgType[p["expected_type"]])
    elif fed == "SignedEnvelope.open":
        vk = SigningKey.from_seed(p["key_alg"], x(p["key_seed"])).public
        SignedEnvelope.open(data, vk, expected_type=MsgType[p["expected_type"]])
    elif fed == "unpack_signed":
        unpack_signed(data)
    elif fed == "ServerHandshake.respond":
        device = SigningKey.from_seed(p["key_alg"], x(p["key_seed"])).public
        server = SigningKey.from_seed(p["key_alg"], x(p["server_seed"]))
        ServerHandshake(server, {device.key_id: device}.get, clock=lambda: float(p["server_time"])).respond(data)
    else:
        ch = Channel(
            x(p["session_id"]),
            x(p["send_key"]),
            x(p["recv_key"]),
            unsafe_initial_counters=(0, p.get("last_accepted_counter", -1)),
        )
        if fed == "Channel.open":
            ch.open(p["frame_type"], p["round"], data)
        elif fed == "open_task_request":
            open_task_request(ch, data)
        elif fed == "open_model_request":
            open_model_request(ch, data)
        elif fed == "open_proof_request":
            open_proof_request(ch, data)
        else:
            vk = SigningKey.from_seed(p["key_alg"], x(p["key_seed"])).public
            if fed == "open_update":
                open_update(ch, vk, data, p["round"], base_model_hash=p.get("base_model_hash"))
            elif fed == "open_global_model":
                open_global_model(ch, vk, data, p["version"], p["expected_hash"])
            else:
                assert fed == "open_receipt", fed
                open_receipt(ch, vk, data, p["device_key_id"], SignedUpdate(p["round"], b"", p["update_hash"]))


@pytest.mark.parametrize("vec", VECTORS["negative"], ids=lambda v: v["description"])
def test_negative(vec: dict[str, Any]) -> None:
    with pytest.raises(errors.QflareError) as exc:
        _apply(vec)
    assert (type(exc.value).__name__, exc.value.code) == (vec["error_class"], vec["error_code"])


def test_negative_coverage() -> None:
    codes = {v["error_code"] for v in VECTORS["negative"]}
    assert {"bad_signature", "unexpected_message", "malformed", "truncated", "oversized", "suite_mismatch"} <= codes
    assert {"bad_mac", "replay", "wrong_round", "wrong_msg_type", "payload_mismatch", "device_mismatch"} <= codes
    assert {"hash_mismatch", "stale_model", "bad_receipt", "stale_request"} <= codes
    hellos = {v["error_code"] for v in VECTORS["negative"] if v["fed_to"] == "ServerHandshake.respond"}
    assert hellos == {"bad_signature", "stale_request"}
    assert "payload_hash_mismatch" not in codes
    fed = {v["fed_to"] for v in VECTORS["negative"]}
    assert {"open_update", "open_global_model", "open_receipt", "open_task_request", "open_model_request"} <= fed
    for v in VECTORS["negative"]:  # frames fed to the recipes use the protocol's frame types
        if v["fed_to"].startswith("open_") and "frame_type" in v["params"]:
            assert v["params"]["frame_type"] in {int(f) for f in Frame}, v["description"]
