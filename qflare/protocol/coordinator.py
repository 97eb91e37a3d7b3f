"""The coordinator: enrollment, sessions and the round endpoints, bytes in and bytes out.

The same object serves the in-process simulation and the HTTP server (whose routes only parse HTTP and
call :meth:`Coordinator.handle`).  Every refusal raises a typed :class:`~qflare.errors.QflareError`,
changes no state, and is recorded as a security event with its reason code.

Cheap checks come before expensive ones: an enrollment's token is looked up before its proof of
possession is verified and its record signed, and a CLIENT_HELLO must name an enrolled, active device
and carry that device's signature over a fresh timestamp, not seen before, before the coordinator
encapsulates and signs.  The expensive work of both is drawn from one
:class:`~qflare.protocol.budget.CryptoBudget`, handshakes first.  The coordinator also remembers when each
device last proved itself (enrollment, handshake, any sealed request) and offers the round selector only
devices that hold a live session or were seen within ``liveness_window_s`` (all active devices when
there are none).

With ``CoordinatorConfig.shared_sessions`` the pending handshakes, the sessions (keys wrapped, counters),
the hello replay cache and the liveness sightings live in the store instead of this process
(:mod:`.shared_state`), so every coordinator on the same database and identity key continues any
device's handshake and session.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import torch

from ..crypto import (
    DEFAULT_POLICY,
    DEFAULT_SUITE,
    AckStatus,
    Channel,
    Field,
    MsgType,
    Policy,
    ServerHandshake,
    SignedEnvelope,
    SigningKey,
    Suite,
    VerifyKey,
    open_model_request,
    open_proof_request,
    open_task_request,
    open_update,
    seal_model,
    seal_receipt,
    seal_task,
    sign_update_ack,
)
from ..crypto.envelope import u64
from ..crypto.handshake import HELLO_FRESHNESS_S
from ..crypto.identity import key_id_of
from ..crypto.payloads import open_parts, seal_parts, seal_proof
from ..errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    MalformedError,
    NotFoundError,
    OversizeError,
    PolicyError,
    ProtocolError,
    QflareError,
    ReplayError,
    RevokedError,
    RoundError,
    SessionExpiredError,
    StaleModelError,
    TokenError,
    UnknownDeviceError,
    ValidationError,
    WrongRoundError,
)
from ..strategy import ClientUpdate, Pipeline
from ..wire import ParamLayout, decode_blob
from .budget import CryptoBudget, Work
from .cluster import Leadership
from .messages import SECAGG_ROUTES, Receipt, Route, TaskInfo
from .proofs import answer_for
from .provenance import entry_of
from .records import DeviceRow
from .rounds import PublishedModel, RoundConfig, RoundManager
from .secure_round import inbound
from .shared_state import SharedState
from .store import BlobSink, CoordinatorStore

__all__ = ["Coordinator", "CoordinatorConfig"]

_PENDING_LIMIT = 10_000
_HELLO_CACHE_LIMIT = 100_000


class _HelloReplayCache:
    """Digests of recent admitted CLIENT_HELLOs (the ``seen`` hook of ServerHandshake).  An entry expires
    after ``ttl_s`` (2 × the hello freshness window: an older hello is refused as stale before it could be
    replayed); at most ``limit`` entries are kept, the oldest evicted first.  Only admitted hellos are
    recorded, so the budget bounds the entries (100 a second × 240 s + the burst, by default) well below
    the limit.  Thread-safe."""

    def __init__(
        self, clock: Callable[[], float], ttl_s: float = 2 * HELLO_FRESHNESS_S, limit: int = _HELLO_CACHE_LIMIT
    ):
        self._clock, self._ttl, self._limit = clock, ttl_s, limit
        self._entries: dict[bytes, float] = {}  # insertion (= time) ordered
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        horizon = now - self._ttl
        while self._entries:
            first = next(iter(self._entries))
            if self._entries[first] >= horizon:
                break
            del self._entries[first]

    def seen(self, digest: bytes) -> bool:
        with self._lock:
            self._expire(self._clock())
            return digest in self._entries

    def record(self, digest: bytes) -> bool:
        now = self._clock()
        with self._lock:
            self._expire(now)
            if digest in self._entries:
                return False
            while len(self._entries) >= self._limit:
                del self._entries[next(iter(self._entries))]
            self._entries[digest] = now
            return True

    def __len__(self) -> int:
        return len(self._entries)


_MAX_EXAMPLES = 2**31 - 1  # the database column's range


@dataclass(frozen=True)
class CoordinatorConfig:
    suite: Suite = DEFAULT_SUITE
    policy: Policy = DEFAULT_POLICY
    session_lifetime_s: int = 3600
    max_update_bytes: int = 64 * 1024 * 1024
    handshake_timeout_s: float = 30.0
    """A pending handshake (SERVER_HELLO sent, CLIENT_FINISH not yet received) is dropped after this."""
    crypto_ops_per_s: float | None = 100.0
    """Handshakes plus enrollments the coordinator does a second, whoever asks (each costs it a signature
    and an encapsulation or a verification); None: no budget (an in-process simulation)."""
    crypto_burst: float = 200.0
    """How many of them it may do at once after a quiet spell."""
    enrollment_share: float = 0.5
    """The part of ``crypto_burst`` enrollments may use; the rest is kept for enrolled devices' handshakes."""
    liveness_window_s: float | None = 300.0
    """Rounds select among devices that hold a live session or were seen (enrolled, handshaked, sent a
    sealed request) this recently; None: among all active devices."""
    shared_sessions: bool = False
    """Keep pending handshakes, sessions (keys wrapped under a key derived from the identity key, counters),
    the hello replay cache and liveness in the store, so that several coordinator processes on one
    database and identity key serve one federation (docs/protocol.md section 6.1); False: in this process
    (no database round trip per request beyond today's)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.handshake_timeout_s) and self.handshake_timeout_s > 0):
            raise ConfigError("handshake_timeout_s must be > 0")
        if self.liveness_window_s is not None and not self.liveness_window_s > 0:
            raise ConfigError("liveness_window_s must be > 0 (or None)")


@dataclass
class _Session:
    device_id: str
    key: VerifyKey
    channel: Channel
    lock: threading.Lock
    status: str | None = None
    """The device's status read with a shared session's row; None: ask the store (in-memory sessions)."""


class Coordinator:
    """Runs the federation: see the module docstring."""

    def __init__(
        self,
        *,
        layout: ParamLayout,
        initial_flat: torch.Tensor,
        strategy: Pipeline,
        identity: SigningKey,
        store: CoordinatorStore,
        rounds: RoundConfig,
        config: CoordinatorConfig | None = None,
        blobs: BlobSink | None = None,
        clock: Callable[[], float] = time.time,
        on_model: Callable[[PublishedModel], None] | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        """``leadership`` makes this coordinator one worker of several on one store
        (:mod:`qflare.protocol.cluster`)."""
        self.config = config or CoordinatorConfig()
        self.config.policy.check(self.config.suite)
        if identity.alg != self.config.suite.sig:
            raise AuthError(f"coordinator key is {identity.alg}, suite needs {self.config.suite.sig}")
        self.identity, self.store, self.layout = identity, store, layout
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._session_of: dict[str, str] = {}  # device id -> its one live session id (a lookup, not a scan)
        self._pending: dict[str, tuple[float, ServerHandshake]] = {}  # insertion (= time) ordered
        self._lock = threading.Lock()
        self._last_seen: dict[str, float] = {}  # device id -> when it last proved itself
        self._hellos = _HelloReplayCache(clock)
        cfg = self.config
        self._shared: SharedState | None = None
        if cfg.shared_sessions:
            self._shared = SharedState(store, identity, clock=clock, max_plaintext=cfg.max_update_bytes)
        self.budget: CryptoBudget | None = None
        if cfg.crypto_ops_per_s is not None:
            self.budget = CryptoBudget(
                cfg.crypto_ops_per_s, cfg.crypto_burst, enrollment_share=cfg.enrollment_share, clock=clock
            )
        self.event_filter: Callable[[str, str, str | None, str | None], str | None] | None = None
        """When set, every security event passes it first: ``(reason, detail, remote, device_id)`` ->
        the detail to record, or None to record nothing (the HTTP server throttles floods with it)."""
        self.on_crypto: Callable[[str, float], None] | None = None
        """When set, called with ``(step, seconds)`` after each timed cryptographic step, refused or not:
        ``enroll_verify``, ``enroll_sign``, ``handshake_respond``, ``handshake_finish``, ``update_open``,
        ``update_ack`` (the server's ``qflare_crypto_seconds``)."""
        self.rounds = RoundManager(
            layout=layout,
            initial_flat=initial_flat,
            strategy=strategy,
            config=rounds,
            identity=identity,
            suite=self.config.suite,
            store=store,
            blobs=blobs,
            clock=clock,
            on_model=on_model,
            candidates=self.live_devices,
            leadership=leadership,
        )

    @property
    def public_key(self) -> VerifyKey:
        return self.identity.public

    # ------------------------------------------------------------------ admin
    def create_tokens(self, count: int = 1, ttl_s: float = 3600.0, label: str = "") -> list[str]:
        """Mint one-time enrollment tokens (only their hashes are stored)."""
        return self.store.create_tokens(count, timedelta(seconds=ttl_s), label)

    def live_devices(self, active: Sequence[str]) -> list[str]:
        """The devices of ``active`` (in their order) that hold an unexpired session or were seen within
        ``liveness_window_s``; all of ``active`` when none is (a coordinator that just started has seen
        nobody yet) or when the window is None."""
        window = self.config.liveness_window_s
        if window is None:
            return list(active)
        now = self._clock()
        cutoff = now - window
        if self._shared is not None:  # every process's sessions and sightings
            seen = self._shared.live(now, cutoff)
            return [d for d in active if d in seen] or list(active)
        with self._lock:
            in_session = {s.device_id for s in self._sessions.values() if not s.channel.expired()}
        live = [d for d in active if d in in_session or self._last_seen.get(d, -math.inf) >= cutoff]
        return live or list(active)

    @contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        observer = self.on_crypto
        start = time.perf_counter()
        try:
            yield
        finally:
            if observer is not None:
                observer(step, time.perf_counter() - start)

    def _seen(self, device_id: str) -> None:
        self._last_seen[device_id] = self._clock()

    def _spend(self, work: Work) -> None:
        if self.budget is not None:
            self.budget.take(work)

    def revoke(self, device_id: str, reason: str) -> None:
        """Revoke a device: its sessions die and its next message is refused."""
        self.store.revoke_device(device_id, reason)  # closes its sessions in the store too
        if self._shared is not None:
            self._shared.forget_device(device_id)
        with self._lock:
            sid = self._session_of.pop(device_id, None)
            if sid is not None:
                self._sessions.pop(sid, None)

    def quarantine(self, device_id: str, reason: str) -> None:
        """An operator's quarantine: the device stays connected but is not selected and its updates are
        refused (code ``quarantined``) until :meth:`reinstate`; recorded as a security event."""
        self.rounds.quarantine(device_id, reason)

    def reinstate(self, device_id: str) -> None:
        """Undo a quarantine: the device is selectable again and its reputation starts afresh."""
        self.rounds.reinstate(device_id)

    # ------------------------------------------------------------------ dispatch
    def handle(
        self, route: Route | str, body: bytes, *, session_id: str | None = None, remote: str | None = None
    ) -> bytes:
        """Serve one request.  Refusals raise a QflareError after being recorded as security events.

        A refusal under a session names the session's device (``exc.device_id`` and the event) only when
        a frame authenticated under it in this request: the session id is a cleartext header, so a frame
        that fails before or at AEAD authentication is from an unauthenticated sender."""
        sess: _Session | None = None
        try:
            route = Route(route)
        except ValueError:
            self._event("malformed", f"unknown route {route!r}", None, session_id, remote)
            raise MalformedError(f"unknown route {route!r}") from None
        try:
            if route is Route.ENROLL:
                return self._enroll(body)
            if route is Route.HELLO:
                return self._hello(body)
            if route is Route.FINISH:
                return self._finish(body)
            sess = self._session(session_id)
            with sess.lock:
                received = sess.channel.last_recv_counter
                try:
                    self._check_active(sess)
                    if route is Route.TASK:
                        out = self._task(sess, body)
                    elif route is Route.MODEL:
                        out = self._model(sess, body)
                    elif route is Route.PROOF:
                        out = self._proof(sess, body)
                    elif route in SECAGG_ROUTES:
                        out = self._secagg(sess, route, body)
                    else:
                        out = self._update(sess, body)
                except QflareError as exc:
                    if sess.channel.last_recv_counter != received:  # only an authenticated frame advances it
                        exc.device_id = sess.device_id
                    raise
            self._seen(sess.device_id)
            return out
        except QflareError as exc:
            if isinstance(exc, (ProtocolError, ValidationError)):
                detail = f"{getattr(route, 'value', route)}: {exc}"
                if sess is not None and exc.device_id is None:
                    detail += " (unauthenticated sender: no frame authenticated under this session)"
                self._event(exc.code, detail, exc.device_id, session_id, remote)
            raise

    def _event(self, code: str, detail: str, device_id: str | None, session_id: str | None, remote: str | None) -> None:
        if self.event_filter is not None:
            kept = self.event_filter(code, detail, remote, device_id)
            if kept is None:
                return
            detail = kept
        self.store.record_security_event(
            code, detail[:2000], device_id=device_id, session_id=session_id, remote_addr=remote
        )

    # ------------------------------------------------------------------ enrollment
    def _enroll(self, body: bytes) -> bytes:
        """Checks in order of cost (docs/protocol.md section 9.2): parse, policy, key algorithm, device id,
        timestamp, token (one hash lookup), device not enrolled yet; then the budget; only then the
        signature check (proof of possession) and the signed record.  The same key presenting the token it
        enrolled with gets its stored record back (a lost reply is retried, not turned into a ghost)."""
        env = SignedEnvelope.parse(body, expected_type=MsgType.ENROLL_REQUEST)
        suite = self.config.policy.check(env.suite)
        if suite.sig != self.identity.alg:
            raise PolicyError(
                f"enrollment of a {suite.sig} key refused: this coordinator's devices hold {self.identity.alg} keys",
                code="key_alg_mismatch",
            )
        raw = env.get(Field.SIGNING_PUBLIC)
        device_id = key_id_of(raw)
        if env.get(Field.DEVICE_ID).decode("utf-8", "replace") != device_id:
            raise AuthError("device id must be the key id of the presented key", code="device_id_mismatch")
        now = int(self._clock())
        if abs(env.get_int(Field.TIMESTAMP) - now) > 300:
            raise AuthError("enrollment request timestamp is more than 5 minutes off", code="stale_request")
        token = env.get(Field.ENROLL_TOKEN).decode("utf-8", "replace")
        enrolled = self._check_token(token, device_id)
        self._spend(Work.ENROLLMENT)
        key = VerifyKey.from_bytes(suite.sig, raw)
        with self._timed("enroll_verify"):
            env.verify(key)  # proof of possession of the signing key
        if enrolled is not None:
            self._seen(device_id)
            stored = enrolled.enrollment_record
            try:
                SignedEnvelope.open(stored, self.identity.public, expected_type=MsgType.ENROLL_RECORD)
                return stored
            except QflareError:  # signed by a former coordinator key (a key rotation): the current key signs
                return self._enrollment_record(key, now)
        record = self._enrollment_record(key, now)
        self.store.enroll_device(token, key.key_id, suite.sig, key.raw, record)
        self._seen(device_id)
        return record

    def _enrollment_record(self, key: VerifyKey, now: int) -> bytes:
        with self._timed("enroll_sign"):
            return self._sign_enrollment_record(key, now)

    def _sign_enrollment_record(self, key: VerifyKey, now: int) -> bytes:
        return SignedEnvelope.sign(
            self.config.suite,
            MsgType.ENROLL_RECORD,
            {
                Field.DEVICE_ID: key.key_id.encode(),
                Field.DEVICE_KEY_ID: key.key_id_bytes,
                Field.SIGNING_PUBLIC: key.raw,
                Field.SERVER_KEY_ID: self.identity.public.key_id_bytes,
                Field.TIMESTAMP: u64(now),
            },
            self.identity,
        ).to_bytes()

    def _check_token(self, token: str, device_id: str) -> DeviceRow | None:
        """None when ``token`` may enroll ``device_id``; the device's row when this device already enrolled
        with this token (a retry); else the TokenError / ReplayError / RevokedError the store would give.
        The store re-checks the token atomically when it consumes it."""
        row = self.store.get_token(token)
        if row is None:
            raise TokenError("unknown enrollment token", code="token_unknown")
        if row.used_at is not None:
            device = self.store.get_device(device_id) if row.used_by_device == device_id else None
            if device is None:
                raise TokenError("enrollment token already used", code="token_used")
            if not device.usable:
                exc = RevokedError(f"device {device_id[:16]}... is revoked", code="revoked")
                exc.device_id = device_id
                raise exc
            return device
        if row.revoked_at is not None:  # an operator revoked it before it was used (the dashboard)
            raise TokenError("enrollment token revoked", code="token_revoked")
        if row.expires_at.timestamp() <= self._clock():
            raise TokenError("enrollment token expired", code="token_expired")
        if self.store.device_status(device_id) is not None:
            raise ReplayError(f"device {device_id[:16]}... is already enrolled", code="device_exists")
        return None

    # ------------------------------------------------------------------ sessions
    def _resolve(self, key_id: str) -> VerifyKey | None:
        row = self.store.get_device(key_id)
        if row is None:
            return None
        if not row.usable:  # a quarantined device may still connect: it is only never selected
            exc = RevokedError(f"device {key_id[:16]}... is revoked", code="revoked")
            exc.device_id = key_id  # known, though no session is: the security event names the device
            raise exc
        return VerifyKey.from_bytes(row.sig_alg, row.sig_public_key)

    def _hello(self, body: bytes) -> bytes:
        """The handshake resolves the device (cheap: unknown or revoked key ids end here), looks the hello
        up in the replay cache, verifies its signature and timestamp, and only then draws on the budget,
        encapsulates and signs."""
        hs = ServerHandshake(
            self.identity,
            self._resolve,
            policy=self.config.policy,
            lifetime_s=self.config.session_lifetime_s,
            handshake_timeout_s=self.config.handshake_timeout_s,
            max_plaintext=self.config.max_update_bytes,
            clock=self._clock,
            admit=lambda _device: self._spend(Work.HANDSHAKE),
            seen=self._hellos if self._shared is None else self._shared.hellos,
        )
        with self._timed("handshake_respond"):
            reply = hs.respond(body)
        if self._shared is not None:
            self._shared.keep_pending(reply, hs.export_state(), self.config.handshake_timeout_s)
            return reply
        key = hashlib.sha256(reply).hexdigest()
        now = self._clock()
        with self._lock:
            self._expire_pending(now)
            if len(self._pending) >= _PENDING_LIMIT:
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = (now, hs)
        return reply

    def _expire_pending(self, now: float) -> None:
        """Drop pending handshakes older than ``handshake_timeout_s`` (the oldest are first).  Under
        ``self._lock``."""
        horizon = now - self.config.handshake_timeout_s
        while self._pending:
            first = next(iter(self._pending))
            if self._pending[first][0] >= horizon:
                break
            del self._pending[first]

    @property
    def pending_handshakes(self) -> int:
        """Handshakes awaiting their CLIENT_FINISH (with shared sessions: every process's)."""
        return len(self._pending) if self._shared is None else self._shared.pending_count()

    def _finish(self, body: bytes) -> bytes:
        """Body: ``SHA-256(server hello) || CLIENT_FINISH``; returns the session id (hex, ASCII)."""
        if len(body) < 32:
            raise MalformedError("handshake finish is truncated", code="truncated")
        now = self._clock()
        if self._shared is not None:
            return self._finish_shared(self._shared, body, now)
        with self._lock:
            entry = self._pending.pop(body[:32].hex(), None)
            self._expire_pending(now)
        if entry is None:
            raise AuthError("no handshake in progress for this server hello", code="unknown_handshake")
        started, hs = entry
        if now - started > self.config.handshake_timeout_s:
            raise SessionExpiredError("handshake took too long", code="handshake_expired")
        with self._timed("handshake_finish"):
            channel = hs.finish(body[32:])
        key = hs.device_key
        assert key is not None
        sid = channel.session_id.hex()
        expires = datetime.fromtimestamp(self._clock() + self.config.session_lifetime_s, UTC)
        self.store.add_session(sid, key.key_id, expires, created_at=datetime.fromtimestamp(self._clock(), UTC))
        with self._lock:
            old_sid = self._session_of.get(key.key_id)
            if old_sid is not None:  # one live session per device: a new handshake replaces it
                self._sessions.pop(old_sid, None)
            self._sessions[sid] = _Session(key.key_id, key, channel, threading.Lock())
            self._session_of[key.key_id] = sid
        self._seen(key.key_id)
        return sid.encode()

    def _finish_shared(self, shared: SharedState, body: bytes, now: float) -> bytes:
        """:meth:`_finish` on a pending handshake any process may have answered: taken from the store
        (exactly one process gets it), resumed, finished, and the session stored."""
        state = shared.take_pending(body[:32])
        if state is None:
            raise AuthError("no handshake in progress for this server hello", code="unknown_handshake")
        if now - state.started > self.config.handshake_timeout_s:
            raise SessionExpiredError("handshake took too long", code="handshake_expired")
        hs = ServerHandshake.resume(
            self.identity,
            self._resolve,
            state,
            policy=self.config.policy,
            handshake_timeout_s=self.config.handshake_timeout_s,
            max_plaintext=self.config.max_update_bytes,
            clock=self._clock,
        )
        with self._timed("handshake_finish"):
            hs.finish(body[32:])
        key = hs.device_key
        assert key is not None
        sid = shared.add_session(state, key, self._clock())
        self._seen(key.key_id)
        return sid.encode()

    def _session(self, session_id: str | None) -> _Session:
        if self._shared is not None:
            found = self._shared.session(session_id)
            return _Session(found.device_id, found.key, found.channel, threading.Lock(), found.status)
        sess = self._sessions.get(session_id or "")
        if sess is None:
            raise AuthError("unknown or closed session: run the handshake again", code="unknown_session")
        if sess.channel.expired():
            with self._lock:
                self._sessions.pop(session_id or "", None)
                if self._session_of.get(sess.device_id) == session_id:
                    del self._session_of[sess.device_id]
            raise SessionExpiredError("session expired: run the handshake again", code="session_expired")
        return sess

    def check_upload_admissible(self, session_id: str | None) -> None:
        """Refuse, from the session id alone, an update that could not be accepted now.

        Raises what :meth:`handle` would: ``unknown_session``, ``session_expired``, ``wrong_round``,
        ``not_selected``, ``deadline_passed``, ``unknown_device``, ``revoked``.  A cheap query for the HTTP
        layer before it gives an upload a slot or reads its body: it takes no session lock and records
        nothing, and it proves nothing about the sender (the session id is a cleartext header), so
        :meth:`handle` authenticates the frame and checks everything again.  A device whose update was
        already accepted in the round is admitted: its resend after a lost receipt gets a duplicate receipt.
        """
        sess = self._session(session_id)
        rnd = self.rounds.current
        if rnd is None:
            raise WrongRoundError("no round is open", code="wrong_round")
        if sess.device_id not in rnd.selected:
            raise RoundError(f"device was not selected for round {rnd.number}", code="not_selected")
        if rnd.closing and sess.device_id not in rnd.accepted:
            raise RoundError(f"round {rnd.number} is being published: it takes no more updates", code="round_not_open")
        if self._clock() >= rnd.deadline:
            raise RoundError(f"round {rnd.number} is past its deadline", code="deadline_passed")
        self._check_active(sess)

    def _check_active(self, sess: _Session) -> None:
        status = self.store.device_status(sess.device_id) if sess.status is None else sess.status
        if status is None:
            raise UnknownDeviceError("device is no longer enrolled", code="unknown_device")
        if status not in ("active", "quarantined"):
            raise RevokedError("device has been revoked", code="revoked")

    # ------------------------------------------------------------------ round endpoints
    def _task(self, sess: _Session, body: bytes) -> bytes:
        open_task_request(sess.channel, body)
        rm = self.rounds
        rnd = rm.current
        if rnd is None:
            info = TaskInfo(0, "finished" if rm.finished else "waiting", False, rm.model.sha256, rm.model.version)
        else:
            # a round whose publication waits for storage takes no more updates: nobody is asked to train
            submitted = sess.device_id in rnd.accepted
            if rnd.secure is not None:
                secure = rnd.secure
                info = TaskInfo(
                    rnd.number,
                    "open",
                    sess.device_id in rnd.selected and not rnd.closing,
                    rnd.base.sha256,
                    rnd.base.version,
                    rnd.deadline,
                    secure.submitted(sess.device_id) and not rnd.closing,
                    secure.phase.value,
                )
                return seal_task(sess.channel, info.to_bytes())
            info = TaskInfo(
                rnd.number,
                "open",
                sess.device_id in rnd.selected and (submitted or not rnd.closing),
                rnd.base.sha256,
                rnd.base.version,
                rnd.deadline,
                sess.device_id in rnd.accepted,
            )
        return seal_task(sess.channel, info.to_bytes())

    def _model(self, sess: _Session, body: bytes) -> bytes:
        version = open_model_request(sess.channel, body)
        model = self.rounds.model
        if version != model.version:
            raise StaleModelError(f"model version {version} is not the current {model.version}", code="stale_model")
        return seal_model(sess.channel, model.version, model.envelope, model.blob)

    def _proof(self, sess: _Session, body: bytes) -> bytes:
        """The round's signed ledger entry and this device's inclusion proof (or left-out reason) in it."""
        number = open_proof_request(sess.channel, body)
        row = self.store.ledger_entry_for_round(number)
        if row is None:
            stored = self.store.get_round(number)
            if stored is None or stored.state not in ("closed", "failed"):
                raise RoundError(
                    f"round {number} has not closed yet: ask for its proof once it has", code=ErrorCode.ROUND_NOT_CLOSED
                )
            raise NotFoundError(
                f"round {number} closed before the provenance ledger existed: it has no entry",
                code=ErrorCode.NO_LEDGER_ENTRY,
            )
        return seal_proof(sess.channel, number, answer_for(entry_of(row), sess.device_id))

    def _secagg(self, sess: _Session, route: Route, body: bytes) -> bytes:
        """A secure-aggregation request (docs/protocol.md): its frame is bound to the open round."""
        rnd = self.rounds.current
        if rnd is None:
            raise WrongRoundError("no round is open", code="wrong_round")
        frame, fewest, most = inbound(route)
        parts = open_parts(sess.channel, frame, rnd.number, body, min_parts=fewest, max_parts=most)
        reply, out = self.rounds.secure_message(sess.device_id, route, rnd.number, parts)
        return seal_parts(sess.channel, reply, rnd.number, out)

    def _update(self, sess: _Session, body: bytes) -> bytes:
        if len(body) > self.config.max_update_bytes:
            raise OversizeError(f"update of {len(body)} bytes exceeds {self.config.max_update_bytes}")
        rnd = self.rounds.current
        if rnd is None and self.rounds.clustered:
            rnd = self.rounds.catch_up()
        if rnd is None:
            raise WrongRoundError("no round is open", code="wrong_round")
        with self._timed("update_open"):
            try:
                opened = open_update(sess.channel, sess.key, body, rnd.number, base_model_hash=rnd.base.sha256)
            except QflareError as exc:
                # a cluster's worker follows the rounds at its steps: one that has not seen this round open
                # yet catches up once (the frame's round is checked before its counter is used)
                fresh = self.rounds.catch_up() if exc.code == ErrorCode.WRONG_ROUND and self.rounds.clustered else None
                if fresh is None or fresh.number == rnd.number:
                    raise
                rnd = fresh
                opened = open_update(sess.channel, sess.key, body, rnd.number, base_model_hash=rnd.base.sha256)
        examples = opened.num_examples
        if not 1 <= examples <= _MAX_EXAMPLES:
            raise ValidationError(f"example count {examples} is outside 1..{_MAX_EXAMPLES}", code="bad_example_count")
        metrics = opened.metrics()
        digest = opened.update_hash
        flat = decode_blob(opened.blob, self.layout, kind="update", verified_sha256=digest).flat
        update = ClientUpdate(sess.device_id, flat, examples, metrics)
        count, duplicate = self.rounds.accept(
            update,
            digest,
            opened.base_model_hash,
            opened.signature,
            opened.hashed if opened.hashed is not None else opened.blob,  # hashed once, in open_update
            round_number=rnd.number,
            envelope=opened.envelope.raw,
        )
        status = AckStatus.DUPLICATE if duplicate else AckStatus.ACCEPTED
        receipt = Receipt(rnd.number, digest, count, duplicate)
        with self._timed("update_ack"):
            ack = sign_update_ack(self.identity, sess.channel.suite, opened, status, int(self._clock()))
            return seal_receipt(sess.channel, rnd.number, ack, receipt.to_bytes())
