"""The coordinator's connection state kept in its store, so that several coordinator processes on one
database (and one identity key) serve one federation: ``CoordinatorConfig.shared_sessions``.

What a single process keeps in memory lives in the store instead (docs/protocol.md section 6.1):

* the CLIENT_HELLO replay cache (:class:`StoredHelloCache`, a row per digest, ``INSERT ... ON CONFLICT
  DO NOTHING``: not inserted = a replay);
* each pending handshake: the server side's :class:`~qflare.crypto.handshake.HandshakeState`, wrapped
  (:mod:`qflare.crypto.wrap`, bound to SHA-256 of the SERVER_HELLO), taken by the CLIENT_FINISH with
  ``DELETE ... RETURNING`` (exactly one process finishes it);
* each session: its keys, suite and lifetime wrapped (bound to the session id and the device id), and
  its counters: a request's frame is authenticated with the keys, then ONE statement accepts its counter
  (only above the stored one) and reserves the reply's send counter (:class:`SharedChannel`);
* liveness: when a frame last authenticated on a session, which any process stamps in that statement.

A process caches sessions' unwrapped keys (at most ``cache_limit``, least recently used dropped), never
their counters: every request reads its session row (one indexed read, which refuses an unknown, closed,
expired or revoked session before any cryptography), and every accepted frame is one atomic update.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from ..crypto import SigningKey, Suite, VerifyKey
from ..crypto.handshake import HELLO_FRESHNESS_S, HandshakeState
from ..crypto.shared_channel import SharedChannel
from ..crypto.suite import sha256
from ..crypto.wrap import StateKey
from ..errors import AuthError, MalformedError, QflareError, ReplayError, RevokedError, SessionExpiredError
from .records import SharedSessionRow
from .store import CoordinatorStore

__all__ = ["SharedSession", "SharedState", "StoredHelloCache"]

_CACHE_LIMIT = 10_000
_PURGE_EVERY_S = 60.0
_MAX_SEND = 2**63 - 1
_PENDING, _SESSION = b"pending-handshake", b"session"
_KEYS = struct.Struct(">5s32s32sQQ")  # suite, send key, receive key, created (ms), expires (ms)
_HEX = frozenset("0123456789abcdef")
_USABLE = ("active", "quarantined")


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _unknown(detail: str = "unknown or closed session") -> AuthError:
    return AuthError(f"{detail}: run the handshake again", code="unknown_session")


class StoredHelloCache:
    """The hello replay cache (:class:`~qflare.crypto.handshake.HelloReplayCheck`) in the store: a digest
    is kept ``ttl_s`` (2 × the freshness window, as in memory); every ``purge_every_s`` one recording
    first deletes the expired digests and pending handshakes, in its own transaction."""

    def __init__(
        self,
        store: CoordinatorStore,
        clock: Callable[[], float],
        ttl_s: float = 2 * HELLO_FRESHNESS_S,
        purge_every_s: float = _PURGE_EVERY_S,
    ) -> None:
        self._store, self._clock, self._ttl, self._every = store, clock, ttl_s, purge_every_s
        self._next_purge = -float("inf")
        self._lock = threading.Lock()

    def seen(self, digest: bytes) -> bool:
        return self._store.hello_seen(digest.hex())

    def record(self, digest: bytes) -> bool:
        now = self._clock()
        with self._lock:
            purge = now >= self._next_purge
            if purge:
                self._next_purge = now + self._every
        return self._store.record_hello(digest.hex(), expires_at=_utc(now + self._ttl), now=_utc(now), purge=purge)


@dataclass(frozen=True, repr=False)
class _Keys:
    """One session's unwrapped keys (cached per process; the counters never are)."""

    device_id: str
    device: VerifyKey
    suite: Suite
    send_key: bytes
    recv_key: bytes
    expires_at: float


@dataclass(frozen=True)
class SharedSession:
    """One request's view of a shared session: its device, the device's key and status (read with the
    session row), and a channel whose counters the store keeps."""

    device_id: str
    key: VerifyKey
    channel: SharedChannel
    status: str


class SharedState:
    """Pending handshakes, sessions, the hello replay cache and liveness in the store (module docstring)."""

    def __init__(
        self,
        store: CoordinatorStore,
        identity: SigningKey,
        *,
        clock: Callable[[], float],
        max_plaintext: int,
        cache_limit: int = _CACHE_LIMIT,
    ) -> None:
        self._store, self._clock, self._max_plaintext = store, clock, max_plaintext
        self._wrap = StateKey.from_identity(identity)
        self.hellos = StoredHelloCache(store, clock)
        self._cache: OrderedDict[str, _Keys] = OrderedDict()
        self._limit = cache_limit
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ pending handshakes
    def keep_pending(self, server_hello: bytes, state: HandshakeState, timeout_s: float) -> None:
        digest = sha256(server_hello)
        self._store.put_pending_handshake(
            digest.hex(),
            state.device_key_id,
            self._wrap.wrap(_PENDING, digest, state.to_bytes()),
            started_at=_utc(state.started),
            expires_at=_utc(state.started + timeout_s),
        )

    def take_pending(self, hello_hash: bytes) -> HandshakeState | None:
        """The pending handshake of this SERVER_HELLO hash, removed (None when there is none); AuthError
        ``unknown_handshake`` when its stored state does not open (altered, or another coordinator key)."""
        row = self._store.take_pending_handshake(hello_hash.hex())
        if row is None:
            return None
        try:
            return HandshakeState.from_bytes(self._wrap.unwrap(_PENDING, hello_hash, row.state))
        except QflareError as exc:
            raise AuthError(
                f"the pending handshake's stored state does not open ({exc.message})", code="unknown_handshake"
            ) from None

    def pending_count(self) -> int:
        return self._store.count_pending_handshakes(now=_utc(self._clock()))

    # ------------------------------------------------------------------ sessions
    def add_session(self, state: HandshakeState, device: VerifyKey, created: float) -> str:
        """Store the session ``state`` established (wrapped keys, fresh counters); returns its id (hex)."""
        sid = state.keys.session_id
        expires = created + state.lifetime_s
        plain = _KEYS.pack(
            state.suite.to_bytes(),
            state.keys.send_key,
            state.keys.recv_key,
            round(created * 1000),
            round(expires * 1000),
        )
        wrapped = self._wrap.wrap(_SESSION, sid + device.key_id.encode(), plain)
        self._store.add_shared_session(
            sid.hex(), device.key_id, _utc(expires), wrapped_keys=wrapped, created_at=_utc(created)
        )
        keys = _Keys(
            device.key_id, device, state.suite, state.keys.send_key, state.keys.recv_key, round(expires * 1000) / 1000
        )
        self._remember(sid.hex(), keys)
        return sid.hex()

    def session(self, session_id: str | None) -> SharedSession:
        """The session for one request, from its row: ``unknown_session`` (unknown, closed, or its stored
        keys do not open), ``revoked``, ``session_expired``; the keys are unwrapped only after those checks
        and only when this process has not cached them."""
        sid = session_id or ""
        if len(sid) != 64 or not _HEX.issuperset(sid):
            raise _unknown()
        with self._lock:
            keys = self._cache.get(sid)
            if keys is not None:
                self._cache.move_to_end(sid)
        row = self._store.shared_session(sid, with_keys=keys is None)
        if row is None or row.last_recv is None:
            raise _unknown()
        if row.device_status not in _USABLE:
            self.forget(sid)
            raise RevokedError("device has been revoked", code="revoked")
        if row.closed_at is not None:
            self.forget(sid)
            raise _unknown()
        if self._clock() >= row.expires_at.timestamp():
            self.forget(sid)
            raise SessionExpiredError("session expired: run the handshake again", code="session_expired")
        if keys is None:
            keys = self._unwrap(row)
            self._remember(sid, keys)
        elif keys.device_id != row.device_id:
            raise _unknown("the session row names another device than its keys")
        channel = SharedChannel(
            bytes.fromhex(sid),
            keys.send_key,
            keys.recv_key,
            advance=partial(self._advance, sid),
            last_recv=row.last_recv,
            expires_at=keys.expires_at,
            max_plaintext=self._max_plaintext,
            clock=self._clock,
            suite=keys.suite,
        )
        return SharedSession(row.device_id, keys.device, channel, row.device_status)

    def _unwrap(self, row: SharedSessionRow) -> _Keys:
        if row.wrapped_keys is None or row.sig_alg is None or row.sig_public_key is None:
            raise _unknown("the session row holds no keys")
        try:
            plain = self._wrap.unwrap(
                _SESSION, bytes.fromhex(row.session_id) + row.device_id.encode(), row.wrapped_keys
            )
            if len(plain) != _KEYS.size:
                raise MalformedError("the session's stored keys have the wrong length", code="malformed")
            suite, send, recv, _created, expires = _KEYS.unpack(plain)
            device = VerifyKey.from_bytes(row.sig_alg, row.sig_public_key)
            return _Keys(row.device_id, device, Suite.from_bytes(suite), send, recv, expires / 1000)
        except QflareError as exc:
            raise _unknown(
                f"the session's stored keys do not open under this coordinator's key ({exc.message})"
            ) from None

    def _advance(self, sid: str, counter: int) -> int:
        """Accept ``counter`` and reserve the reply's send counter (the one atomic statement); on a refusal,
        tell why from the row: gone, expired, out of counters, else a replay."""
        now = self._clock()
        reserved = self._store.advance_session(sid, counter, now=_utc(now))
        if reserved is not None:
            return reserved
        row = self._store.shared_session(sid)
        if row is None or row.closed_at is not None or row.last_recv is None:
            raise _unknown()
        if now >= row.expires_at.timestamp():
            raise SessionExpiredError("session expired: run the handshake again", code="session_expired")
        if row.next_send is not None and row.next_send >= _MAX_SEND:
            raise SessionExpiredError("send counter exhausted: run a new handshake", code="counter_exhausted")
        raise ReplayError(f"frame counter {counter} is not above the last accepted {row.last_recv}", code="replay")

    def _remember(self, sid: str, keys: _Keys) -> None:
        with self._lock:
            self._cache[sid] = keys
            self._cache.move_to_end(sid)
            while len(self._cache) > self._limit:
                self._cache.popitem(last=False)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._cache.pop(session_id, None)

    def forget_device(self, device_id: str) -> None:
        """Drop this process's cached keys of the device's sessions (its revocation closed them in the store)."""
        with self._lock:
            for sid in [s for s, k in self._cache.items() if k.device_id == device_id]:
                del self._cache[sid]

    @property
    def cached(self) -> int:
        """How many sessions' keys this process holds unwrapped."""
        return len(self._cache)

    # ------------------------------------------------------------------ liveness
    def live(self, now: float, seen_since: float) -> set[str]:
        """Devices with an open, unexpired session or seen since ``seen_since`` by any process."""
        return self._store.live_device_ids(now=_utc(now), seen_since=_utc(seen_since))
