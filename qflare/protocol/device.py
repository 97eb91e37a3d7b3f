"""The device side of the protocol: enroll, handshake, fetch and verify the global model, sign and send
updates.

A :class:`Device` knows nothing about how its bytes travel: it is given a :class:`Transport`
(:class:`~qflare.transport.InProcessTransport` for simulation, :class:`~qflare.transport.HttpTransport`
for deployment).  Every round frame is built and checked by the recipes of :mod:`qflare.crypto.payloads`.
Training itself is done by a :class:`~qflare.training.LocalTrainer` handed in by the caller, so one
trainer (one model instance) can serve many simulated devices.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from ..crypto import (
    DEFAULT_POLICY,
    DEFAULT_SUITE,
    AckStatus,
    Channel,
    ClientHandshake,
    Field,
    MsgType,
    Policy,
    SignedEnvelope,
    SignedUpdate,
    SigningKey,
    Suite,
    VerifyKey,
    open_global_model,
    open_task,
    seal_model_request,
    seal_task_request,
    seal_update,
    sign_update,
)
from ..crypto.envelope import u64
from ..crypto.payloads import open_proof, open_signed_receipt, seal_proof_request
from ..errors import ArchitectureMismatchError, AuthError, SessionExpiredError, ValidationError
from ..training import TrainResult
from ..wire import ParamLayout, decode_blob, encode_update
from .messages import Receipt, Route, TaskInfo
from .proofs import VerifiedProof, verify_answer

__all__ = ["Device", "GlobalModel", "SignedUpdate", "Transport"]

_T = TypeVar("_T")


class Transport(Protocol):
    """Carries one request to the coordinator and returns its response bytes (or raises its error)."""

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes: ...


@dataclass(frozen=True)
class GlobalModel:
    version: int
    sha256: str
    flat: torch.Tensor


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

    def reset_session(self) -> None:
        """Forget the session: the next call runs the handshake again (e.g. after a key rotation)."""
        self._channel, self._session_id = None, None

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

    def _call(self, route: Route, seal: Callable[[Channel], bytes], open_: Callable[[Channel, bytes], _T]) -> _T:
        """One sealed request/response on the session (re-handshakes once if the session expired)."""
        for attempt in (0, 1):
            if self._channel is None or self._channel.expired():
                self.connect()
            channel, sid = self._channel, self._session_id
            assert channel is not None
            try:
                with self._lock:
                    reply = self.transport.request(route, seal(channel), sid)
                    return open_(channel, reply)
            except (SessionExpiredError, AuthError) as exc:
                if attempt or exc.code not in ("session_expired", "unknown_session"):
                    raise
                self._channel = None
        raise AssertionError("unreachable")

    def exchange(self, route: Route, seal: Callable[[Channel], bytes], open_: Callable[[Channel, bytes], _T]) -> _T:
        """One sealed request on the session, built by ``seal`` and its reply checked by ``open_`` (the
        secure-aggregation phases of :mod:`qflare.protocol.secure_device` use it)."""
        return self._call(route, seal, open_)

    # ------------------------------------------------------------------ round steps
    def task(self) -> TaskInfo:
        return TaskInfo.from_bytes(self._call(Route.TASK, seal_task_request, open_task))

    def fetch_model(self, task: TaskInfo) -> GlobalModel:
        """Download the global model named by ``task``; verify the coordinator's signature and hash."""
        _, blob = self._call(
            Route.MODEL,
            lambda ch: seal_model_request(ch, task.model_version),
            lambda ch, reply: open_global_model(ch, self.server_key, reply, task.model_version, task.model_hash),
        )
        try:
            flat = decode_blob(blob, self.layout, kind="model", verified_sha256=task.model_hash).flat
        except ValidationError as exc:  # the coordinator signed it: the models differ, nothing in transit
            raise ArchitectureMismatchError(
                f"the coordinator's signed model version {task.model_version} does not fit this device's "
                f"model: {exc.message} (check --model and the federation spec)",
                code="incompatible_model",
            ) from None
        return GlobalModel(task.model_version, task.model_hash, flat)

    def prepare_update(self, task: TaskInfo, model: GlobalModel, result: TrainResult) -> SignedUpdate:
        """Serialise and sign an update (round, base hash, update hash, examples, training metrics)."""
        blob = encode_update(self.layout, result.delta, {"round": str(task.round)})
        metrics = {"loss": result.mean_loss, "train_s": result.duration_s, "steps": float(result.steps)}
        return sign_update(self.identity, self.suite, task.round, model.sha256, result.num_examples, blob, metrics)

    def submit(self, update: SignedUpdate) -> Receipt:
        """Send a signed update; verify the coordinator's signed receipt."""
        return self.submit_signed(update)[0]

    def submit_signed(self, update: SignedUpdate) -> tuple[Receipt, bytes]:
        """:meth:`submit`, also returning the verified UPDATE_ACK envelope (proof of delivery to keep)."""
        status, ack, body = self._call(
            Route.UPDATE,
            lambda ch: seal_update(ch, update),
            lambda ch, reply: open_signed_receipt(ch, self.server_key, reply, self.identity.key_id, update),
        )
        receipt = Receipt.from_bytes(bytes(body))
        if (
            receipt.round != update.round
            or receipt.update_hash != update.update_hash
            or receipt.duplicate != (status is AckStatus.DUPLICATE)
        ):
            raise AuthError("receipt disagrees with the signed acknowledgement", code="bad_receipt")
        return receipt, ack

    def fetch_proof(
        self,
        round_number: int,
        update_hash: str,
        examples: int,
        *,
        former_keys: Mapping[str, VerifyKey] | None = None,
        revoked: Collection[str] = (),
    ) -> tuple[VerifiedProof, bytes]:
        """After ``round_number`` closed: fetch its signed ledger entry and this device's inclusion proof
        (or left-out reason) for the update ``update_hash`` of ``examples`` examples, and verify them
        (:func:`qflare.protocol.proofs.verify_answer`; AuthError ``bad_inclusion_proof``).  The entry may be
        signed by the pinned key or by one of ``former_keys`` (keys this device followed a verified
        rotation away from), never by a ``revoked`` key.  A round that has not closed yet is RoundError
        ``round_not_closed``.  Returns the verified proof and the answer's bytes (to store and re-check)."""
        keys = {**(former_keys or {}), self.server_key.key_id: self.server_key}
        raw = self._call(
            Route.PROOF,
            lambda ch: seal_proof_request(ch, round_number),
            lambda ch, reply: open_proof(ch, reply, round_number),
        )
        verified = verify_answer(
            raw,
            round_number=round_number,
            device_id=self.identity.key_id,
            update_hash=update_hash,
            examples=examples,
            keys=keys,
            revoked=revoked,
        )
        return verified, raw
