"""Generate tests/vectors/protocol_v1.json: QFLARE protocol v1 vectors (messages, frames, files, refusals).

    .venv/bin/python tests/vectors/make_protocol_vectors.py            # (re)write the file
    .venv/bin/python tests/vectors/make_protocol_vectors.py --check    # recompute and compare

This file complements crypto_v1.json (primitives, key schedule, HYBRID handshakes): it holds one signed
envelope of every message type as the protocol sends it, a non-hybrid handshake, one channel frame of
every protocol frame type, the signed-payload framing, key and pin files, the identity document, the
enrollment token encoding, canonical JSON bodies, and negative vectors (input -> expected error code).

Everything is built from fixed seeds.  ML-DSA signing is hedged and ML-KEM encapsulation draws its own
randomness, so signatures (the signed CLIENT_HELLO's included), the SERVER_HELLO, everything after it in the handshake, encrypted key files and
frames that carry a signed envelope are *recorded*: the test checks that they verify, decapsulate,
decrypt or re-seal as stated.  ``--check`` compares only the deterministic parts.  The expected error of
each negative vector is what the reference code raises when the generator runs; the test re-checks it.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qflare.crypto.channel import Channel, unsafe_seal_frame  # noqa: E402
from qflare.crypto.envelope import HEADER_LEN, Field, MsgType, SignedEnvelope, u32, u64  # noqa: E402
from qflare.crypto.handshake import ServerHandshake  # noqa: E402
from qflare.crypto.identity import SigningKey  # noqa: E402
from qflare.crypto.kem import EphemeralKem, Role, derive_session_keys  # noqa: E402
from qflare.crypto.payloads import (  # noqa: E402
    Frame,
    SignedUpdate,
    open_global_model,
    open_model_request,
    open_proof_request,
    open_receipt,
    open_task_request,
    open_update,
    pack_parts,
    pack_signed,
    seal_model,
    seal_model_request,
    seal_parts,
    seal_proof,
    seal_proof_request,
    seal_receipt,
    seal_task,
    seal_task_request,
    seal_update,
    unpack_signed,
)
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Policy, Suite, sha256  # noqa: E402
from qflare.errors import QflareError  # noqa: E402
from qflare.ledger import GENESIS_PREV, LedgerEntry, LeftOut, RoundRecord, RoundUpdate  # noqa: E402
from qflare.models import create_model  # noqa: E402
from qflare.protocol.messages import encode_json  # noqa: E402
from qflare.protocol.proofs import answer_for  # noqa: E402
from qflare.wire import ParamLayout  # noqa: E402

OUT = Path(__file__).with_name("protocol_v1.json")
LOW_SUITE = Suite(sig="ML-DSA-44", kem="ML-KEM-768", x25519=False)  # the only non-hybrid suite vectored
LOW_POLICY = Policy(min_sig_level=2, min_kem_level=3, require_hybrid=False)
T0 = 1_700_000_000
TOKEN = "Qf1-example_token-0123456789abcdefghijklmnopq"  # 43 chars would be minted; any 1..512 bytes parse


def seed(label: str, n: int = 32) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += sha256(f"qflare-protocol-vector/{label}/{i}".encode())
        i += 1
    return out[:n]


def h(b: bytes | bytearray | memoryview) -> str:
    return bytes(b).hex()


def key(role: str, alg: str = "ML-DSA-65") -> SigningKey:
    return SigningKey.from_seed(alg, seed(f"key/{alg}/{role}"))


# ---------------------------------------------------------------------------------------------- JSON
def canonical_json() -> list[dict[str, Any]]:
    task = {
        "round": 4,
        "state": "open",
        "selected": True,
        "model_hash": sha256(b"model v3").hex(),
        "model_version": 3,
        "deadline": 1700000600.5,
        "submitted": False,
    }
    receipt = {
        "round": 4,
        "update_hash": sha256(b"update").hex(),
        "updates_in_round": 2,
        "duplicate": False,
        "extra": {},
    }
    rows = [
        ("MODEL_REQUEST body", {"version": 3}),
        ("TASK body (TaskInfo)", task),
        ("RECEIPT JSON (after the UPDATE_ACK envelope)", receipt),
        ("UPDATE METADATA", {"loss": 0.25, "train_s": 1.5, "steps": 40.0}),
        ("non-ASCII is escaped, keys sorted", {"z": 1, "a": "\u00e9"}),
    ]
    return [{"what": w, "value": v, "encoding": h(encode_json(v))} for w, v in rows]


# ----------------------------------------------------------------------------------- files, tokens
def key_files() -> list[dict[str, Any]]:
    rows = []
    for alg in ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87"):
        k = key("file", alg)
        rows.append(
            {
                "alg": alg,
                "seed": h(k.unsafe_seed_bytes()),
                "pkcs8_pem": k.to_pem(None).decode("ascii"),
                "passphrase": h(b"correct horse"),
                "encrypted_pkcs8_pem": k.to_pem(b"correct horse").decode("ascii"),  # recorded (random salt/IV)
                "coordinator_pub": k.public.raw.hex() + "\n",
                "coordinator_keyid": k.key_id + "\n",
            }
        )
    return rows


def identity_document() -> dict[str, Any]:
    k = key("server")
    return {
        "route": "GET /v1/identity",
        "document": {
            "alg": k.alg,
            "public_key": k.public.raw.hex(),
            "key_id": k.key_id,
            "suite": DEFAULT_SUITE.name,
            # the model devices must train (section 9.1 step 5): unsigned, a configuration guard
            "model": "mlp",
            "arch": ParamLayout.from_module(create_model("mlp", (1, 8, 8), 10)).fingerprint,
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "mean": [0.3055329],
            "std": [0.37594736],
        },
        "pinned_key_id": k.key_id,
    }


def tokens() -> dict[str, Any]:
    return {
        "token": TOKEN,
        "enroll_token_field": h(TOKEN.encode("utf-8")),
        "stored_hash": sha256(TOKEN.encode("utf-8")).hex(),
    }


# -------------------------------------------------------------------------------------- envelopes
def _update_fields(dev: SigningKey, with_metadata: bool) -> dict[Field, bytes]:
    fields = {
        Field.DEVICE_KEY_ID: dev.key_id_bytes,
        Field.ROUND: u64(4),
        Field.BASE_MODEL_HASH: sha256(b"model v3"),
        Field.UPDATE_HASH: sha256(b"update"),
        Field.NUM_EXAMPLES: u64(600),
        Field.PAYLOAD_SIZE: u64(len(b"update")),
    }
    if with_metadata:
        fields[Field.METADATA] = encode_json({"loss": 0.25, "train_s": 1.5, "steps": 40.0})
    return fields


def message_cases(suite: Suite) -> list[tuple[str, MsgType, str, dict[Field, bytes]]]:
    dev, srv = key("device", suite.sig), key("server", suite.sig)
    upd = _update_fields(dev, False)
    ack = {
        Field.DEVICE_KEY_ID: dev.key_id_bytes,
        Field.ROUND: u64(4),
        Field.UPDATE_HASH: sha256(b"update"),
        Field.STATUS: b"\x00",
        Field.TIMESTAMP: u64(T0 + 60),
    }
    hello_kem = EphemeralKem.unsafe_from_seeds(
        suite, seed(f"hello/{suite.kem}/mlkem", 64), seed(f"hello/{suite.kem}/x25519") if suite.x25519 else None
    )
    return [
        (
            "CLIENT_HELLO",
            MsgType.CLIENT_HELLO,
            "device",
            {
                Field.DEVICE_KEY_ID: dev.key_id_bytes,
                Field.CLIENT_NONCE: seed("hello/nonce"),
                Field.KEM_PUBLIC: hello_kem.public_bytes(),
                Field.TIMESTAMP: u64(T0),
            },
        ),
        (
            "ENROLL_REQUEST",
            MsgType.ENROLL_REQUEST,
            "device",
            {
                Field.DEVICE_ID: dev.key_id.encode("ascii"),
                Field.SIGNING_PUBLIC: dev.public.raw,
                Field.ENROLL_TOKEN: TOKEN.encode("utf-8"),
                Field.CLIENT_NONCE: seed("enroll/nonce"),
                Field.TIMESTAMP: u64(T0),
            },
        ),
        (
            "ENROLL_RECORD",
            MsgType.ENROLL_RECORD,
            "server",
            {
                Field.DEVICE_ID: dev.key_id.encode("ascii"),
                Field.DEVICE_KEY_ID: dev.key_id_bytes,
                Field.SIGNING_PUBLIC: dev.public.raw,
                Field.SERVER_KEY_ID: srv.key_id_bytes,
                Field.TIMESTAMP: u64(T0 + 1),
            },
        ),
        (
            "GLOBAL_MODEL",
            MsgType.GLOBAL_MODEL,
            "server",
            {
                Field.MODEL_VERSION: u64(3),
                Field.MODEL_HASH: sha256(b"model v3"),
                Field.PAYLOAD_SIZE: u64(len(b"model v3")),
                Field.TIMESTAMP: u64(T0 + 30),
            },
        ),
        ("UPDATE", MsgType.UPDATE, "device", upd),
        ("UPDATE with METADATA", MsgType.UPDATE, "device", _update_fields(dev, True)),
        ("UPDATE_ACK accepted", MsgType.UPDATE_ACK, "server", ack),
        ("UPDATE_ACK duplicate", MsgType.UPDATE_ACK, "server", {**ack, Field.STATUS: b"\x01"}),
    ]


def envelopes() -> list[dict[str, Any]]:
    rows = []
    for suite in (DEFAULT_SUITE, LOW_SUITE):
        for name, mt, signer_role, fields in message_cases(suite):
            signer = key(signer_role, suite.sig)
            env = SignedEnvelope.sign(suite, mt, fields, signer)
            rows.append(
                {
                    "name": name,
                    "suite": h(suite.to_bytes()),
                    "msg_type": mt.name,
                    "context": h(b"qflare/v1/" + mt.name.lower().replace("_", "-").encode()),
                    "signer": signer_role,
                    "signer_alg": suite.sig,
                    "signer_seed": h(signer.unsafe_seed_bytes()),
                    "fields": {f.name: h(v) for f, v in fields.items()},
                    "body": h(env.body),
                    "envelope": h(env.to_bytes()),  # recorded: hedged signature
                }
            )
    return rows


# -------------------------------------------------------------------------------------- handshake
def non_hybrid_handshake() -> dict[str, Any]:
    suite = LOW_SUITE
    dev, srv = key("device", suite.sig), key("server", suite.sig)
    ms = seed(f"hs/{suite.kem}/mlkem", 64)
    kem = EphemeralKem.unsafe_from_seeds(suite, ms, None)
    ch_env = SignedEnvelope.sign(
        suite,
        MsgType.CLIENT_HELLO,
        {
            Field.DEVICE_KEY_ID: dev.key_id_bytes,
            Field.CLIENT_NONCE: seed("hs/nonce"),
            Field.KEM_PUBLIC: kem.public_bytes(),
            Field.TIMESTAMP: u64(T0),
        },
        dev,
    )
    ch = ch_env.to_bytes()
    server = ServerHandshake(
        srv, {dev.key_id: dev.public}.get, policy=LOW_POLICY, lifetime_s=900, clock=lambda: float(T0)
    )
    sh = server.respond(ch)
    sh_env = SignedEnvelope.open(sh, srv.public, expected_type=MsgType.SERVER_HELLO)
    th = sha256(ch, sh)
    keys = derive_session_keys(kem.decapsulate(sh_env.get(Field.KEM_CIPHERTEXT)), th, Role.CLIENT)
    cf = SignedEnvelope.sign(
        suite, MsgType.CLIENT_FINISH, {Field.DEVICE_KEY_ID: dev.key_id_bytes, Field.TRANSCRIPT_HASH: th}, dev
    ).to_bytes()
    channel = server.finish(cf)
    assert channel.session_id == keys.session_id
    return {
        "suite": h(suite.to_bytes()),
        "policy": {"min_sig_level": 2, "min_kem_level": 3, "require_hybrid": False},
        "device_seed": h(dev.unsafe_seed_bytes()),
        "server_seed": h(srv.unsafe_seed_bytes()),
        "mlkem_seed": h(ms),
        "client_nonce": h(seed("hs/nonce")),
        "server_time": T0,
        "client_hello_body": h(ch_env.body),
        "client_hello": h(ch),  # recorded: hedged signature
        "server_hello": h(sh),
        "client_finish": h(cf),
        "finish_body": h(sha256(sh) + cf),
        "session_id_text": keys.session_id.hex(),
        "transcript_hash": h(th),
        "c2s": h(keys.c2s),
        "s2c": h(keys.s2c),
        "session_id": h(keys.session_id),
        "lifetime_s": 900,
    }


# ---------------------------------------------------------------------------------------- frames
SID, C2S, S2C = seed("session/id"), seed("session/c2s"), seed("session/s2c")


def _signed(name: str) -> bytes:
    suite = DEFAULT_SUITE
    for n, mt, role, fields in message_cases(suite):
        if n == name:
            return SignedEnvelope.sign(suite, mt, fields, key(role, suite.sig)).to_bytes()
    raise KeyError(name)


PROOF_LEAF = {"update_hash": sha256(b"update").hex(), "examples": 7}


def proof_answer() -> bytes:
    """The PROOF answer for the vector device (key("device")) about round 4: a closed round entry, signed
    by key("server"), listing its update and one other, and a third device left out."""
    srv, dev = key("server"), key("device")
    others = [sha256(b"other device").hex(), sha256(b"late device").hex()]
    record = RoundRecord(
        round_number=4,
        outcome="closed",
        reason=None,
        parent_model=sha256(b"model v3").hex(),
        model=sha256(b"model v4").hex(),
        model_version=4,
        updates=(
            RoundUpdate(dev.key_id, PROOF_LEAF["update_hash"], PROOF_LEAF["examples"]),  # type: ignore[arg-type]
            RoundUpdate(others[0], sha256(b"other update").hex(), 9),
        ),
        left_out=(LeftOut(others[1], None, "no_update"),),
        quorum=3,
        min_participants=2,
        opened=1_700_000_000,
        closed=1_700_000_060,
        pipeline={"combine": "WeightedMean()"},
    )
    entry = LedgerEntry.create(
        "round", seq=4, prev_hash=GENESIS_PREV.replace("0", "1"), round_number=4, time=1_700_000_060,
        fields=record.fields(), keys=[srv],
    )  # fmt: skip
    return answer_for(entry, dev.key_id)


SECAGG_STEPS: list[tuple[str, Frame, list[bytes]]] = [
    ("device", Frame.SECAGG_CONFIG_REQUEST, []),
    ("coordinator", Frame.SECAGG_CONFIG, [b'{"round":4}']),
    ("device", Frame.SECAGG_RELAY_REQUEST, [b"\x01"]),
    ("coordinator", Frame.SECAGG_RELAY, [b"advert 1", b"advert 2"]),
    ("device", Frame.SECAGG_ADVERTISE, [b"ADVERTISE"]),
    ("device", Frame.SECAGG_SHARES, [b"MANIFEST", b"SHARE 1", b"SHARE 2"]),
    ("device", Frame.SECAGG_MASKED, [b"MASKED_INPUT", b"\x00" * 8]),
    ("device", Frame.SECAGG_UNMASK, [b"UNMASK_RESPONSE"]),
    ("coordinator", Frame.SECAGG_ACK, []),
    ("coordinator", Frame.SECAGG_RELAY, [b"UNMASK_REQUEST"]),
    ("device", Frame.SECAGG_CONSISTENCY, [b"CONSISTENCY"]),
    ("coordinator", Frame.SECAGG_RELAY, [b"UNMASK_REQUEST", b"CONSISTENCY 1", b"CONSISTENCY 2"]),
]
"""Secure-aggregation frames of round 4: part lists (placeholders for the phase messages, whose own
vectors are tests/test_secagg_messages.py's), sealed after the frames above."""


def frames() -> dict[str, Any]:
    device = Channel(SID, C2S, S2C)  # device sends with c2s
    coord = Channel(SID, S2C, C2S)
    task = encode_json(canonical_json()[1]["value"])
    receipt = encode_json(canonical_json()[2]["value"])
    model_env, update_env, ack = (
        _signed("GLOBAL_MODEL"),
        _signed("UPDATE with METADATA"),
        _signed("UPDATE_ACK accepted"),
    )
    update = SignedUpdate(4, pack_signed(update_env, b"update"), sha256(b"update").hex())
    answer = proof_answer()
    # (sender, frame type, round, plaintext, the recipe that seals it)
    steps: list[tuple[str, Frame, int, bytes, Callable[[Channel], bytes]]] = [
        ("device", Frame.TASK_REQUEST, 0, b"", seal_task_request),
        ("coordinator", Frame.TASK, 0, task, lambda ch: seal_task(ch, task)),
        ("device", Frame.MODEL_REQUEST, 0, encode_json({"version": 3}), lambda ch: seal_model_request(ch, 3)),
        (
            "coordinator",
            Frame.MODEL,
            3,
            pack_signed(model_env, b"model v3"),
            lambda ch: seal_model(ch, 3, model_env, b"model v3"),
        ),
        ("device", Frame.UPDATE, 4, update.payload, lambda ch: seal_update(ch, update)),
        ("coordinator", Frame.RECEIPT, 4, pack_signed(ack, receipt), lambda ch: seal_receipt(ch, 4, ack, receipt)),
        ("device", Frame.PROOF_REQUEST, 0, encode_json({"round": 4}), lambda ch: seal_proof_request(ch, 4)),
        ("coordinator", Frame.PROOF, 4, answer, lambda ch: seal_proof(ch, 4, answer)),
    ]
    for sender, ft, parts in SECAGG_STEPS:
        steps.append((sender, ft, 4, pack_parts(parts), lambda ch, ft=ft, parts=parts: seal_parts(ch, ft, 4, parts)))
    rows = []
    for sender, ft, rnd, pt, seal in steps:
        ch = device if sender == "device" else coord
        counter = ch.send_counter
        frame = seal(ch)
        assert frame[1] == ft and frame[2:10] == u64(rnd)  # the recipe uses this frame type and round
        rows.append(
            {
                "name": ft.name,
                "sender": sender,
                "key": "c2s" if sender == "device" else "s2c",
                "frame_type": int(ft),
                "round": rnd,
                "counter": counter,
                "plaintext": h(pt),  # recorded where it holds a signed envelope
                "frame": h(frame),
            }
        )
    return {
        "session_id": h(SID),
        "c2s": h(C2S),
        "s2c": h(S2C),
        "frames": rows,
        "proof_leaf": {"device_key_id": key("device").key_id, **PROOF_LEAF},
    }


def signed_payload() -> dict[str, Any]:
    env = _signed("UPDATE")
    return {
        "envelope": h(env),
        "payload": h(b"update"),
        "packed": h(pack_signed(env, b"update")),
        "length_prefix": h(struct.pack(">I", len(env))),
    }


# ------------------------------------------------------------------------------------- negatives
def _run(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except QflareError as exc:
        return type(exc).__name__, exc.code
    raise AssertionError("negative vector was accepted")


def _body(suite: Suite, mt: MsgType, tlvs: list[tuple[int, bytes]]) -> bytes:
    out = b"QFL\x01" + suite.to_bytes() + bytes([mt])
    for tag, value in tlvs:
        out += struct.pack(">BI", tag, len(value)) + value
    return out


def apply(vec: dict[str, Any]) -> None:
    """Feed one negative vector to the reference code (raises its QflareError)."""
    p = vec.get("params", {})
    data = bytes.fromhex(vec["input"]) + bytes(p.get("append_zero_bytes", 0))
    fed = vec["fed_to"]
    if fed == "Suite.from_bytes":
        Suite.from_bytes(data)
    elif fed == "SignedEnvelope.parse":
        SignedEnvelope.parse(data, expected_type=MsgType[p["expected_type"]])
    elif fed == "SignedEnvelope.open":
        vk = SigningKey.from_seed(p["key_alg"], bytes.fromhex(p["key_seed"])).public
        SignedEnvelope.open(data, vk, expected_type=MsgType[p["expected_type"]])
    elif fed == "unpack_signed":
        unpack_signed(data)
    elif fed == "ServerHandshake.respond":
        device = SigningKey.from_seed(p["key_alg"], bytes.fromhex(p["key_seed"])).public
        server = SigningKey.from_seed(p["key_alg"], bytes.fromhex(p["server_seed"]))
        ServerHandshake(server, {device.key_id: device}.get, clock=lambda: float(p["server_time"])).respond(data)
    else:
        ch = Channel(
            bytes.fromhex(p["session_id"]),
            bytes.fromhex(p["send_key"]),
            bytes.fromhex(p["recv_key"]),
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
            vk = SigningKey.from_seed(p["key_alg"], bytes.fromhex(p["key_seed"])).public
            if fed == "open_update":
                open_update(ch, vk, data, p["round"], base_model_hash=p.get("base_model_hash"))
            elif fed == "open_global_model":
                open_global_model(ch, vk, data, p["version"], p["expected_hash"])
            elif fed == "open_receipt":
                open_receipt(ch, vk, data, p["device_key_id"], SignedUpdate(p["round"], b"", p["update_hash"]))
            else:  # pragma: no cover
                raise KeyError(fed)


def negatives() -> list[dict[str, Any]]:
    suite = DEFAULT_SUITE
    dev, srv = key("device"), key("server")
    high_dev = key("device", HIGH_SUITE.sig)
    upd_fields = _update_fields(dev, False)
    upd = SignedEnvelope.sign(suite, MsgType.UPDATE, upd_fields, dev).to_bytes()
    model = _signed("GLOBAL_MODEL")
    dev_key = {"key_alg": dev.alg, "key_seed": h(dev.unsafe_seed_bytes())}
    parse_upd = {"expected_type": "UPDATE"}
    open_upd = {"expected_type": "UPDATE", **dev_key}
    sig_start = len(upd) - suite.sig_alg.signature_len
    flip_sig = bytearray(upd)
    flip_sig[sig_start + 100] ^= 0x01
    tlv = upd_fields
    ordered = [(int(f), tlv[f]) for f in (Field.DEVICE_KEY_ID, Field.ROUND, Field.BASE_MODEL_HASH)]
    rest = [(int(f), tlv[f]) for f in (Field.UPDATE_HASH, Field.NUM_EXAMPLES, Field.PAYLOAD_SIZE)]
    unknown = bytearray(upd)
    unknown[HEADER_LEN] = 0x7F  # the first tag
    sid, recv_key, send_key = SID, C2S, S2C  # the coordinator's view: receives with c2s
    chan = {"session_id": h(sid), "send_key": h(send_key), "recv_key": h(recv_key)}
    good = unsafe_seal_frame(recv_key, sid, Frame.UPDATE, 4, 0, b"sealed update")
    bad_tag = bytearray(good)
    bad_tag[-1] ^= 0x01
    round_rewritten = bytearray(good)
    round_rewritten[2:10] = u64(5)
    uft, mft, rft = int(Frame.UPDATE), int(Frame.MODEL), int(Frame.RECEIPT)

    def upd_frame(fields: dict[Field, bytes], payload: bytes, *, signer: SigningKey = dev, s: Suite = suite) -> str:
        env = SignedEnvelope.sign(s, MsgType.UPDATE, fields, signer).to_bytes()
        return h(unsafe_seal_frame(recv_key, sid, uft, 4, 0, pack_signed(env, payload)))

    upd_params = {**chan, "frame_type": uft, "round": 4, **dev_key}
    high_fields = {**upd_fields, Field.DEVICE_KEY_ID: high_dev.key_id_bytes}
    dev_recv = {"session_id": h(sid), "send_key": h(recv_key), "recv_key": h(send_key)}  # the device's view
    srv_key = {"key_alg": srv.alg, "key_seed": h(srv.unsafe_seed_bytes())}

    def model_frame(env: bytes, blob: bytes, version: int = 3) -> str:
        return h(unsafe_seal_frame(send_key, sid, mft, version, 0, pack_signed(env, blob)))

    model_hash = sha256(b"model v3").hex()
    model_params = {**dev_recv, "frame_type": mft, "version": 3, "expected_hash": model_hash, **srv_key}
    high_srv = key("server", HIGH_SUITE.sig)
    high_model = SignedEnvelope.sign(
        HIGH_SUITE, MsgType.GLOBAL_MODEL, SignedEnvelope.parse(model).fields, high_srv
    ).to_bytes()
    ack_fields = next(f for n, _, _, f in message_cases(suite) if n == "UPDATE_ACK accepted")

    def receipt_frame(fields: dict[Field, bytes], *, signer: SigningKey = srv) -> str:
        ack = SignedEnvelope.sign(suite, MsgType.UPDATE_ACK, fields, signer).to_bytes()
        body = encode_json(canonical_json()[2]["value"])
        return h(unsafe_seal_frame(send_key, sid, rft, 4, 0, pack_signed(ack, body)))

    receipt_params = {
        **dev_recv,
        "frame_type": rft,
        "round": 4,
        "device_key_id": dev.key_id,
        "update_hash": sha256(b"update").hex(),
        **srv_key,
    }

    def request_frame(ft: Frame, body: bytes) -> str:
        return h(unsafe_seal_frame(recv_key, sid, int(ft), 0, 0, body))

    hello_fields = next(f for n, _, _, f in message_cases(suite) if n == "CLIENT_HELLO")

    def hello(ts: int, signer: SigningKey = dev) -> bytes:
        return SignedEnvelope.sign(
            suite, MsgType.CLIENT_HELLO, {**hello_fields, Field.TIMESTAMP: u64(ts)}, signer
        ).to_bytes()

    hello_params = {**dev_key, "server_seed": h(srv.unsafe_seed_bytes()), "server_time": T0}
    hello_flip = bytearray(hello(T0))
    hello_flip[-100] ^= 0x01

    rows: list[tuple[str, str, bytes | str, dict[str, Any]]] = [
        ("CLIENT_HELLO with a flipped signature byte", "ServerHandshake.respond", bytes(hello_flip), hello_params),
        (
            "CLIENT_HELLO naming the device, signed by another key",
            "ServerHandshake.respond",
            hello(T0, srv),
            hello_params,
        ),
        ("CLIENT_HELLO 121 s old", "ServerHandshake.respond", hello(T0 - 121), hello_params),
        ("CLIENT_HELLO 121 s in the future", "ServerHandshake.respond", hello(T0 + 121), hello_params),
        ("unknown suite byte (KEM id 0x03)", "Suite.from_bytes", bytes.fromhex("0102030101"), {}),
        ("X25519 flag neither 0 nor 1", "Suite.from_bytes", bytes.fromhex("0102010201"), {}),
        ("flipped signature byte", "SignedEnvelope.open", bytes(flip_sig), open_upd),
        ("signature of another key", "SignedEnvelope.open", upd, {**open_upd, **srv_key}),
        ("wrong envelope type (GLOBAL_MODEL where UPDATE expected)", "SignedEnvelope.parse", model, parse_upd),
        ("unknown message type 0x23", "SignedEnvelope.parse", upd[:9] + b"\x23" + upd[10:], parse_upd),
        ("bad magic", "SignedEnvelope.parse", b"QFX" + upd[3:], parse_upd),
        ("input shorter than the magic", "SignedEnvelope.parse", b"QF", parse_upd),
        ("unknown wire version 0x02", "SignedEnvelope.parse", upd[:3] + b"\x02" + upd[4:], parse_upd),
        ("trailing byte after the signature", "SignedEnvelope.parse", upd + b"\x00", parse_upd),
        ("truncated inside a field value", "SignedEnvelope.parse", upd[: HEADER_LEN + 5 + 10], parse_upd),
        ("truncated inside a TLV header", "SignedEnvelope.parse", upd[: HEADER_LEN + 3], parse_upd),
        ("truncated before the signature length", "SignedEnvelope.parse", upd[: sig_start - 4], parse_upd),
        ("truncated signature", "SignedEnvelope.parse", upd[:-1], parse_upd),
        ("unknown tag 0x7f", "SignedEnvelope.parse", bytes(unknown), parse_upd),
        (
            "tag of another message type (MODEL_VERSION in UPDATE)",
            "SignedEnvelope.parse",
            _body(suite, MsgType.UPDATE, [(int(Field.MODEL_VERSION), u64(1))]),
            parse_upd,
        ),
        (
            "duplicate tag (DEVICE_KEY_ID twice)",
            "SignedEnvelope.parse",
            _body(suite, MsgType.UPDATE, [ordered[0], ordered[0]]),
            parse_upd,
        ),
        (
            "out-of-order tags (BASE_MODEL_HASH before ROUND)",
            "SignedEnvelope.parse",
            _body(suite, MsgType.UPDATE, [ordered[0], ordered[2], ordered[1]]),
            parse_upd,
        ),
        (
            "missing required field (ROUND)",
            "SignedEnvelope.parse",
            _body(suite, MsgType.UPDATE, [ordered[0], ordered[2], *rest]) + u32(3309) + bytes(3309),
            parse_upd,
        ),
        (
            "wrong field length (ROUND of 4 bytes)",
            "SignedEnvelope.parse",
            _body(suite, MsgType.UPDATE, [ordered[0], (int(Field.ROUND), u32(4))]),
            parse_upd,
        ),
        (
            "wrong length declared by a truncated field (length checked first)",
            "SignedEnvelope.parse",
            _body(suite, MsgType.UPDATE, [ordered[0]]) + b"\x0a\x00\x00\x00\x04",
            parse_upd,
        ),
        (
            "signature length not the suite's",
            "SignedEnvelope.parse",
            upd[: sig_start - 4] + u32(3308) + upd[sig_start:-1],
            parse_upd,
        ),
        (
            "envelope over 64 KiB (input followed by append_zero_bytes zero bytes)",
            "SignedEnvelope.parse",
            upd,
            {**parse_upd, "append_zero_bytes": 65536 - len(upd) + 1},
        ),
        ("bad AEAD tag", "Channel.open", bytes(bad_tag), {**chan, "frame_type": int(Frame.UPDATE), "round": 4}),
        (
            "replayed counter",
            "Channel.open",
            good,
            {**chan, "frame_type": int(Frame.UPDATE), "round": 4, "last_accepted_counter": 0},
        ),
        (
            "replayed counter with a bad tag (replay is checked first)",
            "Channel.open",
            bytes(bad_tag),
            {**chan, "frame_type": int(Frame.UPDATE), "round": 4, "last_accepted_counter": 0},
        ),
        ("wrong round in the header", "Channel.open", good, {**chan, "frame_type": int(Frame.UPDATE), "round": 5}),
        (
            "wrong round in the AAD (header rewritten to the expected round)",
            "Channel.open",
            bytes(round_rewritten),
            {**chan, "frame_type": int(Frame.UPDATE), "round": 5},
        ),
        ("wrong frame type", "Channel.open", good, {**chan, "frame_type": int(Frame.MODEL), "round": 4}),
        (
            "wrong frame type and bad tag (header checks come first)",
            "Channel.open",
            bytes(bad_tag),
            {**chan, "frame_type": int(Frame.MODEL), "round": 4},
        ),
        (
            "envelope type byte used as the frame type (0x21 where UPDATE 0x34 expected)",
            "Channel.open",
            unsafe_seal_frame(recv_key, sid, int(MsgType.UPDATE), 4, 0, b"x"),
            {**chan, "frame_type": int(Frame.UPDATE), "round": 4},
        ),
        (
            "frame version 0x02",
            "Channel.open",
            b"\x02" + good[1:],
            {**chan, "frame_type": int(Frame.UPDATE), "round": 4},
        ),
        (
            "frame shorter than header + tag",
            "Channel.open",
            good[:33],
            {**chan, "frame_type": int(Frame.UPDATE), "round": 4},
        ),
        ("signed payload shorter than its length prefix", "unpack_signed", b"\x00\x00\x01", {}),
        ("length prefix too large (65537 > 64 KiB)", "unpack_signed", u32(65537) + upd, {}),
        ("length prefix past the end", "unpack_signed", u32(len(upd) + 1) + upd, {}),
        (
            "payload size mismatch",
            "open_update",
            upd_frame({**upd_fields, Field.PAYLOAD_SIZE: u64(7)}, b"update"),
            upd_params,
        ),
        (
            "payload size and hash mismatch (size is checked first)",
            "open_update",
            upd_frame({**upd_fields, Field.PAYLOAD_SIZE: u64(7)}, b"UPDATE"),
            upd_params,
        ),
        ("payload hash mismatch", "open_update", upd_frame(upd_fields, b"UPDATE"), upd_params),
        (
            "suite mismatch (HIGH_SUITE envelope in a DEFAULT_SUITE session)",
            "open_update",
            upd_frame(high_fields, b"update", signer=high_dev, s=HIGH_SUITE),
            upd_params,
        ),
        (
            "signed round differs from the frame round",
            "open_update",
            upd_frame({**upd_fields, Field.ROUND: u64(5)}, b"update"),
            upd_params,
        ),
        (
            "update names another device",
            "open_update",
            upd_frame({**upd_fields, Field.DEVICE_KEY_ID: srv.key_id_bytes}, b"update"),
            upd_params,
        ),
        (
            "update names and is signed by another device (device key id is checked before the signature)",
            "open_update",
            upd_frame({**upd_fields, Field.DEVICE_KEY_ID: srv.key_id_bytes}, b"update", signer=srv),
            upd_params,
        ),
        (
            "bad signature and payload size mismatch (signature is checked first)",
            "open_update",
            h(unsafe_seal_frame(recv_key, sid, uft, 4, 0, pack_signed(bytes(flip_sig), b"update!"))),
            upd_params,
        ),
        (
            "update trained on another base model (base_model_hash given)",
            "open_update",
            upd_frame(upd_fields, b"update"),
            {**upd_params, "base_model_hash": sha256(b"model v2").hex()},
        ),
        (
            "payload size mismatch (global model)",
            "open_global_model",
            model_frame(model, b"model v3!"),
            model_params,
        ),
        (
            "payload hash mismatch (global model)",
            "open_global_model",
            model_frame(model, b"model V3"),
            model_params,
        ),
        (
            "signed model version differs from the requested version (= frame round)",
            "open_global_model",
            model_frame(model, b"model v3", 4),
            {**model_params, "version": 4},
        ),
        (
            "signed model hash differs from the task's model hash",
            "open_global_model",
            model_frame(model, b"model v3"),
            {**model_params, "expected_hash": sha256(b"model v2").hex()},
        ),
        (
            "suite mismatch, global model (suite is checked before the signature)",
            "open_global_model",
            model_frame(high_model, b"model v3"),
            model_params,
        ),
        (
            "UPDATE envelope where GLOBAL_MODEL expected",
            "open_global_model",
            model_frame(upd, b"update"),
            model_params,
        ),
        (
            "receipt names another device",
            "open_receipt",
            receipt_frame({**ack_fields, Field.DEVICE_KEY_ID: srv.key_id_bytes}),
            receipt_params,
        ),
        (
            "receipt for another round",
            "open_receipt",
            receipt_frame({**ack_fields, Field.ROUND: u64(3)}),
            receipt_params,
        ),
        (
            "receipt for another update hash",
            "open_receipt",
            receipt_frame({**ack_fields, Field.UPDATE_HASH: sha256(b"other update")}),
            receipt_params,
        ),
        (
            "receipt with an unknown ack status 0x02",
            "open_receipt",
            receipt_frame({**ack_fields, Field.STATUS: b"\x02"}),
            receipt_params,
        ),
        (
            "receipt signed by the device key, not the coordinator's",
            "open_receipt",
            receipt_frame(ack_fields, signer=dev),
            receipt_params,
        ),
        ("TASK_REQUEST with a body", "open_task_request", request_frame(Frame.TASK_REQUEST, b"{}"), chan),
        (
            "MODEL_REQUEST with an extra key",
            "open_model_request",
            request_frame(Frame.MODEL_REQUEST, encode_json({"version": 3, "x": 1})),
            chan,
        ),
        (
            "MODEL_REQUEST with a negative version",
            "open_model_request",
            request_frame(Frame.MODEL_REQUEST, encode_json({"version": -1})),
            chan,
        ),
        (
            "MODEL_REQUEST with a boolean version",
            "open_model_request",
            request_frame(Frame.MODEL_REQUEST, b'{"version":true}'),
            chan,
        ),
        ("PROOF_REQUEST for round 0", "open_proof_request", request_frame(Frame.PROOF_REQUEST, b'{"round":0}'), chan),
        (
            "PROOF_REQUEST with a string round",
            "open_proof_request",
            request_frame(Frame.PROOF_REQUEST, b'{"round":"4"}'),
            chan,
        ),
    ]
    out = []
    for desc, fed, data, params in rows:
        vec: dict[str, Any] = {
            "description": desc,
            "fed_to": fed,
            "input": data if isinstance(data, str) else h(data),
            "params": params,
        }
        cls, code = _run(lambda v=vec: apply(v))
        vec["error_class"], vec["error_code"] = cls, code
        out.append(vec)
    return out


def build() -> dict[str, Any]:
    return {
        "format": "qflare-protocol-vectors",
        "version": 1,
        "notes": __doc__.strip().splitlines()[0] if __doc__ else "",
        "seeds": "seed(label) = first bytes of SHA-256('qflare-protocol-vector/<label>/0') || ..._/1 ...",
        "suites": {
            "DEFAULT": h(DEFAULT_SUITE.to_bytes()),
            "HIGH": h(HIGH_SUITE.to_bytes()),
            "LOW": h(LOW_SUITE.to_bytes()),
        },
        "canonical_json": canonical_json(),
        "key_files": key_files(),
        "identity_document": identity_document(),
        "enroll_token": tokens(),
        "envelopes": envelopes(),
        "non_hybrid_handshake": non_hybrid_handshake(),
        "channel": frames(),
        "signed_payload": signed_payload(),
        "negative": negatives(),
    }


# Values that are random at generation time, and values derived from them.
RECORDED = {
    "envelope",
    "client_hello",
    "encrypted_pkcs8_pem",
    "server_hello",
    "client_finish",
    "finish_body",
    "session_id_text",
    "transcript_hash",
    "c2s",
    "s2c",
    "session_id",
    "plaintext",
    "frame",
    "packed",
    "length_prefix",
    "input",
}


def _strip(obj: Any, path: str = "") -> Any:
    if isinstance(obj, dict):
        skip = not path.endswith("/channel")
        return {k: _strip(v, path + "/" + k) for k, v in obj.items() if not (skip and k in RECORDED)}
    if isinstance(obj, list):
        return [_strip(v, path) for v in obj]
    return obj


def main(argv: list[str]) -> int:
    fresh = build()
    if "--check" in argv:
        stored = json.loads(OUT.read_text())
        if _strip(stored) != _strip(fresh):
            print("protocol_v1.json differs from the current implementation", file=sys.stderr)
            return 1
        print("deterministic parts match")
        return 0
    OUT.write_text(json.dumps(fresh, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
