"""The device side of the protocol: enroll, handshake, fetch and verify the global model, seal updates.

A :class:`Device` knows nothing about how its bytes travel: it is given a
:class:`~qflare.transport.Transport` (in-process for simulation, HTTP for deployment).  Training itself
is done by a :class:`~qflare.training.LocalTrainer` handed in by the caller, so one trainer (one model
instance) can serve many simulated devices.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..crypto import (
    DEFAULT_POLICY,
    DEFAULT_SUITE,
    Channel,
    ClientHandshake,
    Field,
    MsgType,
    Policy,
    SignedEnvelope,
    SigningKey,
    Suite,
    VerifyKey,
    pack_signed,
    unpack_signed,
)
from ..crypto.envelope import u64
from ..errors import AuthError, SessionExpiredError, StaleModelError, ValidationError
from ..training import TrainResult
from ..wire import ParamLayout, decode_blob, encode_update, sha256_hex
from .messages import Frame, Receipt, Route, TaskInfo, encode_json

__all__ = ["Device", "GlobalModel", "SealedUpdate", "Transport"]


class Transport(Protocol):
    """Carries one request to the coordinator and returns its response bytes (or raises its error)."""

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes: ...


@dataclass(frozen=True)
class GlobalModel:
    version: int
    sha256: str
    flat: torch.Tensor


@dataclass(frozen=True)
class SealedUpdate:
    """An update signed by the device, ready to be sealed in the channel and sent."""

    round: int
    payload: bytes  # pack_signed(UPDATE envelope, update blob)
    update_hash: str


class Device:
    """One federated device (see the module docstring).  ``server_key`` is pinned: no other is accepted."""

    def __init__(
        self,
        *,
        transport: Transport,
        identity: SigningKey,
        server_key: VerifyKey,
        layout: ParamLayout,
        suite: Suite = DEFAULT_SUITE,
        policy: Policy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport, self.identity, self.server_key = transport, identity, server_key
        self.layout, self.suite, self.policy, self._clock = layout, suite, policy, clock
        self._channel: Channel | None = None
        self._session_id: str | None = None
        self._lock = threading.Lock()
        self.enrollment_record: bytes | None = None

    @property
    def device_id(self) -> str:
        return self.identity.key_id

    # ------------------------------------------------------------------ enrollment and session
    def enroll(self, token: str) -> bytes:
        """Present a one-time token and our public key, signed (proof of possession)."""
        req = SignedEnvelope.sign(
            self.suite,
            MsgType.ENROLL_REQUEST,
            {
                Field.DEVICE_ID: self.identity.key_id.encode(),
                Field.SIGNING_PUBLIC: self.identity.public.raw,
                Field.ENROLL_TOKEN: token.encode(),
                Field.CLIENT_NONCE: os.urandom(32),
                Field.TIMESTAMP: u64(int(self._clock())),
            },
            self.identity,
        ).to_bytes()
        record = self.transport.request(Route.ENROLL, req)
        env = SignedEnvelope.open(record, self.server_key, expected_type=MsgType.ENROLL_RECORD)
        if env.get(Field.DEVICE_KEY_ID) != self.identity.public.key_id_bytes:
            raise AuthError("enrollment record is for another device", code="device_mismatch")
        self.enrollment_record = record
        return record

    def connect(self) -> str:
        """Run the mutually authenticated handshake; returns the session id."""
        hs = ClientHandshake(self.identity, self.server_key, suite=self.suite, policy=self.policy, clock=self._clock)
        reply = self.transport.request(Route.HELLO, hs.start())
        finish, channel = hs.finish(reply)
        sid = self.transport.request(Route.FINISH, hashlib.sha256(reply).digest() + finish)
        if sid.decode("ascii", "replace") != channel.session_id.hex():
            raise AuthError("coordinator confirmed another session id", code="session_mismatch")
        self._channel, self._session_id = channel, channel.session_id.hex()
        return self._session_id

    def _call(self, route: Route, send_type: Frame, recv_type: Frame, rnd: int, recv_round: int, body: bytes) -> bytes:
        """One sealed request/response on the session (re-handshakes once if the session expired)."""
        for attempt in (0, 1):
            if self._channel is None or self._channel.expired():
                self.connect()
            channel, sid = self._channel, self._session_id
            assert channel is not None
            try:
                with self._lock:
                    frame = channel.seal(send_type, rnd, body)
                    reply = self.transport.request(route, frame, sid)
                    return channel.open(recv_type, recv_round, reply)
            except (SessionExpiredError, AuthError) as exc:
                if attempt or exc.code not in ("session_expired", "unknown_session"):
                    raise
                self._channel = None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ round steps
    def task(self) -> TaskInfo:
        return TaskInfo.from_bytes(self._call(Route.TASK, Frame.TASK_REQUEST, Frame.TASK, 0, 0, b""))

    def fetch_model(self, task: TaskInfo) -> GlobalModel:
        """Download the global model named by ``task``; verify the coordinator's signature and hash."""
        payload = self._call(
            Route.MODEL,
            Frame.MODEL_REQUEST,
            Frame.MODEL,
            0,
            task.model_version,
            encode_json({"version": task.model_version}),
        )
        head, blob = unpack_signed(payload)
        env = SignedEnvelope.open(head, self.server_key, expected_type=MsgType.GLOBAL_MODEL)
        digest = env.get(Field.MODEL_HASH).hex()
        if env.get_int(Field.MODEL_VERSION) != task.model_version or digest != task.model_hash:
            raise StaleModelError("coordinator sent a model other than the task's", code="stale_model")
        if env.get_int(Field.PAYLOAD_SIZE) != len(blob):
            raise ValidationError("model blob length differs from its signed size", code="hash_mismatch")
        flat = decode_blob(bytes(blob), self.layout, kind="model", expected_sha256=digest).flat
        return GlobalModel(task.model_version, digest, flat)

    def prepare_update(self, task: TaskInfo, model: GlobalModel, result: TrainResult) -> SealedUpdate:
        """Serialise and sign an update (round, base hash, update hash, examples, metadata)."""
        blob = encode_update(self.layout, result.delta, {"round": str(task.round)})
        digest = sha256_hex(blob)
        meta = {"loss": result.mean_loss, "train_s": result.duration_s, "steps": float(result.steps)}
        fields = {
            Field.DEVICE_KEY_ID: self.identity.public.key_id_bytes,
            Field.ROUND: u64(task.round),
            Field.BASE_MODEL_HASH: bytes.fromhex(model.sha256),
            Field.UPDATE_HASH: bytes.fromhex(digest),
            Field.NUM_EXAMPLES: u64(result.num_examples),
            Field.PAYLOAD_SIZE: u64(len(blob)),
        }
        if hasattr(Field, "METADATA"):
            fields[Field.METADATA] = encode_json(meta)
        env = SignedEnvelope.sign(self.suite, MsgType.UPDATE, fields, self.identity).to_bytes()
        return SealedUpdate(task.round, pack_signed(env, blob), digest)

    def submit(self, update: SealedUpdate) -> Receipt:
        """Send a prepared update; verify the coordinator's signed receipt."""
        payload = self._call(Route.UPDATE, Frame.UPDATE, Frame.RECEIPT, update.round, update.round, update.payload)
        head, body = unpack_signed(payload)
        env = SignedEnvelope.open(head, self.server_key, expected_type=MsgType.UPDATE_ACK)
        if env.get(Field.UPDATE_HASH).hex() != update.update_hash or env.get_int(Field.ROUND) != update.round:
            raise AuthError("receipt does not acknowledge this update", code="bad_receipt")
        return Receipt.from_bytes(bytes(body))
