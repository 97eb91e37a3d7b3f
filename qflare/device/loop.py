"""A long-running federated device: enroll once, then train whenever the coordinator selects it.

:class:`DeviceClient` wraps a :class:`~qflare.protocol.Device` (which does the cryptography) with what a
real device process needs: a persistent :class:`~qflare.device.state.DeviceState`, a work loop that
polls for tasks, trains on local data and submits, and recovery from a coordinator that restarts or
drops connections (re-handshake, resend of an update whose acknowledgement was lost - the coordinator
acknowledges a repeat as ``duplicate``, so a resend never counts twice).

Everything travels through a :class:`~qflare.protocol.Transport`, so the same loop runs over HTTP
(``qflare client``) and in process (tests).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..crypto import DEFAULT_SUITE, Field, MsgType, SignedEnvelope, Suite, VerifyKey
from ..errors import AuthError, CircuitOpenError, ConfigError, ErrorCode, QflareError, RateLimitedError, Retry
from ..protocol import Device, Receipt, SignedUpdate, TaskInfo, Transport
from .state import DeviceState
from .workload import Workload

__all__ = ["DeviceClient", "RunSummary", "default_state_dir"]

log = logging.getLogger("qflare.client")


@dataclass
class RunSummary:
    device_id: str
    reason: str  # "finished", "max_rounds" or "stopped"
    rounds_trained: list[int] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    last_round: int = 0
    model_version: int = 0
    sessions: int = 0


class DeviceClient:
    """A device process's protocol loop (see the module docstring)."""

    def __init__(
        self,
        *,
        transport: Transport,
        state: DeviceState,
        server_key: VerifyKey,
        workload: Workload,
        suite: Suite = DEFAULT_SUITE,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.state, self.server_key, self.workload = state, server_key, workload
        self._sleep, self._rng = sleep, rng or random.Random()
        identity, created = state.signing_key(suite.sig)
        if created:
            log.info("generated device key %s... in %s", identity.key_id[:16], state.key_path)
        self.device = Device(
            transport=transport,
            identity=identity,
            server_key=server_key,
            layout=workload.layout,
            suite=suite,
            clock=clock,
        )
        self._pending: tuple[SignedUpdate, str] | None = None  # (update, base model hash)
        self._skipped: set[int] = set()
        self._seen_round = 0

    @property
    def device_id(self) -> str:
        return self.device.device_id

    # ------------------------------------------------------------------ enrollment
    def ensure_enrolled(self, token: str | None) -> bool:
        """Enroll with ``token`` unless a valid record is on disk; True when this call enrolled."""
        record = self.state.load_record()
        if record is not None:
            self._check_record(record)
            self.device.enrollment_record = record
            log.info("device %s... already enrolled (record in %s)", self.device_id[:16], self.state.dir)
            return False
        if not token:
            raise ConfigError(
                "this device is not enrolled yet: give a one-time enrollment token (--token)",
                code=ErrorCode.NOT_ENROLLED,
            )
        record = self.device.enroll(token)
        self.state.save_record(record)
        log.info("device %s... enrolled with coordinator %s...", self.device_id[:16], self.server_key.key_id[:16])
        return True

    def _check_record(self, record: bytes) -> None:
        try:
            env = SignedEnvelope.open(record, self.server_key, expected_type=MsgType.ENROLL_RECORD)
        except QflareError as exc:
            raise AuthError(
                f"enrollment record in {self.state.dir} was not issued by the pinned coordinator ({exc})",
                code=ErrorCode.ENROLLMENT_MISMATCH,
            ) from None
        if env.get(Field.DEVICE_KEY_ID) != self.device.identity.key_id_bytes:
            raise AuthError(
                f"enrollment record in {self.state.dir} is for another device key", code=ErrorCode.ENROLLMENT_MISMATCH
            )

    # ------------------------------------------------------------------ work loop
    def run(
        self,
        *,
        max_rounds: int | None = None,
        poll_interval: float = 1.0,
        give_up_after_s: float = 300.0,
        max_refusals: int = 20,
        stop: threading.Event | None = None,
    ) -> RunSummary:
        """Serve rounds until the federation finishes (or ``max_rounds`` updates were acknowledged).

        What an error leads to is its :attr:`~qflare.errors.QflareError.retry` meaning: ``TRANSIENT``
        failures (server down or restarting, rate limits) are waited out, for up to ``give_up_after_s``
        when the coordinator is unreachable; ``RENEW_SESSION`` and ``DROP_UPDATE`` refusals are logged
        and retried after a re-handshake (the latter discarding the pending update), up to
        ``max_refusals`` in a row; ``SKIP_ROUND`` discards the update and sits the round out; ``FATAL``
        errors are raised at once."""
        summary = RunSummary(self.device_id, "stopped")
        connected, refusals, unreachable_since, failures = False, 0, None, 0
        while stop is None or not stop.is_set():
            try:
                if not connected:
                    sid = self.device.connect()
                    connected = True
                    summary.sessions += 1
                    log.info("session %s... open (post-quantum handshake done)", sid[:12])
                task = self.device.task()
                unreachable_since, failures = None, 0
                summary.last_round, summary.model_version = task.round, task.model_version
                if task.state == "finished":
                    log.info("federation finished at model version %d", task.model_version)
                    summary.reason = "finished"
                    return summary
                receipt = self._work(task)
                refusals = 0
                if receipt is not None:
                    summary.receipts.append(receipt)
                    if task.round not in summary.rounds_trained:
                        summary.rounds_trained.append(task.round)
                    if max_rounds is not None and len(summary.rounds_trained) >= max_rounds:
                        summary.reason = "max_rounds"
                        return summary
                    continue
                self._sleep(poll_interval * self._rng.uniform(0.5, 1.5))
            except QflareError as exc:
                retry = exc.retry
                if retry is Retry.TRANSIENT and isinstance(exc, RateLimitedError):
                    # the session is fine: wait as told, without a new handshake
                    wait = exc.retry_after_s * self._rng.uniform(1.0, 1.5)
                    log.warning("refused [%s] %s; waiting %.1f s", exc.code, exc, wait)
                    self._sleep(wait)
                elif retry is Retry.TRANSIENT:
                    connected = False
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > give_up_after_s:
                        raise
                    failures += 1
                    if isinstance(exc, CircuitOpenError):
                        wait = exc.retry_in_s
                    else:
                        wait = min(poll_interval * 2**failures, 10.0)
                    wait *= self._rng.uniform(0.8, 1.2)
                    log.warning("coordinator unreachable [%s] %s; retrying in %.1f s", exc.code, exc, wait)
                    self._sleep(wait)
                elif retry is Retry.SKIP_ROUND:
                    log.error("round %d skipped: [%s] %s", summary.last_round, exc.code, exc)
                    self._skipped.add(summary.last_round)
                    self._pending = None
                else:
                    log.warning("refused [%s] %s", exc.code, exc)
                    if retry is Retry.FATAL:
                        raise  # a refusal retrying cannot fix, or a local error (configuration, data, training)
                    if retry is Retry.DROP_UPDATE:
                        self._pending = None
                    refusals += 1
                    if refusals >= max_refusals:
                        raise
                    connected = False  # start over on a fresh session: channel state is then surely in step
                    self._sleep(poll_interval * self._rng.uniform(0.5, 1.5))
        return summary

    def _work(self, task: TaskInfo) -> Receipt | None:
        """Act on one task: train and submit, resend an unconfirmed update, or nothing (None)."""
        pending = self._pending
        if pending is not None and (pending[0].round != task.round or pending[1] != task.model_hash):
            log.info("dropping the update for round %d: that round is over", pending[0].round)
            self._pending = pending = None
        if task.state == "open" and task.round != self._seen_round:
            self._seen_round = task.round
            log.info("round %d open: %s", task.round, "selected" if task.selected else "not selected, waiting")
        if task.state != "open" or not task.selected or task.round in self._skipped:
            return None
        if pending is None:
            if task.submitted:
                return None  # acknowledged earlier
            model = self.device.fetch_model(task)
            result = self.workload.train(model.flat, task.round)
            log.info(
                "round %d: trained on %d examples in %.2f s (loss %.4f)",
                task.round,
                result.num_examples,
                result.duration_s,
                result.mean_loss,
            )
            pending = self._pending = (self.device.prepare_update(task, model, result), model.sha256)
        else:
            log.info(
                "round %d: resending update %s... whose acknowledgement was lost",
                task.round,
                pending[0].update_hash[:12],
            )
        receipt = self.device.submit(pending[0])
        self._pending = None
        self.state.append_receipt(self.device_id, receipt)
        log.info(
            "round %d: update %s... acknowledged (%d in the round%s)",
            receipt.round,
            receipt.update_hash[:12],
            receipt.updates_in_round,
            ", duplicate" if receipt.duplicate else "",
        )
        return receipt


def default_state_dir(index: int) -> Path:
    """``~/.local/state/qflare/device-<index>`` (``$XDG_STATE_HOME`` respected)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "qflare" / f"device-{index}"
