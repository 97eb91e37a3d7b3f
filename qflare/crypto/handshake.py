"""Mutually authenticated, hybrid post-quantum session establishment (three messages).

::

    device (ClientHandshake)                               coordinator (ServerHandshake)
    CH = CLIENT_HELLO{device key id, client nonce, KEM public, timestamp}
         signed by the device (context "qflare/v1/client-hello")  ------>
                                  policy check, resolve device key, replay lookup, verify signature,
                                  timestamp within ±120 s, admission (budget); only then encapsulate
         <------  SH = SERVER_HELLO{SHA-256(CH), server key id, server nonce, KEM ciphertext, lifetime}
                  signed by the coordinator (context "qflare/v1/server-hello")
    check pinned key + signature, decapsulate
    TH = SHA-256(CH || SH); keys = HKDF(secrets, TH)
    CF = CLIENT_FINISH{device key id, TH} signed by the device  ------>
                                                    verify signature and TH, keys = HKDF(secrets, TH)
    both: Channel(session id, mirrored c2s/s2c keys)

Each object is one-shot: steps must run in order and any failure poisons it (ProtocolError ``bad_state``
afterwards).  Ephemeral KEM keys are fresh for every handshake and dropped once keys are derived.

The hello is signed so that only the holder of an enrolled device key can make the coordinator
encapsulate and sign: a hello naming an enrolled key id with any other signature costs the coordinator
one verification, and a replayed honest hello (refused while fresh by the ``seen`` hook, stale after)
one digest lookup.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from typing import Protocol

from qflare.crypto.channel import DEFAULT_MAX_PLAINTEXT, Channel
from qflare.crypto.envelope import DEFAULT_MAX_ENVELOPE, Field, MsgType, SignedEnvelope, u32, u64
from qflare.crypto.handshake_state import HandshakeState
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.kem import EphemeralKem, Role, SessionKeys, derive_session_keys, encapsulate
from qflare.crypto.suite import DEFAULT_POLICY, DEFAULT_SUITE, Policy, Suite, sha256
from qflare.errors import (
    AuthError,
    ConfigError,
    MalformedError,
    PolicyError,
    ProtocolError,
    ReplayError,
    SessionExpiredError,
    UnknownDeviceError,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_SESSION_LIFETIME_S",
    "HELLO_FRESHNESS_S",
    "ClientHandshake",
    "DeviceResolver",
    "HandshakeAdmission",
    "HandshakeState",
    "HelloReplayCheck",
    "ServerHandshake",
    "handshake_in_process",
]

DEFAULT_SESSION_LIFETIME_S = 3600
MAX_SESSION_LIFETIME_S = 7 * 24 * 3600
DEFAULT_HANDSHAKE_TIMEOUT_S = 30.0
NONCE_LEN = 32
HELLO_FRESHNESS_S = 120
"""A CLIENT_HELLO's timestamp must be within this many seconds of the coordinator's clock."""

DeviceResolver = Callable[[str], "VerifyKey | None"]
"""Maps a device key id (hex) to its enrolled VerifyKey, None when unknown; may raise RevokedError."""

HandshakeAdmission = Callable[["VerifyKey"], None]
"""Called with the resolved device key once a CLIENT_HELLO has passed every cheap check, just before the
encapsulation and the signature; raises (e.g. ``coordinator_busy``) to refuse the hello."""


class HelloReplayCheck(Protocol):
    """The replay cache shared across hellos, keyed by SHA-256 of a CLIENT_HELLO's exact bytes.  It must
    remember a digest for at least 2 × HELLO_FRESHNESS_S (an older hello is refused as stale anyway)."""

    def seen(self, digest: bytes) -> bool:
        """True when this hello was already recorded (a lookup; records nothing)."""

    def record(self, digest: bytes) -> bool:
        """Record the hello atomically; False when it was already recorded (a concurrent duplicate)."""


class _State(enum.Enum):
    START = "start"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


class _Machine:
    def __init__(self) -> None:
        self._state = _State.START

    def _expect(self, state: _State, step: str) -> None:
        if self._state is not state:
            raise ProtocolError(f"{step} called in state {self._state.value}", code="bad_state")

    @property
    def state(self) -> str:
        return self._state.value


class ClientHandshake(_Machine):
    """Device side.  ``server_key`` is the pinned coordinator key; anything else is refused."""

    def __init__(
        self,
        device_key: SigningKey,
        server_key: VerifyKey,
        *,
        suite: Suite = DEFAULT_SUITE,
        policy: Policy = DEFAULT_POLICY,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        max_lifetime_s: int = MAX_SESSION_LIFETIME_S,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        policy.check(suite)  # never even propose a suite our own policy refuses
        if device_key.alg != suite.sig or server_key.alg != suite.sig:
            raise ConfigError(
                f"suite signs with {suite.sig}; device key is {device_key.alg}, server key is {server_key.alg}",
                code="key_alg_mismatch",
            )
        self._device_key = device_key
        self._server_key = server_key
        self._suite = suite
        self._max_plaintext = max_plaintext
        self._max_lifetime_s = max_lifetime_s
        self._max_envelope = max_envelope
        self._clock = clock
        self._kem: EphemeralKem | None = None
        self._hello = b""
        self.channel: Channel | None = None

    def start(self) -> bytes:
        """Produce CLIENT_HELLO with a fresh nonce, fresh ephemeral KEM keys and the current time, signed
        by the device key."""
        self._expect(_State.START, "start")
        self._kem = EphemeralKem.generate(self._suite)
        env = SignedEnvelope.sign(
            self._suite,
            MsgType.CLIENT_HELLO,
            {
                Field.DEVICE_KEY_ID: bytes.fromhex(self._device_key.key_id),
                Field.CLIENT_NONCE: os.urandom(NONCE_LEN),
                Field.KEM_PUBLIC: self._kem.public_bytes(),
                Field.TIMESTAMP: u64(max(0, int(self._clock()))),
            },
            self._device_key,
        )
        self._hello = env.to_bytes()
        self._state = _State.WAITING
        return self._hello

    def finish(self, server_hello: bytes) -> tuple[bytes, Channel]:
        """Consume SERVER_HELLO; return (CLIENT_FINISH bytes, the established Channel)."""
        self._expect(_State.WAITING, "finish")
        try:
            result = self._finish(server_hello)
        except BaseException:
            self._state = _State.FAILED
            self._kem = None
            raise
        self._state = _State.DONE
        return result

    def _finish(self, server_hello: bytes) -> tuple[bytes, Channel]:
        env = SignedEnvelope.parse(server_hello, max_size=self._max_envelope, expected_type=MsgType.SERVER_HELLO)
        if env.suite != self._suite:
            raise PolicyError(
                f"server answered with suite {env.suite.name}, we offered {self._suite.name}", code="suite_mismatch"
            )
        if env.get_key_id(Field.SERVER_KEY_ID) != self._server_key.key_id:
            raise AuthError(
                "server hello names a coordinator key other than the pinned one", code="server_key_mismatch"
            )
        env.verify(self._server_key)
        if env.get(Field.HELLO_HASH) != sha256(self._hello):
            raise AuthError("server hello answers a different client hello", code="transcript_mismatch")
        lifetime = env.get_int(Field.LIFETIME)
        if lifetime == 0:
            raise MalformedError("server offered a zero session lifetime", code="malformed")
        if self._kem is None:  # pragma: no cover - guarded by the state machine
            raise ProtocolError("no ephemeral KEM key", code="bad_state")
        secrets = self._kem.decapsulate(env.get(Field.KEM_CIPHERTEXT))
        self._kem = None  # forward secrecy: the ephemeral private keys are no longer needed
        transcript = sha256(self._hello, env.to_bytes())
        keys = derive_session_keys(secrets, transcript, Role.CLIENT)
        finish = SignedEnvelope.sign(
            self._suite,
            MsgType.CLIENT_FINISH,
            {Field.DEVICE_KEY_ID: bytes.fromhex(self._device_key.key_id), Field.TRANSCRIPT_HASH: transcript},
            self._device_key,
        )
        self.channel = _channel(
            keys, self._suite, min(lifetime, self._max_lifetime_s), self._max_plaintext, self._clock
        )
        return finish.to_bytes(), self.channel


class ServerHandshake(_Machine):
    """Coordinator side.  ``resolve_device`` maps a device key id (hex) to its VerifyKey or None;
    ``seen`` (optional) is the replay cache shared across hellos (see :data:`HelloReplayCheck`; without it
    a hello is only checked for freshness); ``admit`` (optional) may refuse a hello after every check,
    before the encapsulation and the signature."""

    def __init__(
        self,
        server_key: SigningKey,
        resolve_device: DeviceResolver,
        *,
        policy: Policy = DEFAULT_POLICY,
        lifetime_s: int = DEFAULT_SESSION_LIFETIME_S,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
        clock: Callable[[], float] = time.time,
        admit: HandshakeAdmission | None = None,
        seen: HelloReplayCheck | None = None,
    ) -> None:
        super().__init__()
        if not 0 < lifetime_s <= MAX_SESSION_LIFETIME_S:
            raise ConfigError(f"lifetime_s must be 1..{MAX_SESSION_LIFETIME_S}", code="bad_argument")
        self._server_key = server_key
        self._resolve = resolve_device
        self._admit = admit
        self._seen = seen
        self._policy = policy
        self._lifetime_s = int(lifetime_s)
        self._timeout = handshake_timeout_s
        self._max_plaintext = max_plaintext
        self._max_envelope = max_envelope
        self._clock = clock
        self._started = 0.0
        self._suite: Suite | None = None
        self._device: VerifyKey | None = None
        self._keys: SessionKeys | None = None
        self._transcript = b""
        self.channel: Channel | None = None

    @property
    def device_key(self) -> VerifyKey | None:
        """The resolved device key (after :meth:`respond`)."""
        return self._device

    @property
    def device_key_id(self) -> str | None:
        return None if self._device is None else self._device.key_id

    @property
    def suite(self) -> Suite | None:
        return self._suite

    def respond(self, client_hello: bytes) -> bytes:
        """Consume CLIENT_HELLO, return SERVER_HELLO."""
        self._expect(_State.START, "respond")
        try:
            out = self._respond(client_hello)
        except BaseException:
            self._state = _State.FAILED
            raise
        self._state = _State.WAITING
        return out

    def _respond(self, client_hello: bytes) -> bytes:
        env = SignedEnvelope.parse(client_hello, max_size=self._max_envelope, expected_type=MsgType.CLIENT_HELLO)
        suite = self._policy.check(env.suite)
        if suite.sig != self._server_key.alg:
            raise PolicyError(
                f"client asked for {suite.sig} signatures; this coordinator signs with {self._server_key.alg}",
                code="suite_unsupported",
            )
        key_id = env.get_key_id(Field.DEVICE_KEY_ID)
        device = self._resolve(key_id)
        if device is None:
            raise UnknownDeviceError(f"no enrolled device with key id {key_id[:16]}...", code="unknown_device")
        if device.key_id != key_id:
            raise AuthError("device resolver returned a key with another key id", code="key_id_mismatch")
        if device.alg != suite.sig:
            raise PolicyError(
                f"device key is {device.alg} but the suite signs with {suite.sig}", code="key_alg_mismatch"
            )
        # The replay lookup comes before the signature check: a digest lookup is far cheaper than an ML-DSA
        # verification, so a replayed hello costs one lookup.  Only hellos that verified, are fresh and were
        # admitted are recorded (below): forgeries cannot fill the cache and evict honest digests, and a
        # hello refused coordinator_busy may be retried byte for byte.  No one can pre-poison the cache with
        # a future honest hello either: its bytes hold a fresh random nonce, a fresh KEM key and the
        # device's own signature.
        digest = sha256(env.to_bytes())
        if self._seen is not None and self._seen.seen(digest):
            raise ReplayError("client hello was already seen", code="replay")
        env.verify(device)  # proof of possession: bad_signature
        now = self._clock()
        if abs(env.get_int(Field.TIMESTAMP) - now) > HELLO_FRESHNESS_S:
            raise AuthError(f"client hello timestamp is more than {HELLO_FRESHNESS_S} s off", code="stale_request")
        if self._admit is not None:
            self._admit(device)  # every check above is cheap or a verification; what follows is expensive
        if self._seen is not None and not self._seen.record(digest):
            raise ReplayError("client hello was already seen", code="replay")  # a concurrent duplicate
        ciphertext, secrets = encapsulate(suite, env.get(Field.KEM_PUBLIC))
        hello = SignedEnvelope.sign(
            suite,
            MsgType.SERVER_HELLO,
            {
                Field.HELLO_HASH: sha256(env.to_bytes()),
                Field.SERVER_KEY_ID: bytes.fromhex(self._server_key.key_id),
                Field.SERVER_NONCE: os.urandom(NONCE_LEN),
                Field.KEM_CIPHERTEXT: ciphertext,
                Field.LIFETIME: u32(self._lifetime_s),
            },
            self._server_key,
        ).to_bytes()
        self._transcript = sha256(env.to_bytes(), hello)
        self._keys = derive_session_keys(secrets, self._transcript, Role.SERVER)
        self._suite, self._device = suite, device
        self._started = self._clock()
        return hello

    def export_state(self) -> HandshakeState:
        """The state :meth:`finish` needs, after :meth:`respond` (ProtocolError ``bad_state`` otherwise)."""
        self._expect(_State.WAITING, "export_state")
        if self._suite is None or self._device is None or self._keys is None:  # pragma: no cover
            raise ProtocolError("handshake state is incomplete", code="bad_state")
        return HandshakeState(
            self._suite, self._device.key_id, self._started, self._lifetime_s, self._transcript, self._keys
        )

    @classmethod
    def resume(
        cls,
        server_key: SigningKey,
        resolve_device: DeviceResolver,
        state: HandshakeState,
        *,
        policy: Policy = DEFAULT_POLICY,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
        clock: Callable[[], float] = time.time,
    ) -> ServerHandshake:
        """A machine waiting for CLIENT_FINISH in ``state`` (exported by another process's :meth:`respond`).
        The device is resolved again, so one revoked since its hello is refused (``revoked``)."""
        hs = cls(
            server_key,
            resolve_device,
            policy=policy,
            lifetime_s=state.lifetime_s,
            handshake_timeout_s=handshake_timeout_s,
            max_plaintext=max_plaintext,
            max_envelope=max_envelope,
            clock=clock,
        )
        suite = policy.check(state.suite)
        device = resolve_device(state.device_key_id)
        if device is None:
            raise UnknownDeviceError(
                f"no enrolled device with key id {state.device_key_id[:16]}...", code="unknown_device"
            )
        if device.key_id != state.device_key_id:
            raise AuthError("device resolver returned a key with another key id", code="key_id_mismatch")
        hs._suite, hs._device, hs._keys = suite, device, state.keys
        hs._transcript, hs._started = state.transcript, state.started
        hs._state = _State.WAITING
        return hs

    def finish(self, client_finish: bytes) -> Channel:
        """Consume CLIENT_FINISH, return the established Channel."""
        self._expect(_State.WAITING, "finish")
        try:
            channel = self._finish(client_finish)
        except BaseException:
            self._state = _State.FAILED
            self._keys = None
            raise
        self._state = _State.DONE
        return channel

    def _finish(self, client_finish: bytes) -> Channel:
        if self._suite is None or self._device is None or self._keys is None:  # pragma: no cover
            raise ProtocolError("handshake state is incomplete", code="bad_state")
        if self._clock() - self._started > self._timeout:
            raise SessionExpiredError("handshake took too long", code="handshake_expired")
        env = SignedEnvelope.parse(client_finish, max_size=self._max_envelope, expected_type=MsgType.CLIENT_FINISH)
        if env.suite != self._suite:
            raise PolicyError("client finish changes the negotiated suite", code="suite_mismatch")
        if env.get_key_id(Field.DEVICE_KEY_ID) != self._device.key_id:
            raise AuthError("client finish names another device", code="device_mismatch")
        env.verify(self._device)
        if env.get(Field.TRANSCRIPT_HASH) != self._transcript:
            raise AuthError("client finish signs a different transcript", code="transcript_mismatch")
        self.channel = _channel(self._keys, self._suite, self._lifetime_s, self._max_plaintext, self._clock)
        self._keys = None
        return self.channel


def _channel(keys: SessionKeys, suite: Suite, lifetime: int, max_plaintext: int, clock: Callable[[], float]) -> Channel:
    return Channel(
        keys.session_id,
        keys.send_key,
        keys.recv_key,
        max_plaintext=max_plaintext,
        lifetime=lifetime,
        clock=clock,
        suite=suite,
    )


def handshake_in_process(client: ClientHandshake, server: ServerHandshake) -> tuple[Channel, Channel]:
    """Run all three messages between two local state machines; returns (client channel, server channel)."""
    hello = client.start()
    reply = server.respond(hello)
    finish, client_channel = client.finish(reply)
    return client_channel, server.finish(finish)
