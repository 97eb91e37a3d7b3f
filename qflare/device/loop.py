"""A long-running federated device: enroll once, then train whenever the coordinator selects it.

:class:`DeviceClient` wraps a :class:`~qflare.protocol.Device` (which does the cryptography) with what a
real device process needs: a persistent :class:`~qflare.device.state.DeviceState`, a work loop that
polls for tasks, trains on local data and submits, and recovery from a coordinator that restarts or
drops connections (re-handshake, resend of an update whose acknowledgement was lost - the coordinator
acknowledges a repeat as ``duplicate``, so a resend never counts twice).

Everything travels through a :class:`~qflare.protocol.Transport`, so the same loop runs over HTTP
(``qflare client``) and in process (tests).

Against a coordinator that is compromised or impersonated (``docs/protocol.md`` section 15) the loop
keeps these invariants: it never accepts a model version or round older than one it already accepted
(``progress.json``, ``model_rollback``); it trains at most once per (round, model version), at most
``max_trainings`` times per ``training_period_s``, and sleeps a jittered poll interval between polls
whatever the answers; every wait is capped; an error that did not come authenticated (a plain HTTP
error body) never stops it; and one ``patience`` bounds every phase (enrollment, handshake, work): a
device that sees nothing but failures for that long stops with ``patience_exhausted``.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..crypto import DEFAULT_SUITE, Field, MsgType, SignedEnvelope, Suite, VerifyKey
from ..errors import (
    AuthError,
    CircuitOpenError,
    ConfigError,
    ErrorCode,
    PatienceExhaustedError,
    QflareError,
    RateLimitedError,
    Retry,
    ServerUnavailableError,
    StaleModelError,
)
from ..protocol import Device, Receipt, SignedUpdate, TaskInfo, Transport
from ..training import TrainResult
from .proofs import Awaiting, awaiting_proof, collect
from .secure import SecureRounds
from .state import DeviceState
from .workload import Workload

__all__ = ["DeviceClient", "Patience", "RunSummary", "default_state_dir"]

log = logging.getLogger("qflare.client")
_T = TypeVar("_T")

MIN_POLL_INTERVAL_S = 0.05
"""The shortest pause between two polls, whatever the coordinator answers."""
MAX_WAIT_S = 60.0
"""The longest single wait (a Retry-After, a circuit breaker's cool-down) the loop obeys."""


class Patience:
    """How long a device keeps trying while it sees only failures (one budget for every phase).

    :meth:`failed` starts the clock at the first failure of a run of failures - at ``started``, when the
    caller says when the failed attempt began (its own retries count too) - and raises
    :class:`PatienceExhaustedError` once it has run longer than ``seconds``; :meth:`ok` stops it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self._clock = seconds, clock
        self.since: float | None = None

    def ok(self) -> None:
        self.since = None

    def remaining(self) -> float:
        """Seconds left before the current run of failures exhausts the patience (all of it if none)."""
        return self.seconds if self.since is None else max(self.seconds - (self._clock() - self.since), 0.0)

    def failed(self, exc: QflareError, what: str, started: float | None = None) -> None:
        now = self._clock()
        self.since = self.since if self.since is not None else (now if started is None else min(started, now))
        if now - self.since > self.seconds:
            raise PatienceExhaustedError(
                f"{what}: only failures for {now - self.since:.0f} s (patience {self.seconds:g} s); "
                f"last: [{exc.code}] {exc}"
            ) from exc


@dataclass
class RunSummary:
    device_id: str
    reason: str  # "finished", "max_rounds" or "stopped"
    rounds_trained: list[int] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    proofs: list[int] = field(default_factory=list)
    """Rounds whose receipt proof (inclusion proof or left-out reason) was fetched and verified."""
    proof_failures: list[int] = field(default_factory=list)
    """Rounds whose proof the coordinator refused or that did not verify (logged, kept in proofs.jsonl)."""
    last_round: int = 0
    model_version: int = 0
    sessions: int = 0


class DeviceClient:
    """A device process's protocol loop (see the module docstring).

    ``rekey``, when given (``qflare client`` passes :func:`qflare.device.rekey.repin`), is called when a
    handshake names another coordinator key than the pinned one: it returns the key a verified rotation
    chain leads to (having moved the pin) or raises; the loop then continues under the new key."""

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
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_trainings: int = 60,
        training_period_s: float = 3600.0,
        rekey: Callable[[], tuple[VerifyKey, Suite]] | None = None,
    ) -> None:
        if max_trainings < 1 or training_period_s <= 0:
            raise ConfigError("max_trainings must be >= 1 and training_period_s > 0", code="bad_argument")
        self.state, self.server_key, self.workload = state, server_key, workload
        self._sleep, self._rng, self._monotonic = sleep, rng or random.Random(), monotonic
        self.max_trainings, self.training_period_s = max_trainings, training_period_s
        identity, created = state.signing_key(suite.sig)
        if created:
            log.info("generated device key %s... in %s", identity.key_id[:16], state.key_path)
        state.save_server_key(server_key)
        self.device = Device(
            transport=transport,
            identity=identity,
            server_key=server_key,
            layout=workload.layout,
            suite=suite,
            clock=clock,
        )
        self._pending: tuple[SignedUpdate, str] | None = None  # (update, base model hash)
        self._pending_examples = 0  # the example count the pending update signs (for its receipt proof)
        self._skipped: set[int] = set()
        self._trained: set[tuple[int, int]] = set()  # (round, model version): at most one training each
        self._trainings: collections.deque[float] = collections.deque()  # monotonic times, last period
        self._seen_round = 0
        self._capped_logged = False
        self._rekey = rekey
        self._awaiting: Awaiting | None = awaiting_proof(state)  # survives a restart (receipts.jsonl)
        self._secure = SecureRounds(self.device, state, self._secure_train)  # secure-aggregation rounds

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, never more than :data:`MAX_WAIT_S` (nor less than nothing)."""
        self._sleep(min(max(seconds, 0.0), MAX_WAIT_S))

    def wait_out(self, step: Callable[[], _T], what: str, patience_s: float) -> _T:
        """``step()``, retried while it fails transiently or unauthenticated, for up to ``patience_s``.

        Authenticated refusals (and local errors) are raised at once; running out of patience raises
        :class:`PatienceExhaustedError` naming the last failure."""
        patience, failures = Patience(patience_s, self._monotonic), 0
        while True:
            started = self._monotonic()
            try:
                return step()
            except QflareError as exc:
                if exc.retry is not Retry.TRANSIENT and not exc.unauthenticated:
                    raise
                patience.failed(exc, what, started)
                failures += 1
                wait = _transient_wait(exc, min(0.5 * 2 ** min(failures, 6), 10.0)) * self._rng.uniform(0.8, 1.2)
                wait = min(wait, patience.remaining() + 0.05)  # the last try lands just past the patience
                log.warning("%s failed [%s] %s; retrying in %.1f s", what, exc.code, exc, wait)
                self._pause(wait)

    # ------------------------------------------------------------------ enrollment
    def ensure_enrolled(self, token: str | None, *, patience_s: float = 300.0) -> bool:
        """Enroll with ``token`` unless a valid record is on disk; True when this call enrolled.

        An unreachable or busy coordinator is waited out for up to ``patience_s``."""
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
        record = self.wait_out(lambda: self.device.enroll(token), "enrollment", patience_s)
        self.state.save_record(record)
        log.info("device %s... enrolled with coordinator %s...", self.device_id[:16], self.server_key.key_id[:16])
        return True

    def _check_record(self, record: bytes) -> None:
        """The stored enrollment record must be signed by the pinned key or by a former key this device
        moved away from through a verified rotation (it was received before that rotation)."""
        env, error = None, None
        for key in (self.server_key, *reversed(self.state.former_server_keys())):
            try:
                env = SignedEnvelope.open(record, key, expected_type=MsgType.ENROLL_RECORD)
                break
            except QflareError as exc:
                error = exc
        if env is None:
            raise AuthError(
                f"enrollment record in {self.state.dir} was not issued by the pinned coordinator ({error})",
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
        failures (server down or restarting, rate limits) are waited out; ``RENEW_SESSION`` and
        ``DROP_UPDATE`` refusals are logged and retried after a re-handshake (the latter discarding the
        pending update), up to ``max_refusals`` in a row; ``SKIP_ROUND`` discards the update and sits
        the round out; ``FATAL`` errors are raised at once - unless the error came unauthenticated (a
        plain HTTP error body, which anything on the path can send): those are waited out like
        ``TRANSIENT`` ones.  ``give_up_after_s`` is the patience: failures of any kind for longer than
        that raise :class:`PatienceExhaustedError`.  Between two polls the loop always sleeps
        ``poll_interval`` (at least :data:`MIN_POLL_INTERVAL_S`), jittered."""
        summary = RunSummary(self.device_id, "stopped")
        poll_interval = max(poll_interval, MIN_POLL_INTERVAL_S)
        patience = Patience(give_up_after_s, self._monotonic)
        connected, refusals, failures, rekey = False, 0, 0, False
        while stop is None or not stop.is_set():
            try:
                if rekey:
                    self._follow_rotation()
                    rekey = False
                if not connected:
                    sid = self.device.connect()
                    connected = True
                    summary.sessions += 1
                    log.info("session %s... open (post-quantum handshake done)", sid[:12])
                task = self.device.task()
                summary.last_round, summary.model_version = task.round, task.model_version
                self._check_rollback(task)
                self._collect_proof(task, summary)
                if task.state == "finished":
                    log.info("federation finished at model version %d", task.model_version)
                    summary.reason = "finished"
                    return summary
                receipt = self._work(task)
                refusals = failures = 0
                patience.ok()
                if receipt is not None or task.round in self._secure.done:
                    if receipt is not None:
                        summary.receipts.append(receipt)
                    if task.round not in summary.rounds_trained:
                        summary.rounds_trained.append(task.round)
                    if max_rounds is not None and len(summary.rounds_trained) >= max_rounds:
                        summary.reason = "max_rounds"
                        return summary
                self._pause(poll_interval * self._rng.uniform(0.5, 1.5))
            except QflareError as exc:
                patience.failed(exc, "device loop")
                if exc.code == ErrorCode.SERVER_KEY_MISMATCH and self._rekey is not None and not rekey:
                    log.warning("the coordinator presents another key [%s]: checking its rotation chain", exc.code)
                    connected, rekey = False, True
                    continue
                retry = exc.retry
                if exc.unauthenticated and retry not in (Retry.TRANSIENT, Retry.SKIP_ROUND):
                    log.warning("unauthenticated refusal [%s] %s: not trusted, treated as transient", exc.code, exc)
                    if retry is Retry.FATAL:
                        retry = Retry.TRANSIENT
                if retry is Retry.TRANSIENT and isinstance(exc, RateLimitedError):
                    # the session is fine: wait as told, without a new handshake
                    wait = min(exc.retry_after_s, MAX_WAIT_S) * self._rng.uniform(1.0, 1.5)
                    log.warning("refused [%s] %s; waiting %.1f s", exc.code, exc, wait)
                    self._pause(wait)
                elif retry is Retry.TRANSIENT:
                    connected = False
                    failures += 1
                    wait = _transient_wait(exc, min(poll_interval * 2 ** min(failures, 10), 10.0))
                    wait *= self._rng.uniform(0.8, 1.2)
                    log.warning("coordinator unreachable [%s] %s; retrying in %.1f s", exc.code, exc, wait)
                    self._pause(wait)
                elif retry is Retry.SKIP_ROUND:
                    log.error("round %d skipped: [%s] %s", summary.last_round, exc.code, exc)
                    self._skipped.add(summary.last_round)
                    self._pending = None
                    self._pause(poll_interval * self._rng.uniform(0.5, 1.5))
                else:
                    log.warning("refused [%s] %s", exc.code, exc)
                    if retry is Retry.FATAL:
                        raise  # a refusal retrying cannot fix, or a local error (configuration, data, training)
                    if retry is Retry.DROP_UPDATE:
                        self._pending = None
                    refusals += 1
                    if refusals >= max_refusals and not exc.unauthenticated:
                        raise
                    connected = False  # start over on a fresh session: channel state is then surely in step
                    self._pause(poll_interval * self._rng.uniform(0.5, 1.5))
        return summary

    def _follow_rotation(self) -> None:
        """Move to the coordinator's new key through its verified rotation chain (``rekey``); a key that
        is not new, or a changed suite, is refused (``server_key_mismatch`` / ``suite_mismatch``)."""
        assert self._rekey is not None
        key, suite = self._rekey()
        if key == self.server_key:
            raise AuthError(
                "the coordinator's handshake names another key than the one it serves", code="server_key_mismatch"
            )
        if suite != self.device.suite:
            raise ConfigError(f"after its rotation the coordinator uses suite {suite.name}", code="suite_mismatch")
        log.warning(
            "event=key_rotation: coordinator key %s... -> %s... (verified rotation; pin moved)",
            self.server_key.key_id[:16],
            key.key_id[:16],
        )
        self.server_key = self.device.server_key = key
        self.device.reset_session()

    def _collect_proof(self, task: TaskInfo, summary: RunSummary) -> None:
        """Once the round of the last acknowledged update is over (the task names a later round, or no
        round is open), fetch, verify and keep its receipt proof (:func:`qflare.device.proofs.collect`):
        one request per acknowledged round, on the poll that shows the round over."""
        awaiting = self._awaiting
        if awaiting is None or (task.state == "open" and task.round <= awaiting.round):
            return
        verified = collect(self.device, self.state, awaiting)  # raises what is worth asking again
        self._awaiting = None
        (summary.proofs if verified is not None else summary.proof_failures).append(awaiting.round)

    def _check_rollback(self, task: TaskInfo) -> None:
        """Refuse a task older than what this device already accepted (StaleModelError ``model_rollback``)."""
        version, rnd = self.state.progress()
        if task.model_version < version or (task.state == "open" and task.round < rnd):
            log.error(
                "event=model_rollback: coordinator offers model version %d / round %d, this device already "
                "accepted version %d / round %d; refused",
                task.model_version,
                task.round,
                version,
                rnd,
            )
            raise StaleModelError(
                f"coordinator offers model version {task.model_version} (round {task.round}), older than the "
                f"accepted version {version} (round {rnd}): a rollback, refused",
                code=ErrorCode.MODEL_ROLLBACK,
            )

    def _may_train(self, task: TaskInfo) -> bool:
        """At most one training per (round, model version), at most ``max_trainings`` per period."""
        if (task.round, task.model_version) in self._trained or task.round <= self.state.progress()[1]:
            log.debug("round %d, model version %d: already trained once; not again", task.round, task.model_version)
            return False
        now = self._monotonic()
        while self._trainings and now - self._trainings[0] >= self.training_period_s:
            self._trainings.popleft()
        if len(self._trainings) >= self.max_trainings:
            if not self._capped_logged:
                log.warning(
                    "event=training_capped: %d trainings in the last %.0f s; round %d waits",
                    len(self._trainings),
                    self.training_period_s,
                    task.round,
                )
                self._capped_logged = True
            return False
        self._capped_logged = False
        self._trained.add((task.round, task.model_version))
        self._trainings.append(now)
        return True

    def _secure_train(self, task: TaskInfo) -> TrainResult | None:
        """Train for a secure round's masked input (None when the training limits say not now)."""
        if not self._may_train(task):
            return None
        model = self.device.fetch_model(task)
        self.state.record_progress(model_version=model.version)
        result = self.workload.train(model.flat, task.round)
        log.info(
            "secure round %d: trained on %d examples in %.2f s", task.round, result.num_examples, result.duration_s
        )
        return result

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
        if task.secagg:  # a secure round: no plaintext update, the phase messages instead
            if self._secure.step(task):
                self.state.record_progress(round=task.round)
            return None
        if pending is None:
            if task.submitted or not self._may_train(task):
                return None  # acknowledged earlier, trained already, or over the training cap
            model = self.device.fetch_model(task)
            self.state.record_progress(model_version=model.version)
            result = self.workload.train(model.flat, task.round)
            log.info(
                "round %d: trained on %d examples in %.2f s (loss %.4f)",
                task.round,
                result.num_examples,
                result.duration_s,
                result.mean_loss,
            )
            pending = self._pending = (self.device.prepare_update(task, model, result), model.sha256)
            self._pending_examples = result.num_examples
        else:
            log.info(
                "round %d: resending update %s... whose acknowledgement was lost",
                task.round,
                pending[0].update_hash[:12],
            )
        receipt, ack = self.device.submit_signed(pending[0])
        self._pending = None
        examples = self._pending_examples
        self.state.append_receipt(self.device_id, ack, examples)
        self._awaiting = Awaiting(receipt.round, receipt.update_hash, examples)
        self.state.record_progress(round=receipt.round)
        log.info(
            "round %d: update %s... acknowledged (%d in the round%s)",
            receipt.round,
            receipt.update_hash[:12],
            receipt.updates_in_round,
            ", duplicate" if receipt.duplicate else "",
        )
        return receipt


def _transient_wait(exc: QflareError, backoff: float) -> float:
    """How long to wait after a transient failure: the server's (capped) word when it gave one."""
    if isinstance(exc, CircuitOpenError):
        return min(exc.retry_in_s, MAX_WAIT_S)
    if isinstance(exc, (RateLimitedError,)):
        return min(exc.retry_after_s, MAX_WAIT_S)
    if isinstance(exc, ServerUnavailableError) and exc.retry_after_s is not None:
        return min(max(exc.retry_after_s, backoff), MAX_WAIT_S)
    return backoff


def default_state_dir(index: int) -> Path:
    """``~/.local/state/qflare/device-<index>`` (``$XDG_STATE_HOME`` respected)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "qflare" / f"device-{index}"
