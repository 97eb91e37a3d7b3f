"""Generate tests/vectors/crypto_v1.json: QFLARE crypto v1 test vectors.

    .venv/bin/python tests/vectors/make_crypto_vectors.py            # (re)write the file
    .venv/bin/python tests/vectors/make_crypto_vectors.py --check    # recompute and compare

Deterministic values (keys from seeds, key ids, KEM public keys, decapsulated secrets, HKDF outputs,
channel frames, envelope bodies) are exact.  ML-DSA signing is hedged and ML-KEM encapsulation draws
its own randomness, so signatures, KEM ciphertexts and the handshake messages (the signed CLIENT_HELLO
included; its body is exact) are *recorded*: the tests check that they verify / decapsulate to the
recorded values.  ``hello_refusals`` are CLIENT_HELLOs a coordinator must refuse (a bad signature, a
timestamp outside ±120 s of its clock) with the recorded reason code.  ``--check`` compares only the deterministic
parts and verifies the recorded ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qflare.crypto.channel import Channel, unsafe_seal_frame  # noqa: E402
from qflare.crypto.envelope import Field, MsgType, SignedEnvelope, encode_fields, u32, u64  # noqa: E402
from qflare.crypto.handshake import ServerHandshake  # noqa: E402
from qflare.crypto.identity import SigningKey  # noqa: E402
from qflare.crypto.kem import EphemeralKem, Role, SharedSecrets, derive_session_keys  # noqa: E402
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Suite, sha256  # noqa: E402
from qflare.errors import QflareError  # noqa: E402

OUT = Path(__file__).with_name("crypto_v1.json")
MESSAGE = b"qflare test vector message"
CONTEXT = b"qflare/v1/test-vector"
HELLO_TIME = 1_700_000_000  # the CLIENT_HELLO timestamp; the coordinator's clock in the handshake vectors


def seed(label: str, n: int = 32) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += sha256(f"qflare-vector/{label}/{i}".encode())
        i += 1
    return out[:n]


def h(b: bytes) -> str:
    return b.hex()


def identities() -> list[dict[str, Any]]:
    rows = []
    for alg in ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87"):
        s = seed(f"identity/{alg}")
        key = SigningKey.from_seed(alg, s)
        sig = key.sign(MESSAGE, CONTEXT)
        rows.append(
            {
                "alg": alg,
                "seed": h(s),
                "public": h(key.public.raw),
                "key_id": key.key_id,
                "message": h(MESSAGE),
                "context": h(CONTEXT),
                "signature": h(sig),
            }
        )
    return rows


def kems() -> list[dict[str, Any]]:
    from qflare.crypto.kem import encapsulate

    rows = []
    for suite in (DEFAULT_SUITE, HIGH_SUITE):
        ms, xs = seed(f"kem/{suite.kem}/mlkem", 64), seed(f"kem/{suite.kem}/x25519")
        kem = EphemeralKem.unsafe_from_seeds(suite, ms, xs)
        ct, secrets = encapsulate(suite, kem.public_bytes())
        assert kem.decapsulate(ct) == secrets
        rows.append(
            {
                "suite": h(suite.to_bytes()),
                "mlkem_seed": h(ms),
                "x25519_private": h(xs),
                "public": h(kem.public_bytes()),
                "ciphertext": h(ct),
                "shared_mlkem": h(secrets.mlkem),
                "shared_x25519": h(secrets.x25519 or b""),
            }
        )
    return rows


def key_schedules() -> list[dict[str, Any]]:
    rows = []
    for hybrid in (True, False):
        ss = SharedSecrets(seed("ks/mlkem"), seed("ks/x25519") if hybrid else None)
        th = seed(f"ks/transcript/{hybrid}")
        keys = derive_session_keys(ss, th, Role.CLIENT)
        rows.append(
            {
                "shared_mlkem": h(ss.mlkem),
                "shared_x25519": h(ss.x25519) if ss.x25519 else None,
                "transcript_hash": h(th),
                "c2s": h(keys.c2s),
                "s2c": h(keys.s2c),
                "session_id": h(keys.session_id),
            }
        )
    return rows


def channel() -> dict[str, Any]:
    """Plain Channel frames: the type bytes (0x21, 0x20) are arbitrary here, not the protocol's frame
    types (those are Frame 0x30..0x35, vectored in protocol_v1.json)."""
    sid, k1, k2 = seed("channel/sid"), seed("channel/c2s"), seed("channel/s2c")
    ch = Channel(sid, k1, k2)
    frames = []
    for mt, rnd, pt in (
        (MsgType.UPDATE, 0, b""),
        (MsgType.UPDATE, 7, b"hello, coordinator"),
        (MsgType.GLOBAL_MODEL, 2**40, bytes(range(64))),
    ):
        counter = ch.send_counter
        frames.append(
            {
                "msg_type": int(mt),
                "round": rnd,
                "counter": counter,
                "plaintext": h(pt),
                "frame": h(ch.seal(mt, rnd, pt)),
            }
        )
    far = unsafe_seal_frame(k1, sid, MsgType.UPDATE, 1, 2**63 - 1, b"last counter")
    frames.append(
        {
            "msg_type": int(MsgType.UPDATE),
            "round": 1,
            "counter": 2**63 - 1,
            "plaintext": h(b"last counter"),
            "frame": h(far),
        }
    )
    ch.rekey()
    send_after, recv_after = ch.unsafe_keys()
    counter = ch.send_counter
    after = ch.seal(MsgType.UPDATE, 3, b"after rekey")
    return {
        "session_id": h(sid),
        "send_key": h(k1),
        "recv_key": h(k2),
        "frames": frames,
        "rekey": {
            "send_key": h(send_after),
            "recv_key": h(recv_after),
            "frame": {
                "msg_type": int(MsgType.UPDATE),
                "round": 3,
                "counter": counter,
                "plaintext": h(b"after rekey"),
                "frame": h(after),
            },
        },
    }


def _update_fields(key: SigningKey) -> dict[Field, bytes]:
    return {
        Field.DEVICE_KEY_ID: bytes.fromhex(key.key_id),
        Field.ROUND: u64(12),
        Field.BASE_MODEL_HASH: sha256(b"base"),
        Field.UPDATE_HASH: sha256(b"update"),
        Field.NUM_EXAMPLES: u64(600),
        Field.PAYLOAD_SIZE: u64(6_653_480),
    }


def envelopes() -> list[dict[str, Any]]:
    rows = []
    for suite in (DEFAULT_SUITE, HIGH_SUITE):
        s = seed(f"envelope/{suite.sig}")
        key = SigningKey.from_seed(suite.sig, s)
        cases: list[tuple[MsgType, dict[Field, bytes]]] = [
            (MsgType.UPDATE, _update_fields(key)),
            (MsgType.UPDATE, {**_update_fields(key), Field.METADATA: b'{"loss":0.25,"steps":40}'}),
            (
                MsgType.GLOBAL_MODEL,
                {
                    Field.MODEL_VERSION: u64(12),
                    Field.MODEL_HASH: sha256(b"model"),
                    Field.PAYLOAD_SIZE: u64(1234),
                    Field.TIMESTAMP: u64(1_700_000_000),
                },
            ),
            (
                MsgType.ENROLL_REQUEST,
                {
                    Field.DEVICE_ID: b"device-0001",
                    Field.SIGNING_PUBLIC: key.public.raw,
                    Field.ENROLL_TOKEN: b"one-time-token",
                    Field.CLIENT_NONCE: seed("nonce"),
                    Field.TIMESTAMP: u64(1_700_000_000),
                },
            ),
            (
                MsgType.CLIENT_HELLO,
                {
                    Field.DEVICE_KEY_ID: bytes.fromhex(key.key_id),
                    Field.CLIENT_NONCE: seed("hello-nonce"),
                    Field.KEM_PUBLIC: EphemeralKem.unsafe_from_seeds(
                        suite, seed(f"envelope/{suite.kem}/mlkem", 64), seed(f"envelope/{suite.kem}/x25519")
                    ).public_bytes(),
                    Field.TIMESTAMP: u64(HELLO_TIME),
                },
            ),
            (
                MsgType.CLIENT_FINISH,
                {Field.DEVICE_KEY_ID: bytes.fromhex(key.key_id), Field.TRANSCRIPT_HASH: seed("th")},
            ),
        ]
        for mt, fields in cases:
            env = SignedEnvelope.sign(suite, mt, fields, key)
            rows.append(
                {
                    "suite": h(suite.to_bytes()),
                    "msg_type": mt.name,
                    "signer_alg": suite.sig,
                    "signer_seed": h(s),
                    "fields": {f.name: h(fields[f]) for f in fields},
                    "fields_encoding": h(encode_fields(mt, fields, suite)),
                    "body": h(env.body),
                    "envelope": h(env.to_bytes()),
                }
            )
    return rows


def handshake(suite: Suite) -> dict[str, Any]:
    dev_seed, srv_seed = seed(f"hs/{suite.sig}/device"), seed(f"hs/{suite.sig}/server")
    device, server = SigningKey.from_seed(suite.sig, dev_seed), SigningKey.from_seed(suite.sig, srv_seed)
    ms, xs = seed(f"hs/{suite.kem}/mlkem", 64), seed(f"hs/{suite.kem}/x25519")
    kem = EphemeralKem.unsafe_from_seeds(suite, ms, xs)
    ch_env = SignedEnvelope.sign(
        suite,
        MsgType.CLIENT_HELLO,
        {
            Field.DEVICE_KEY_ID: bytes.fromhex(device.key_id),
            Field.CLIENT_NONCE: seed("hs/nonce"),
            Field.KEM_PUBLIC: kem.public_bytes(),
            Field.TIMESTAMP: u64(HELLO_TIME),
        },
        device,
    )
    ch = ch_env.to_bytes()
    srv = ServerHandshake(server, {device.key_id: device.public}.get, lifetime_s=900, clock=lambda: HELLO_TIME)
    sh = srv.respond(ch)
    sh_env = SignedEnvelope.open(sh, server.public, expected_type=MsgType.SERVER_HELLO)
    th = sha256(ch, sh)
    keys = derive_session_keys(kem.decapsulate(sh_env.get(Field.KEM_CIPHERTEXT)), th, Role.CLIENT)
    cf = SignedEnvelope.sign(
        suite,
        MsgType.CLIENT_FINISH,
        {Field.DEVICE_KEY_ID: bytes.fromhex(device.key_id), Field.TRANSCRIPT_HASH: th},
        device,
    ).to_bytes()
    server_channel = srv.finish(cf)
    assert server_channel.session_id == keys.session_id
    return {
        "suite": h(suite.to_bytes()),
        "device_seed": h(dev_seed),
        "server_seed": h(srv_seed),
        "mlkem_seed": h(ms),
        "x25519_private": h(xs),
        "server_time": HELLO_TIME,
        "client_hello_body": h(ch_env.body),
        "client_hello": h(ch),
        "server_hello": h(sh),
        "client_finish": h(cf),
        "transcript_hash": h(th),
        "c2s": h(keys.c2s),
        "s2c": h(keys.s2c),
        "session_id": h(keys.session_id),
        "lifetime_s": u32(900).hex(),
    }


def hello_refusals(suite: Suite) -> list[dict[str, Any]]:
    """CLIENT_HELLOs a coordinator (clock at ``server_time``) must refuse before any expensive work."""
    dev_seed, srv_seed = seed(f"hs/{suite.sig}/device"), seed(f"hs/{suite.sig}/server")
    device = SigningKey.from_seed(suite.sig, dev_seed)
    kem = EphemeralKem.unsafe_from_seeds(suite, seed(f"hs/{suite.kem}/mlkem", 64), seed(f"hs/{suite.kem}/x25519"))

    def hello(ts: int, label: str) -> bytes:
        fields = {
            Field.DEVICE_KEY_ID: bytes.fromhex(device.key_id),
            Field.CLIENT_NONCE: seed(f"hs/refusal/{label}"),
            Field.KEM_PUBLIC: kem.public_bytes(),
            Field.TIMESTAMP: u64(ts),
        }
        return SignedEnvelope.sign(suite, MsgType.CLIENT_HELLO, fields, device).to_bytes()

    good = hello(HELLO_TIME, "bad-signature")
    bad_sig = good[:-1] + bytes([good[-1] ^ 0x01])
    rows = []
    for name, ch, code in (
        ("bad_signature", bad_sig, "bad_signature"),
        ("stale_past", hello(HELLO_TIME - 121, "stale-past"), "stale_request"),
        ("stale_future", hello(HELLO_TIME + 121, "stale-future"), "stale_request"),
    ):
        try:
            ServerHandshake(
                SigningKey.from_seed(suite.sig, srv_seed), {device.key_id: device.public}.get, clock=lambda: HELLO_TIME
            ).respond(ch)
        except QflareError as exc:
            assert exc.code == code, (name, exc.code)
        else:  # pragma: no cover
            raise AssertionError(f"{name} was accepted")
        env = SignedEnvelope.parse(ch)
        rows.append(
            {
                "name": name,
                "suite": h(suite.to_bytes()),
                "device_seed": h(dev_seed),
                "server_seed": h(srv_seed),
                "server_time": HELLO_TIME,
                "client_hello_body": h(env.body),
                "client_hello": h(ch),
                "code": code,
            }
        )
    return rows


def build() -> dict[str, Any]:
    return {
        "format": "qflare-crypto-vectors",
        "version": 1,
        "notes": __doc__.strip().splitlines()[0] if __doc__ else "",
        "sha256_abc": h(sha256(b"abc")),
        "suites": [
            {"name": s.name, "bytes": h(s.to_bytes())}
            for s in (DEFAULT_SUITE, HIGH_SUITE, Suite(sig="ML-DSA-44", kem="ML-KEM-768", x25519=False))
        ],
        "identities": identities(),
        "kem": kems(),
        "key_schedule": key_schedules(),
        "channel": channel(),
        "envelopes": envelopes(),
        "handshakes": [handshake(DEFAULT_SUITE), handshake(HIGH_SUITE)],
        "hello_refusals": hello_refusals(DEFAULT_SUITE) + hello_refusals(HIGH_SUITE),
    }


# Values that are random at generation time (hedged signatures, KEM ciphertexts, server nonce).
RECORDED = {
    "signature",
    "ciphertext",
    "shared_mlkem",
    "shared_x25519",
    "envelope",
    "client_hello",
    "server_hello",
    "client_finish",
    "transcript_hash",
    "c2s",
    "s2c",
    "session_id",
}


def _strip(obj: Any, path: str = "") -> Any:
    """Drop recorded (non-reproducible) values so two builds can be compared."""
    if isinstance(obj, dict):
        skip_ks = (
            path.endswith("kem")
            or path.endswith("handshakes")
            or path.endswith("identities")
            or path.endswith("envelopes")
            or path.endswith("hello_refusals")
        )
        return {k: _strip(v, path + "/" + k) for k, v in obj.items() if not (skip_ks and k in RECORDED)}
    if isinstance(obj, list):
        return [_strip(v, path) for v in obj]
    return obj


def main(argv: list[str]) -> int:
    fresh = build()
    if "--check" in argv:
        stored = json.loads(OUT.read_text())
        if _strip(stored) != _strip(fresh):
            print("crypto_v1.json differs from the current implementation", file=sys.stderr)
            return 1
        print("deterministic parts match")
        return 0
    OUT.write_text(json.dumps(fresh, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
