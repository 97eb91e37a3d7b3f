"""Mutually authenticated hybrid handshake: success, downgrade, impersonation, replay, state machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest

from qflare.crypto.envelope import HEADER_LEN, Field, MsgType, SignedEnvelope, u32
from qflare.crypto.handshake import ClientHandshake, ServerHandshake, handshake_in_process
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Policy, Suite
from qflare.errors import (
    AuthError,
    BadSignatureError,
    ConfigError,
    CoordinatorBusyError,
    PolicyError,
    ProtocolError,
    QflareError,
    ReplayError,
    RevokedError,
    SessionExpiredError,
    UnknownDeviceError,
)


def field_offset(raw: bytes, tag: Field) -> int:
    """Offset of the first value byte of ``tag`` in an envelope (walks the TLVs)."""
    pos = HEADER_LEN
    while True:
        t, n = raw[pos], int.from_bytes(raw[pos + 1 : pos + 5], "big")
        if t == tag:
            return pos + 5
        pos += 5 + n


LAX = Policy(min_sig_level=0, min_kem_level=0, require_hybrid=False)


class World:
    def __init__(self, suite: Suite = DEFAULT_SUITE) -> None:
        self.suite = suite
        self.device = SigningKey.generate(suite.sig)
        self.server = SigningKey.generate(suite.sig)
        self.directory: dict[str, VerifyKey] = {self.device.key_id: self.device.public}

    def client(self, **kw: object) -> ClientHandshake:
        kw.setdefault("suite", self.suite)
        return ClientHandshake(self.device, self.server.public, **kw)  # type: ignore[arg-type]

    def coordinator(self, resolver: Callable[[str], VerifyKey | None] | None = None, **kw: object) -> ServerHandshake:
        return ServerHandshake(self.server, resolver or self.directory.get, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("suite", [DEFAULT_SUITE, HIGH_SUITE], ids=lambda s: s.name)
def test_full_handshake(suite: Suite) -> None:
    w = World(suite)
    client, server = w.client(), w.coordinator()
    c, s = handshake_in_process(client, server)
    assert c.session_id == s.session_id
    assert c.unsafe_keys() == tuple(reversed(s.unsafe_keys()))
    assert s.open(MsgType.UPDATE, 1, c.seal(MsgType.UPDATE, 1, b"up")) == b"up"
    assert c.open(MsgType.GLOBAL_MODEL, 1, s.seal(MsgType.GLOBAL_MODEL, 1, b"down")) == b"down"
    assert server.device_key_id == w.device.key_id and server.suite == suite
    assert client.state == server.state == "done"
    assert c.suite == s.suite == suite


def test_fresh_ephemerals_and_sessions() -> None:
    w = World()
    hellos, sids = set(), set()
    for _ in range(3):
        client, server = w.client(), w.coordinator()
        hello = client.start()
        hellos.add(SignedEnvelope.parse(hello).get(Field.KEM_PUBLIC))
        finish, c = client.finish(server.respond(hello))
        server.finish(finish)
        sids.add(c.session_id)
    assert len(hellos) == len(sids) == 3


@pytest.mark.parametrize(
    "weak",
    [Suite(sig="ML-DSA-44"), Suite(x25519=False), Suite(sig="ML-DSA-44", x25519=False)],
    ids=lambda s: s.name,
)
def test_downgrade_refused_by_coordinator(weak: Suite) -> None:
    w = World(weak)
    client = w.client(policy=LAX)  # a client (or attacker) willing to propose a weak suite
    server = w.coordinator()  # DEFAULT_POLICY
    with pytest.raises(PolicyError) as exc:
        server.respond(client.start())
    assert exc.value.code == "policy_violation"
    assert server.state == "failed"


def test_coordinator_policy_can_demand_more() -> None:
    w = World()
    with pytest.raises(PolicyError):
        w.coordinator(policy=Policy(min_sig_level=5, min_kem_level=5)).respond(w.client().start())


def test_client_refuses_to_propose_weak_suite() -> None:
    w = World(Suite(x25519=False))
    with pytest.raises(PolicyError):
        w.client()


def test_suite_swapped_in_server_hello_refused() -> None:
    w = World()
    other = Suite(sig="ML-DSA-65", kem="ML-KEM-1024")
    a = w.client()  # offers DEFAULT_SUITE
    b = w.client(suite=other)
    a.start()
    reply_for_b = w.coordinator().respond(b.start())
    with pytest.raises(PolicyError) as exc:
        a.finish(reply_for_b)
    assert exc.value.code == "suite_mismatch"


def test_suite_unsupported_by_server_key() -> None:
    w = World(HIGH_SUITE)
    server = ServerHandshake(SigningKey.generate("ML-DSA-65"), w.directory.get)
    with pytest.raises(PolicyError) as exc:
        server.respond(w.client().start())
    assert exc.value.code == "suite_unsupported"


def test_impostor_coordinator_with_its_own_key() -> None:
    w = World()
    impostor = ServerHandshake(SigningKey.generate(), w.directory.get)
    client = w.client()
    with pytest.raises(AuthError) as exc:
        client.finish(impostor.respond(client.start()))
    assert exc.value.code == "server_key_mismatch"  # a pinning refusal, checked before any signature
    assert not isinstance(exc.value, BadSignatureError)
    assert client.state == "failed"


def test_impostor_claiming_the_pinned_key_id() -> None:
    w = World()
    rogue = SigningKey.generate()
    client = w.client()
    hello = client.start()
    genuine = SignedEnvelope.parse(w.coordinator().respond(hello))
    forged = SignedEnvelope.sign(DEFAULT_SUITE, MsgType.SERVER_HELLO, dict(genuine.fields), rogue)
    with pytest.raises(BadSignatureError) as exc:
        client.finish(forged.to_bytes())
    assert exc.value.code == "bad_signature"


def test_unknown_device() -> None:
    w = World()
    with pytest.raises(UnknownDeviceError) as exc:
        w.coordinator(resolver=lambda _k: None).respond(w.client().start())
    assert exc.value.code == "unknown_device" and isinstance(exc.value, AuthError)


def test_revoked_device_from_callback() -> None:
    w = World()

    def resolver(key_id: str) -> VerifyKey | None:
        raise RevokedError(f"device {key_id[:8]} revoked")

    with pytest.raises(RevokedError) as exc:
        w.coordinator(resolver=resolver).respond(w.client().start())
    assert exc.value.code == "revoked"


def test_resolver_returning_wrong_key() -> None:
    w = World()
    other = SigningKey.generate().public
    with pytest.raises(AuthError) as exc:
        w.coordinator(resolver=lambda _k: other).respond(w.client().start())
    assert exc.value.code == "key_id_mismatch"


def test_client_finish_forged_by_non_holder() -> None:
    w = World()
    client, server = w.client(), w.coordinator()
    finish, _ = client.finish(server.respond(client.start()))
    env = SignedEnvelope.parse(finish)
    forged = SignedEnvelope.sign(DEFAULT_SUITE, MsgType.CLIENT_FINISH, dict(env.fields), SigningKey.generate())
    with pytest.raises(BadSignatureError):
        server.finish(forged.to_bytes())


def test_client_finish_replayed_into_another_session() -> None:
    w = World()
    c1, s1 = w.client(), w.coordinator()
    finish1, _ = c1.finish(s1.respond(c1.start()))
    s1.finish(finish1)
    c2, s2 = w.client(), w.coordinator()
    s2.respond(c2.start())
    with pytest.raises(AuthError) as exc:
        s2.finish(finish1)
    assert exc.value.code == "transcript_mismatch"


def test_server_hello_replayed_to_another_client() -> None:
    w = World()
    c1, c2 = w.client(), w.client()
    reply1 = w.coordinator().respond(c1.start())
    c2.start()
    with pytest.raises(AuthError) as exc:
        c2.finish(reply1)
    assert exc.value.code == "transcript_mismatch"


@pytest.mark.parametrize("tag", [Field.DEVICE_KEY_ID, Field.CLIENT_NONCE, Field.KEM_PUBLIC, Field.TIMESTAMP])
def test_client_hello_tampered_in_flight(tag: Field) -> None:
    w = World()
    other = SigningKey.generate(w.suite.sig)
    w.directory[other.key_id] = other.public
    hello = w.client().start()
    bad = bytearray(hello)
    if tag is Field.DEVICE_KEY_ID:
        bad[field_offset(hello, tag) : field_offset(hello, tag) + 32] = bytes.fromhex(other.key_id)
    else:
        bad[field_offset(hello, tag)] ^= 0x01
    with pytest.raises(BadSignatureError) as exc:
        w.coordinator().respond(bytes(bad))
    assert exc.value.code == "bad_signature"


def test_client_hello_signed_by_a_non_holder() -> None:
    """An attacker's own key signing a hello that names the device's key id, or no signature at all."""
    w = World()
    attacker = SigningKey.generate(w.suite.sig)
    fields = dict(SignedEnvelope.parse(w.client().start()).fields)
    forged = SignedEnvelope.sign(w.suite, MsgType.CLIENT_HELLO, fields, attacker).to_bytes()
    honest = w.client().start()
    sig_len = w.suite.sig_alg.signature_len
    for body in (forged, honest[:-sig_len] + bytes(sig_len)):
        with pytest.raises(BadSignatureError):
            w.coordinator().respond(body)


@pytest.mark.parametrize("skew,ok", [(-121, False), (-120, True), (120, True), (121, False)])
def test_client_hello_freshness(skew: int, ok: bool) -> None:
    w = World()
    now = 1_800_000_000.0
    hello = w.client(clock=lambda: now + skew).start()
    server = w.coordinator(clock=lambda: now)
    if ok:
        server.respond(hello)
    else:
        with pytest.raises(AuthError) as exc:
            server.respond(hello)
        assert exc.value.code == "stale_request"


def test_client_hello_replay_hook() -> None:
    w = World()

    class Seen:
        def __init__(self) -> None:
            self.digests: set[bytes] = set()

        def seen(self, digest: bytes) -> bool:
            return digest in self.digests

        def record(self, digest: bytes) -> bool:
            new = digest not in self.digests
            self.digests.add(digest)
            return new

    seen = Seen()

    hello = w.client().start()
    w.coordinator(seen=seen).respond(hello)
    with pytest.raises(ReplayError) as exc:
        w.coordinator(seen=seen).respond(hello)
    assert exc.value.code == "replay"
    w.coordinator(seen=seen).respond(w.client().start())  # a fresh hello is new
    forged = bytearray(w.client().start())
    forged[-1] ^= 0x01
    with pytest.raises(BadSignatureError):
        w.coordinator(seen=seen).respond(bytes(forged))
    assert len(seen.digests) == 2  # only hellos that verified and were admitted are recorded

    def busy(_device: VerifyKey) -> None:
        raise errors_busy

    errors_busy = CoordinatorBusyError("busy", code="coordinator_busy")
    hello = w.client().start()
    with pytest.raises(CoordinatorBusyError):
        w.coordinator(seen=seen, admit=busy).respond(hello)
    w.coordinator(seen=seen).respond(hello)  # a hello refused as busy may be retried as is


@pytest.mark.parametrize(
    "tag,code",
    [
        (Field.HELLO_HASH, "bad_signature"),
        (Field.SERVER_KEY_ID, "server_key_mismatch"),
        (Field.SERVER_NONCE, "bad_signature"),
        (Field.KEM_CIPHERTEXT, "bad_signature"),
        (Field.LIFETIME, "bad_signature"),
    ],
)
def test_server_hello_field_tampering(tag: Field, code: str) -> None:
    w = World()
    client = w.client()
    reply = w.coordinator().respond(client.start())
    pos = field_offset(reply, tag)
    bad = bytearray(reply)
    bad[pos] ^= 0x01
    with pytest.raises(AuthError) as exc:
        client.finish(bytes(bad))
    assert exc.value.code == code
    assert isinstance(exc.value, BadSignatureError) == (code == "bad_signature")


def test_server_hello_signature_tampering() -> None:
    w = World()
    client = w.client()
    reply = bytearray(w.coordinator().respond(client.start()))
    reply[-5] ^= 0x01
    with pytest.raises(BadSignatureError):
        client.finish(bytes(reply))


def test_state_machine_order() -> None:
    w = World()
    client, server = w.client(), w.coordinator()
    with pytest.raises(ProtocolError) as exc:
        client.finish(b"")
    assert exc.value.code == "bad_state"
    with pytest.raises(ProtocolError):
        server.finish(b"")
    hello = client.start()
    with pytest.raises(ProtocolError):
        client.start()
    finish, _ = client.finish(server.respond(hello))
    server.finish(finish)
    for call in (lambda: server.respond(hello), lambda: server.finish(finish), lambda: client.finish(b"")):
        with pytest.raises(ProtocolError) as exc:
            call()
        assert exc.value.code == "bad_state"


def test_failure_poisons_the_machine() -> None:
    w = World()
    client, server = w.client(), w.coordinator()
    hello = client.start()
    reply = server.respond(hello)
    with pytest.raises(QflareError):
        client.finish(reply[:-1])
    with pytest.raises(ProtocolError) as exc:
        client.finish(reply)
    assert exc.value.code == "bad_state"


def test_handshake_timeout_and_session_lifetime() -> None:
    now = [10_000.0]
    w = World()
    client = w.client(clock=lambda: now[0])
    server = w.coordinator(clock=lambda: now[0], lifetime_s=120, handshake_timeout_s=5)
    finish, c = client.finish(server.respond(client.start()))
    now[0] += 6
    with pytest.raises(SessionExpiredError) as exc:
        server.finish(finish)
    assert exc.value.code == "handshake_expired"

    client = w.client(clock=lambda: now[0])
    server = w.coordinator(clock=lambda: now[0], lifetime_s=120)
    c, s = handshake_in_process(client, server)
    now[0] += 119
    s.open(MsgType.UPDATE, 0, c.seal(MsgType.UPDATE, 0, b"x"))
    now[0] += 1
    with pytest.raises(SessionExpiredError):
        c.seal(MsgType.UPDATE, 0, b"x")


def test_client_caps_server_lifetime() -> None:
    now = [0.0]
    w = World()
    client = w.client(clock=lambda: now[0], max_lifetime_s=30)
    c, _ = handshake_in_process(client, w.coordinator(clock=lambda: now[0], lifetime_s=3600))
    assert c.expires_at == 30


def test_zero_lifetime_and_argument_checks() -> None:
    w = World()
    client = w.client()
    hello = SignedEnvelope.parse(client.start())
    reply = SignedEnvelope.parse(w.coordinator().respond(hello.to_bytes()))
    fields = dict(reply.fields)
    fields[Field.LIFETIME] = u32(0)
    zero = SignedEnvelope.sign(DEFAULT_SUITE, MsgType.SERVER_HELLO, fields, w.server)
    with pytest.raises(QflareError):
        client.finish(zero.to_bytes())
    with pytest.raises(ConfigError):
        ServerHandshake(w.server, w.directory.get, lifetime_s=0)
    with pytest.raises(ConfigError) as exc:
        ClientHandshake(SigningKey.generate("ML-DSA-87"), w.server.public)
    assert exc.value.code == "key_alg_mismatch"


def test_wrong_message_types() -> None:
    w = World()
    client, server = w.client(), w.coordinator()
    hello = client.start()
    with pytest.raises(QflareError) as exc:
        client.finish(hello)
    assert exc.value.code == "unexpected_message"
    with pytest.raises(QflareError):
        server.respond(w.server.public.raw)


def test_handshake_is_fast() -> None:
    w = World()
    samples = []
    for _ in range(15):
        t0 = time.perf_counter()
        handshake_in_process(w.client(), w.coordinator())
        samples.append(time.perf_counter() - t0)
    median_ms = statistics.median(samples) * 1e3
    assert median_ms < 50, median_ms  # target is < 5 ms; generous bound for loaded CI machines
