"""The coordinator: enrollment, sessions and the round endpoints, bytes in and bytes out.

The same object serves the in-process simulation and the HTTP server (whose routes only parse HTTP and
call :meth:`Coordinator.handle`).  Every refusal raises a typed :class:`~qflare.errors.QflareError`,
changes no state, and is recorded as a security event with its reason code.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
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
    open_task_request,
    open_update,
    seal_model,
    seal_receipt,
    seal_task,
    sign_update_ack,
)
from ..crypto.envelope import u64
from ..errors import (
    AuthError,
    MalformedError,
    OversizeError,
    ProtocolError,
    QflareError,
    RevokedError,
    RoundError,
    SessionExpiredError,
    StaleModelError,
    UnknownDeviceError,
    ValidationError,
    WrongRoundError,
)
from ..strategy import ClientUpdate, Pipeline
from ..wire import ParamLayout, decode_blob
from .messages import Receipt, Route, TaskInfo
from .rounds import PublishedModel, RoundConfig, RoundManager
from .store import BlobSink, CoordinatorStore

__all__ = ["Coordinator", "CoordinatorConfig"]

_PENDING_LIMIT = 10_000
_MAX_EXAMPLES = 2**31 - 1  # the database column's range


@dataclass(frozen=True)
class CoordinatorConfig:
    suite: Suite = DEFAULT_SUITE
    policy: Policy = DEFAULT_POLICY
    session_lifetime_s: int = 3600
    max_update_bytes: int = 64 * 1024 * 1024
    handshake_timeout_s: float = 30.0


@dataclass
class _Session:
    device_id: str
    key: VerifyKey
    channel: Channel
    lock: threading.Lock


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
    ) -> None:
        self.config = config or CoordinatorConfig()
        self.config.policy.check(self.config.suite)
        if identity.alg != self.config.suite.sig:
            raise AuthError(f"coordinator key is {identity.alg}, suite needs {self.config.suite.sig}")
        self.identity, self.store, self.layout = identity, store, layout
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._pending: dict[str, ServerHandshake] = {}
        self._lock = threading.Lock()
        self.event_filter: Callable[[str, str, str | None, str | None], str | None] | None = None
        """When set, every security event passes it first: ``(reason, detail, remote, device_id)`` ->
        the detail to record, or None to record nothing (the HTTP server throttles floods with it)."""
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
        )

    @property
    def public_key(self) -> VerifyKey:
        return self.identity.public

    # ------------------------------------------------------------------ admin
    def create_tokens(self, count: int = 1, ttl_s: float = 3600.0, label: str = "") -> list[str]:
        """Mint one-time enrollment tokens (only their hashes are stored)."""
        return self.store.create_tokens(count, timedelta(seconds=ttl_s), label)

    def revoke(self, device_id: str, reason: str) -> None:
        """Revoke a device: its sessions die and its next message is refused."""
        self.store.revoke_device(device_id, reason)
        with self._lock:
            for sid in [s for s, v in self._sessions.items() if v.device_id == device_id]:
                del self._sessions[sid]

    # ------------------------------------------------------------------ dispatch
    def handle(
        self, route: Route | str, body: bytes, *, session_id: str | None = None, remote: str | None = None
    ) -> bytes:
        """Serve one request.  Refusals raise a QflareError after being recorded as security events.

        A refusal under a session names the session's device (``exc.device_id`` and the event) only when
        a frame authenticated under it in this request: the session id is a cleartext header, so a frame
        that fails before or at AEAD authentication is from an unauthenticated sender."""
        device_id: str | None = None
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
                        return self._task(sess, body)
                    if route is Route.MODEL:
                        return self._model(sess, body)
                    return self._update(sess, body)
                except QflareError as exc:
                    if sess.channel.last_recv_counter != received:  # only an authenticated frame advances it
                        exc.device_id = sess.device_id
                    raise
        except QflareError as exc:
            if isinstance(exc, (ProtocolError, ValidationError)):
                device_id = exc.device_id
                detail = f"{getattr(route, 'value', route)}: {exc}"
                if sess is not None and device_id is None:
                    detail += " (unauthenticated sender: no frame authenticated under this session)"
                self._event(exc.code, detail, device_id, session_id, remote)
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
        env = SignedEnvelope.parse(body, expected_type=MsgType.ENROLL_REQUEST)
        suite = self.config.policy.check(env.suite)
        key = VerifyKey.from_bytes(suite.sig, env.get(Field.SIGNING_PUBLIC))
        env.verify(key)  # proof of possession of the signing key
        if env.get(Field.DEVICE_ID).decode("utf-8", "replace") != key.key_id:
            raise AuthError("device id must be the key id of the presented key", code="device_id_mismatch")
        now = int(self._clock())
        if abs(env.get_int(Field.TIMESTAMP) - now) > 300:
            raise AuthError("enrollment request timestamp is more than 5 minutes off", code="stale_request")
        record = SignedEnvelope.sign(
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
        token = env.get(Field.ENROLL_TOKEN).decode("utf-8", "replace")
        self.store.enroll_device(token, key.key_id, suite.sig, key.raw, record)
        return record

    # ------------------------------------------------------------------ sessions
    def _resolve(self, key_id: str) -> VerifyKey | None:
        row = self.store.get_device(key_id)
        if row is None:
            return None
        if row.status != "active":
            exc = RevokedError(f"device {key_id[:16]}... is revoked", code="revoked")
            exc.device_id = key_id  # known, though no session is: the security event names the device
            raise exc
        return VerifyKey.from_bytes(row.sig_alg, row.sig_public_key)

    def _hello(self, body: bytes) -> bytes:
        hs = ServerHandshake(
            self.identity,
            self._resolve,
            policy=self.config.policy,
            lifetime_s=self.config.session_lifetime_s,
            handshake_timeout_s=self.config.handshake_timeout_s,
            max_plaintext=self.config.max_update_bytes,
            clock=self._clock,
        )
        reply = hs.respond(body)
        key = hashlib.sha256(reply).hexdigest()
        with self._lock:
            if len(self._pending) >= _PENDING_LIMIT:
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = hs
        return reply

    def _finish(self, body: bytes) -> bytes:
        """Body: ``SHA-256(server hello) || CLIENT_FINISH``; returns the session id (hex, ASCII)."""
        if len(body) < 32:
            raise MalformedError("handshake finish is truncated", code="truncated")
        with self._lock:
            hs = self._pending.pop(body[:32].hex(), None)
        if hs is None:
            raise AuthError("no handshake in progress for this server hello", code="unknown_handshake")
        channel = hs.finish(body[32:])
        key = hs.device_key
        assert key is not None
        sid = channel.session_id.hex()
        expires = datetime.fromtimestamp(self._clock() + self.config.session_lifetime_s, UTC)
        self.store.add_session(sid, key.key_id, expires, created_at=datetime.fromtimestamp(self._clock(), UTC))
        with self._lock:
            for old_sid in [s for s, v in self._sessions.items() if v.device_id == key.key_id]:
                del self._sessions[old_sid]  # one live session per device: a new handshake replaces it
            self._sessions[sid] = _Session(key.key_id, key, channel, threading.Lock())
        return sid.encode()

    def _session(self, session_id: str | None) -> _Session:
        sess = self._sessions.get(session_id or "")
        if sess is None:
            raise AuthError("unknown or closed session: run the handshake again", code="unknown_session")
        if sess.channel.expired():
            with self._lock:
                self._sessions.pop(session_id or "", None)
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
        if self._clock() >= rnd.deadline:
            raise RoundError(f"round {rnd.number} is past its deadline", code="deadline_passed")
        self._check_active(sess)

    def _check_active(self, sess: _Session) -> None:
        status = self.store.device_status(sess.device_id)
        if status is None:
            raise UnknownDeviceError("device is no longer enrolled", code="unknown_device")
        if status != "active":
            raise RevokedError("device has been revoked", code="revoked")

    # ------------------------------------------------------------------ round endpoints
    def _task(self, sess: _Session, body: bytes) -> bytes:
        open_task_request(sess.channel, body)
        rm = self.rounds
        rnd = rm.current
        if rnd is None:
            info = TaskInfo(0, "finished" if rm.finished else "waiting", False, rm.model.sha256, rm.model.version)
        else:
            info = TaskInfo(
                rnd.number,
                "open",
                sess.device_id in rnd.selected,
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

    def _update(self, sess: _Session, body: bytes) -> bytes:
        if len(body) > self.config.max_update_bytes:
            raise OversizeError(f"update of {len(body)} bytes exceeds {self.config.max_update_bytes}")
        rnd = self.rounds.current
        if rnd is None:
            raise WrongRoundError("no round is open", code="wrong_round")
        opened = open_update(sess.channel, sess.key, body, rnd.number, base_model_hash=rnd.base.sha256)
        examples = opened.num_examples
        if not 1 <= examples <= _MAX_EXAMPLES:
            raise ValidationError(f"example count {examples} is outside 1..{_MAX_EXAMPLES}", code="bad_example_count")
        metrics = opened.metrics()
        digest = opened.update_hash
        flat = decode_blob(opened.blob, self.layout, kind="update", verified_sha256=digest).flat
        update = ClientUpdate(sess.device_id, flat, examples, metrics)
        count, duplicate = self.rounds.accept(
            update, digest, opened.base_model_hash, opened.signature, opened.blob, round_number=rnd.number
        )
        status = AckStatus.DUPLICATE if duplicate else AckStatus.ACCEPTED
        ack = sign_update_ack(self.identity, sess.channel.suite, opened, status, int(self._clock()))
        receipt = Receipt(rnd.number, digest, count, duplicate)
        return seal_receipt(sess.channel, rnd.number, ack, receipt.to_bytes())
