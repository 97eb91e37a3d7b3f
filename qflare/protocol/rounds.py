"""The round state machine: selection, acceptance of updates, quorum, deadline, aggregation, publication.

State lives in the :class:`~qflare.protocol.store.CoordinatorStore` (rounds, updates, model versions), the tensors in
memory (the running aggregate) and, when a :class:`~qflare.protocol.store.BlobSink` is given, update and
model blobs on disk — which is what lets a restarted coordinator rebuild the open round exactly: every
acknowledged update is re-read from its blob and folded in again, none twice.

    OPEN --quorum reached--> (aggregate, sign, publish) --> CLOSED --> next round OPEN
    OPEN --deadline, >= min_participants--> same as quorum
    OPEN --deadline, < min_participants--> FAILED --> next round OPEN on the same model

Model versions are independent of round numbers: each publication is the latest version + 1, so a
failed round consumes no version and never blocks the next publication.  A publication that cannot be
written (StorageFullError: full disk) leaves the round aggregating with its result kept and is retried
by :meth:`RoundManager.tick` until the storage takes it; updates already acknowledged are never
dropped for it.  Blobs no row refers to (a crash between the blob write and its row, a refusal after
the write) are removed by :meth:`RoundManager.collect_garbage`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from ..crypto import MsgType, SignedEnvelope, SigningKey, Suite, sign_global_model
from ..errors import (
    ConfigError,
    ErrorCode,
    PolicyError,
    ProtocolError,
    QflareError,
    RoundError,
    StaleModelError,
    StorageFullError,
    ValidationError,
    WrongRoundError,
)
from ..hashed import HashedBytes
from ..ledger import LedgerEntry
from ..strategy import ClientUpdate, Pipeline, PreparedUpdate, RoundAggregation
from ..strategy.dp import privacy_of
from ..strategy.state import encode_pipeline_state, load_pipeline_state
from ..wire import ParamLayout, decode_blob, encode_model
from .cluster import ClusterRoundOps, Leadership
from .commits import GroupCommit
from .detection import QUARANTINED, DetectionConfig, Detector, RoundVerdict
from .provenance import QUORUM_NOT_REACHED, next_entry, round_record
from .records import NewUpdate, RoundRow, UpdateRow
from .secure_manager import SecureRoundOps
from .secure_round import SecAggSettings, SecureRound, apply_mean, check_secure_pipeline
from .selection import ClientSelector, RandomSelector, SelectorFactory, build_selector, check_selection
from .store import BlobSink, CoordinatorStore

__all__ = ["OpenRound", "PublishedModel", "RoundConfig", "RoundManager"]

_log = logging.getLogger("qflare.rounds")

_UNSAFE_AGGREGATE = frozenset({ErrorCode.AGGREGATE_NON_FINITE, ErrorCode.AGGREGATE_OUT_OF_BOUNDS})


@dataclass(frozen=True)
class RoundConfig:
    rounds: int = 30
    """How many rounds the federation runs; after the last one devices are told it is finished."""
    per_round: int = 10
    """Devices selected each round (all active devices when fewer are enrolled)."""
    min_participants: int | None = None
    """Updates needed to aggregate at the deadline (default: all selected = quorum)."""
    round_timeout_s: float = 600.0
    seed: int = 0
    min_devices: int = 1
    """A server opens a round only once this many devices are enrolled and active."""
    selector: str | ClientSelector | SelectorFactory = "random"
    """Who takes part in each round: a registered selector name (see
    :func:`~qflare.protocol.selection.register_selector`), a selector, or a factory of one."""
    detection: DetectionConfig | None = None
    """Adaptive threat detection (docs/defences.md): when set, a round's updates are held and judged
    when it closes, before any is folded in; anomalous ones are left out and persistent offenders
    quarantined.  None: every valid update is folded in as it arrives."""
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    """How secure-aggregation rounds run (only when the pipeline says ``secure_aggregation``)."""

    def __post_init__(self) -> None:
        if self.detection is not None and not isinstance(self.detection, DetectionConfig):
            raise ConfigError(f"detection must be a DetectionConfig or None, got {type(self.detection).__name__}")
        if self.rounds < 1 or self.per_round < 1:
            raise ConfigError("rounds and per_round must be >= 1")
        if self.min_participants is not None and not 1 <= self.min_participants <= self.per_round:
            raise ConfigError("min_participants must be between 1 and per_round")
        if self.round_timeout_s <= 0:
            raise ConfigError("round_timeout_s must be > 0")


@dataclass(frozen=True)
class PublishedModel:
    """A signed global model version: ``envelope`` signs (version, hash, size, time) of ``blob``."""

    version: int
    flat: torch.Tensor
    blob: bytes
    sha256: str
    envelope: bytes
    round_number: int | None = None
    """The round whose aggregate this is (None for the initial model)."""


@dataclass
class OpenRound:
    """A round the manager has opened (``RoundManager.open_next``): who was selected, what has been
    accepted so far, and its aggregation state; ``secure`` is set for a secure-aggregation round."""

    number: int
    selected: tuple[str, ...]
    quorum: int
    min_participants: int
    deadline: float
    base: PublishedModel
    aggregation: RoundAggregation
    accepted: dict[str, str]  # device id -> update hash, in acceptance (= aggregation) order
    opened: float = 0.0  # when the round opened (Unix seconds), for its ledger entry
    db_state: str = "open"  # the round's state in the store: "open" or "aggregating"
    result: torch.Tensor | None = None  # the aggregate, once computed (kept while publication is retried)
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)
    """device id -> (update hash, error code) of updates this process refused in the round (ledger left_out)."""
    held: dict[str, tuple[torch.Tensor, PreparedUpdate]] = field(default_factory=dict)
    """With detection: device id -> (its delta as sent, the checked update), judged at close."""
    verdict: RoundVerdict | None = None
    """With detection: the verdict, once the round was judged."""
    left_out: dict[str, str] = field(default_factory=dict)
    """With detection: device id -> reason of acknowledged updates not folded in (ledger left_out)."""
    committed: list[str] | None = None
    """With detection: the device ids folded in, in order (None: all of ``accepted``, in order)."""
    pending: dict[str, threading.Event] = field(default_factory=dict)
    """device id -> set once its update, admitted and waiting for the group commit, is recorded or refused."""
    secure: SecureRound | None = None
    """A secure-aggregation round (:mod:`qflare.protocol.secure_round`): no plaintext update is taken."""

    @property
    def closing(self) -> bool:
        return self.result is not None or self.db_state != "open"


@dataclass(frozen=True)
class _Pending:
    """An admitted update waiting for the group commit: its round, its row, its checked aggregation input."""

    round: OpenRound
    record: NewUpdate
    prepared: Any
    delta: torch.Tensor
    """The delta as sent (detection judges it with the whole round at close)."""


MAX_REPORTED_LOSS = 1e6
"""A device's reported training loss above this (or negative, or not a finite number) is ignored."""


def mean_reported_loss(reports: Iterable[Mapping[str, object]]) -> float | None:
    """The plain mean of the training losses devices reported (their signed ``loss`` metric), for the
    history and plots only.  Device input: a value that is not a finite number in [0, MAX_REPORTED_LOSS]
    is left out, and each device counts once whatever example count it claims; None when none is usable."""
    values = []
    for metrics in reports:
        loss = metrics.get("loss") if isinstance(metrics, Mapping) else None
        if isinstance(loss, int | float) and not isinstance(loss, bool) and 0.0 <= loss <= MAX_REPORTED_LOSS:
            values.append(float(loss))
    return sum(values) / len(values) if values else None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _check_metrics(metrics: dict[str, float]) -> None:
    """Refuse metrics the store would refuse (NaN, infinities, NUL), BEFORE anything is written."""
    try:
        encoded = json.dumps(metrics, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"update metrics are not strict JSON: {exc}", code="bad_json") from None
    if "\\u0000" in encoded:
        raise ValidationError("update metrics contain a NUL character", code="bad_json")


class RoundManager(SecureRoundOps, ClusterRoundOps):
    """Owns the current round and the current global model.  Thread-safe.  Secure-aggregation rounds
    are run by :class:`~qflare.protocol.secure_manager.SecureRoundOps`; with ``leadership``, this is one
    worker of several on one store (:mod:`qflare.protocol.cluster`)."""

    def __init__(
        self,
        *,
        layout: ParamLayout,
        initial_flat: torch.Tensor,
        strategy: Pipeline,
        config: RoundConfig,
        identity: SigningKey,
        suite: Suite,
        store: CoordinatorStore,
        blobs: BlobSink | None = None,
        clock: Callable[[], float] = time.time,
        on_model: Callable[[PublishedModel], None] | None = None,
        candidates: Callable[[Sequence[str]], Sequence[str]] | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        """``candidates`` narrows the active devices (in enrollment order) to those the selector is offered
        (the coordinator passes the devices it has seen recently); it keeps their order.  ``leadership``
        makes this manager one worker of a cluster on a shared store (:mod:`qflare.protocol.cluster`)."""
        self.layout, self.strategy, self.config = layout, strategy, config
        self._candidates = candidates
        self._identity, self._suite, self._store, self._blobs = identity, suite, store, blobs
        self._clock, self._on_model = clock, on_model
        self._leadership = leadership
        self._gc_suspects: set[str] = set()
        self._gc_pass_at: float | None = None
        self._lock = threading.RLock()
        self._selector = build_selector(config.selector)
        self._privacy = privacy_of(strategy)
        if self._privacy is not None and not isinstance(self._selector, RandomSelector):
            raise ConfigError(
                f"DP-FedAvg's accounting assumes uniform sampling of the devices; selector {config.selector!r} is "
                "not the built-in random one"
            )
        self.stop_reason: str | None = None
        """Why the federation ended before its last round (the privacy budget), or None."""
        self.detector = Detector(config.detection) if config.detection is not None else None
        self._weighting: str | None = None
        if strategy.secure_aggregation:
            self._weighting = check_secure_pipeline(strategy, config.per_round)
            if self.detector is not None:
                raise ConfigError("threat detection reads individual updates, which secure aggregation hides")
            if leadership is not None:
                raise ConfigError(
                    "secure aggregation runs on a single coordinator process: its round state between phases "
                    "is that process's memory (run one worker)"
                )
        if leadership is not None and blobs is None:
            raise ConfigError("a worker of a cluster reads the round's updates back from the blob store: give one")
        self.verdicts: dict[int, RoundVerdict] = {}
        """With detection: the verdicts of the latest rounds this process judged (at most 1000), by round."""
        self._round: OpenRound | None = None
        self._inflight: dict[str, int] = {}  # update digests being written and recorded (kept from GC)
        self._inflight_lock = threading.Lock()
        self._commits: GroupCommit[_Pending, tuple[int, bool]] = GroupCommit(self._record_batch)
        self.finished = False
        latest = store.latest_model()
        if latest is None:
            self.model = self._publish(0, initial_flat.detach().to(torch.float32).clone())
            store.add_model_version(0, None, self.model.sha256, None, self.model.envelope, {})
        else:
            self.model = self._recover_model(latest.version, latest.model_hash)
            if leadership is not None:
                self._follow()  # the leader's step resumes (closes) what a crashed leader left open
            else:
                self._recover_round()

    # ------------------------------------------------------------------ models
    def _publish(self, version: int, flat: torch.Tensor, round_number: int | None = None) -> PublishedModel:
        blob = encode_model(self.layout, flat, {"version": str(version)})
        env, digest = sign_global_model(self._identity, self._suite, version, blob, int(self._clock()))
        if self._blobs is not None:
            self._blobs.put(blob)
        return PublishedModel(version, flat, blob, digest, env, round_number)

    def _recover_model(self, version: int, digest: str) -> PublishedModel:
        if self._blobs is None:
            raise ConfigError("the database holds model versions but no blob store was given to read them")
        blob = self._blobs.get(digest)
        flat = decode_blob(blob, self.layout, kind="model", expected_sha256=digest).flat
        row = self._store.get_model(version)
        assert row is not None
        state = row.metrics.get("server_state")
        if isinstance(state, str):
            load_pipeline_state(self.strategy, self._blobs.get(state))
        detection_state = row.metrics.get("detection_state")
        if self.detector is not None and isinstance(detection_state, str):
            self.detector.load_state(self._blobs.get(detection_state))
        envelope = bytes(row.signature)
        try:
            SignedEnvelope.open(envelope, self._identity.public, expected_type=MsgType.GLOBAL_MODEL)
        except QflareError:  # signed by a former coordinator key (a rotation): served re-signed by this one
            envelope, _ = sign_global_model(self._identity, self._suite, version, blob, int(self._clock()))
        return PublishedModel(version, flat, blob, digest, envelope, row.round_number)

    def _recover_round(self) -> None:
        row = self._store.current_round()
        if row is None or row.state not in ("open", "aggregating"):
            last = self._store.list_rounds(limit=1)
            self.finished = bool(last) and last[0].round_number >= self.config.rounds and last[0].state == "closed"
            return
        if self._weighting is not None:
            self._resume_secure_round(row)
            return
        assert self._blobs is not None
        agg = self.strategy.begin(self.model.flat)
        accepted: dict[str, str] = {}
        held: dict[str, tuple[torch.Tensor, PreparedUpdate]] = {}
        recorded = self._store.updates_for_round(row.round_number)
        for upd in recorded:
            try:
                blob = self._blobs.get(upd.update_hash)
                flat = decode_blob(blob, self.layout, kind="update", expected_sha256=upd.update_hash).flat
            except ValidationError as exc:  # blob_corrupt / blob_missing: the store was damaged while we were down
                # Aggregating without it would silently drop an acknowledged update, and refusing to start
                # would wedge the federation: the round fails, visibly, and the next one opens.
                self._report_unreadable(row.round_number, upd, exc, "at restart")
                broken = self._round_from_row(row, agg, {u.device_id: u.update_hash for u in recorded})
                self._fail(broken, str(exc.code))
                return
            restored = ClientUpdate(upd.device_id, flat, upd.num_examples, dict(upd.metrics))
            if self.detector is not None:
                held[upd.device_id] = (flat, agg.check(restored))
            else:
                agg.add(restored)
            accepted[upd.device_id] = upd.update_hash
        self._begin_privacy_of(row)
        deadline = row.deadline.timestamp()
        now = self._clock()
        if row.state == "open" and 0 < len(accepted) < row.min_participants and deadline <= now:
            # The deadline passed while the coordinator was down: failing the round now would discard
            # acknowledged updates for an outage that was ours, so the devices get a full round's time.
            deadline = now + self.config.round_timeout_s
            try:
                self._store.extend_round_deadline(row.round_number, _utc(deadline))
            except StorageFullError:  # the in-memory deadline holds; a later restart extends it again
                _log.warning("round %d: could not persist the extended deadline (storage full)", row.round_number)
            _log.warning("round %d: deadline passed while stopped; extended to give devices time", row.round_number)
        self._round = self._round_from_row(row, agg, accepted, deadline)
        self._round.held = held
        if row.state == "aggregating" or len(accepted) >= row.quorum:
            # crashed between quorum and publication, or after the last update: finish the job
            self._close(self._round)

    def _report_unreadable(self, round_number: int, upd: UpdateRow, exc: QflareError, when: str) -> None:
        """The security event and log line of an acknowledged update that cannot be read back (its round fails)."""
        self._store.record_security_event(
            exc.code,
            f"round {round_number}: the acknowledged update of device {upd.device_id[:16]}... cannot be read back "
            f"{when} ({exc}); the round is marked failed and the next one opens"[:2000],
            device_id=upd.device_id,
        )
        _log.error("round %d failed %s: update %s unreadable [%s]", round_number, when, upd.id, exc.code)

    def _begin_privacy_of(self, row: RoundRow) -> None:
        """Charge the accountant for a round this process did not open (a restart, another worker's)."""
        if self._privacy is not None:  # the candidates of the round's draw are gone: never under-charge it
            active = len(self._store.list_devices(status="active"))
            rate = len(row.selected_devices) / active if active else 1.0
            self._privacy.begin_round(min(1.0, max(self._privacy.sampling_rate, rate)))

    # ------------------------------------------------------------------ rounds
    @property
    def current(self) -> OpenRound | None:
        return self._round

    def open_next(self) -> OpenRound | None:
        """Open the next round with the devices the selector chooses among the active ones, in enrollment
        order, narrowed by ``candidates`` when given (None when finished).  A selection that is not ``per_round`` distinct active devices (or
        all of them, when fewer are active) raises RoundError ``bad_selection`` and opens nothing."""
        with self._lock:
            if self._round is not None:
                raise RoundError(f"round {self._round.number} is still open", code="round_open")
            last = self._store.list_rounds(limit=1)
            number = last[0].round_number + 1 if last else 1
            if number > self.config.rounds:
                self.finished = True
                return None
            active = [d.device_id for d in self._store.list_devices(status="active")]
            if self._candidates is not None:
                enrolled = set(active)
                active = [d for d in self._candidates(tuple(active)) if d in enrolled]
            if not active:
                raise RoundError("no active devices to select", code="no_devices")
            k = min(self.config.per_round, len(active))
            if self._privacy is not None:  # a budget stops the federation before the round that exceeds it
                rate = k / len(active)
                reason = self._privacy.budget_stop(rate)
                if reason is not None:
                    if self.stop_reason is None:
                        _log.warning("round %d not opened: %s", number, reason)
                    self.stop_reason, self.finished = reason, True
                    return None
                self._privacy.begin_round(rate)
            chosen = check_selection(
                self._selector.select(number, tuple(active), k, self.config.seed), active, k, number
            )
            minimum = min(self.config.min_participants or k, k)
            opened = self._clock()
            deadline = opened + self.config.round_timeout_s
            secure = self._new_secure_round(number, chosen, opened)  # before anything is stored
            if secure is not None:
                deadline = secure.phase_deadline
            self._store.open_round(number, self.model.sha256, chosen, minimum, k, _utc(deadline))
            self._round = OpenRound(
                number, chosen, k, minimum, deadline, self.model, self.strategy.begin(self.model.flat), {}, opened
            )
            if secure is not None:
                self._start_secure_round(self._round, secure)
            return self._round

    def accept(
        self,
        update: ClientUpdate,
        update_hash: str,
        base_hash: str,
        signature: bytes,
        blob: bytes | memoryview | HashedBytes,
        *,
        round_number: int,
        envelope: bytes | None = None,
    ) -> tuple[int, bool]:
        """Record and fold in one verified update signed for ``round_number``; (accepted count, duplicate?).

        Idempotent per (round, device).  The expensive per-update work (checks, writing the blob) runs
        outside the round lock so that concurrent uploads overlap.  Under the lock the update is admitted
        again and the device's slot held; its row is then written by a group commit (one transaction for
        the uploads waiting at that moment, outside the round lock), and only once that has committed is
        it folded in, under the lock, in the order recorded, and acknowledged.  Once an update is recorded
        it is acknowledged, whatever happens to the aggregation that it completes.

        Everything that can refuse the update is checked before its blob is written; a refusal that
        still comes after the write (a race: revocation, the deadline) removes the blob again unless
        something else refers to it.  ``envelope`` is the exact signed UPDATE envelope, stored with it.
        ``blob`` as :class:`~qflare.hashed.HashedBytes` (what :func:`~qflare.crypto.open_update` verified)
        is written without being hashed again; its digest must be ``update_hash``.
        """
        rnd, count = self._admit(update, update_hash, round_number, base_hash)
        if rnd is None:
            return count, True
        try:
            if self._store.device_status(update.device_id) == "quarantined":
                raise PolicyError(f"device {update.device_id[:16]}... is quarantined", code="quarantined")
            _check_metrics(update.metrics)
            prepared = rnd.aggregation.check(update)
        except QflareError as exc:  # a signed update of a selected device, refused: the ledger says so
            with self._lock:
                rnd.refused[update.device_id] = (update_hash, str(exc.code))
            raise
        with self._inflight_lock:
            self._inflight[update_hash] = self._inflight.get(update_hash, 0) + 1
        try:
            if self._blobs is not None:
                self._blobs.put(blob, expected_sha256=update_hash)
            slot: threading.Event | None = None
            held: OpenRound | None = None
            try:
                again, count = self._reserve(update, update_hash, round_number, base_hash)
                if again is None:
                    return count, True  # the same update won a race with its own retry
                held, slot = again, again.pending[update.device_id]
                record = NewUpdate(
                    rnd.number,
                    update.device_id,
                    update_hash,
                    base_hash,
                    update.num_examples,
                    signature,
                    update.metrics,
                    envelope,
                )
                return self._commits.submit(_Pending(again, record, prepared, update.delta))
            except BaseException:
                with self._lock:
                    if held is not None and slot is not None and held.pending.get(update.device_id) is slot:
                        # it never reached the flush: free the device's slot
                        del held.pending[update.device_id]
                        slot.set()
                    self._discard_blob(update_hash)
                raise
        finally:
            with self._inflight_lock:
                left = self._inflight[update_hash] - 1
                if left:
                    self._inflight[update_hash] = left
                else:
                    del self._inflight[update_hash]

    def _reserve(
        self, update: ClientUpdate, update_hash: str, round_number: int, base_hash: str
    ) -> tuple[OpenRound | None, int]:
        """Admit the update again, under the round lock, and hold the device's slot until its group commit
        is done; while another update of the device holds it, wait for that one first."""
        while True:
            with self._lock:
                rnd, count = self._admit(update, update_hash, round_number, base_hash)
                if rnd is None:
                    return None, count
                busy = rnd.pending.get(update.device_id)
                if busy is None:
                    rnd.pending[update.device_id] = threading.Event()
                    return rnd, count
            busy.wait()

    def _record_batch(self, batch: list[_Pending]) -> list[tuple[int, bool] | BaseException]:
        """The group commit's flush: record the batch in one transaction, then, under the round lock and
        in the order recorded (= the order a restart folds them in), fold each recorded update into its
        round.  Runs in one upload's thread at a time, outside the round lock while it writes."""
        outcomes: list[Any]
        try:
            if len(batch) == 1:
                u = batch[0].record
                try:
                    outcomes = [
                        self._store.record_update(
                            u.round_number,
                            u.device_id,
                            u.update_hash,
                            u.base_model_hash,
                            u.num_examples,
                            u.signature,
                            u.metrics,
                            envelope=u.envelope,
                        )
                    ]
                except QflareError as exc:
                    outcomes = [exc]
            else:
                outcomes = list(self._store.record_updates([p.record for p in batch]))
        except BaseException as exc:  # the transaction failed: none is recorded
            outcomes = [exc] * len(batch)
        results: list[tuple[int, bool] | BaseException] = []
        closing: list[OpenRound] = []
        with self._lock:
            for item, outcome in zip(batch, outcomes, strict=True):
                rnd, device = item.round, item.record.device_id
                event = rnd.pending.pop(device, None)
                try:
                    if isinstance(outcome, BaseException):
                        results.append(outcome)
                        continue
                    # (a cluster's leader reads it back from the blob store at close, in selection order)
                    if self._leadership is None and self.detector is not None:  # judged with the round at close
                        rnd.held[device] = (item.delta, item.prepared)
                    elif self._leadership is None:
                        rnd.aggregation.commit(item.prepared)
                    rnd.accepted[device] = item.record.update_hash
                    results.append((len(rnd.accepted), False))
                    if self._leadership is not None:
                        continue  # the leader's step closes the round
                    if len(rnd.accepted) >= rnd.quorum and not any(r is rnd for r in closing):
                        closing.append(rnd)
                except Exception as exc:  # recorded but not folded in: the device's retry folds it in
                    _log.exception("round %d: folding in the update of %s failed", rnd.number, device[:16])
                    results.append(exc)
                finally:
                    if event is not None:
                        event.set()
            for rnd in closing:
                if self._round is rnd and not rnd.pending and not rnd.closing:
                    try:  # the batch is recorded and acknowledged, whatever happens to the aggregation
                        self._close(rnd)
                    except Exception:
                        _log.exception("round %d: closing after quorum failed", rnd.number)
        return results

    def _discard_blob(self, digest: str) -> None:
        """Remove a just-written update blob that was not recorded (under the round lock), unless another
        upload of the same bytes is in flight or a row refers to it.  A worker of a cluster leaves it to
        the leader's garbage collection: another worker may be recording the same bytes."""
        if self._blobs is None or self._leadership is not None:
            return
        try:
            with self._inflight_lock:
                if self._inflight.get(digest, 0) > 1 or digest in self._store.referenced_blobs():
                    return
                self._blobs.delete(digest)
        except Exception as exc:  # the refusal matters more; collect_garbage gets it later
            _log.warning("could not remove unrecorded blob %s: %s", digest, exc)

    def collect_garbage(self) -> list[str]:
        """Delete every stored blob that no row refers to and no upload in flight is writing; their digests.

        Safe while the coordinator serves: rows are only added under the round lock, which is held while
        the references are read and the files removed, and an upload marks its digest in flight before it
        writes the file (so a file that reappears after its removal is marked)."""
        if self._blobs is None:
            return []
        listed = list(self._blobs.digests())
        removed: list[str] = []
        with self._lock:
            referenced = self._store.referenced_blobs()
            if self._leadership is not None:
                listed = self._collect_clustered(listed, referenced)
            for digest in listed:
                if digest in referenced:
                    continue
                with self._inflight_lock:
                    if self._inflight.get(digest) or not self._blobs.delete(digest):
                        continue
                removed.append(digest)
        if removed:
            _log.info("removed %d blob(s) no row refers to", len(removed))
        return removed

    def _admit(
        self, update: ClientUpdate, update_hash: str, round_number: int, base_hash: str
    ) -> tuple[OpenRound | None, int]:
        """(the open round, count) if this update may be accepted; (None, count) if it already was."""
        with self._lock:
            rnd = self._round
            if rnd is None or rnd.number != round_number:
                raise WrongRoundError(f"update is for round {round_number}, which is not the open round")
            if base_hash != rnd.base.sha256:
                raise StaleModelError("update was trained on another base model", code="stale_model")
            if self._clock() >= rnd.deadline:
                raise RoundError(f"round {rnd.number} is past its deadline", code="deadline_passed")
            if update.device_id not in rnd.selected:
                raise RoundError(f"device was not selected for round {rnd.number}", code="not_selected")
            previous = rnd.accepted.get(update.device_id)
            if previous == update_hash:
                return None, len(rnd.accepted)
            if rnd.closing:
                raise RoundError(f"round {rnd.number} is being aggregated", code="round_not_open")
            if rnd.secure is not None:
                raise ProtocolError(
                    f"round {rnd.number} runs secure aggregation: it takes masked inputs, not updates",
                    code="secagg_mismatch",
                )
            if previous is None:
                return rnd, len(rnd.accepted)
            raise ValidationError("a different update was already accepted for this round", code="duplicate_submission")

    def step(self) -> OpenRound | None:
        """What a server calls periodically: handle the deadline, open the next round when none is."""
        if self._leadership is not None:
            return self._cluster_step()
        with self._lock:
            self.tick()
            if self._round is None and not self.finished:
                active = self._store.list_devices(status="active")
                if len(active) >= self.config.min_devices:
                    self.open_next()
            return self._round

    def status(self) -> dict[str, object]:
        rnd = self._round
        state = ("aggregating" if rnd.closing else "open") if rnd else ("finished" if self.finished else "waiting")
        return {
            "round": rnd.number if rnd else None,
            "state": state,
            "selected": len(rnd.selected) if rnd else 0,
            "accepted": len(rnd.accepted) if rnd else 0,
            "deadline": rnd.deadline if rnd else None,
            "model_version": self.model.version,
            "model_sha256": self.model.sha256,
            "rounds_total": self.config.rounds,
            "privacy": None if self._privacy is None else self._privacy.spent().to_json(),
            "stop_reason": self.stop_reason,
        }

    def tick(self) -> None:
        """Deadline handling: aggregate with what arrived, or fail the round and move on; retry a
        publication that the storage refused."""
        if self._leadership is not None:
            self._cluster_step()
            return
        with self._lock:
            rnd = self._round
            if rnd is not None and rnd.closing:
                self._close(rnd)
                return
            if rnd is not None and rnd.secure is not None:
                self._secure_advance(rnd)
                return
            if rnd is None or self._clock() < rnd.deadline or rnd.pending:
                return  # updates being recorded are folded in first (the store refuses them past the deadline)
            if len(rnd.accepted) >= rnd.min_participants:
                self._close(rnd)
            else:
                self._fail(rnd, QUORUM_NOT_REACHED)

    def _ledger_entry(self, rnd: OpenRound, reason: str | None, published: PublishedModel | None) -> LedgerEntry:
        """The round's signed ledger entry, chained to the stored head (read now, under the round lock;
        the store refuses it, and the transaction carrying it, if the head moved meanwhile)."""
        if rnd.secure is not None:
            return self._secure_entry(rnd, reason, published)
        rows = {u.device_id: u for u in self._store.updates_for_round(rnd.number)}
        order = [rows[d] for d in rnd.accepted if d in rows] + [u for d, u in rows.items() if d not in rnd.accepted]
        in_order = list(rnd.accepted) if rnd.committed is None else rnd.committed
        combined: list[str] | None = None if rnd.committed is None else list(rnd.committed)
        chosen = getattr(rnd.aggregation.accumulator, "selected", None)  # Krum / Multi-Krum's picks
        if published is not None and isinstance(chosen, tuple) and chosen:
            combined = [in_order[i] for i in chosen if 0 <= i < len(in_order)]
        now = self._clock()
        record = round_record(
            round_number=rnd.number,
            outcome="closed" if published is not None else "failed",
            reason=reason,
            parent_model=rnd.base.sha256,
            model=None if published is None else published.sha256,
            model_version=None if published is None else published.version,
            rows=order,
            combined=combined,
            refused=rnd.refused,
            flagged=rnd.left_out,
            selected=rnd.selected,
            quorum=rnd.quorum,
            min_participants=rnd.min_participants,
            opened=int(rnd.opened),
            closed=int(now),
            pipeline=self.strategy,
        )
        return next_entry(self._store.last_ledger_entry(), record, self._identity, int(now))

    def _judge(self, rnd: OpenRound) -> None:
        """Detection at close: leave out the updates of devices quarantined meanwhile (by an operator),
        judge the others, quarantine the devices the verdict names, fold in the rest in acceptance order.
        Raises ConfigError ``too_few_updates`` (the round fails) when what is left cannot be combined."""
        assert self.detector is not None
        verdict = rnd.verdict
        if verdict is None:  # judged once: a retry after a storage failure reuses the verdict
            judged: list[tuple[str, torch.Tensor, int]] = []
            for device in rnd.accepted:
                if self._store.device_status(device) == "quarantined":
                    rnd.left_out[device] = QUARANTINED
                elif device in rnd.held:
                    delta, prepared = rnd.held[device]
                    judged.append((device, delta, prepared.num_examples))
            verdict = rnd.verdict = self.detector.judge(rnd.number, judged)
            self.verdicts[rnd.number] = verdict
            while len(self.verdicts) > 1000:
                del self.verdicts[min(self.verdicts)]
            rnd.left_out.update(verdict.left_out)
        for device in verdict.quarantined:
            if self._store.device_status(device) != "active":
                continue
            self.quarantine(
                device,
                f"round {rnd.number}: anomalous update ({verdict.scores[device].why}); reputation "
                f"{verdict.reputation[device]:.3f} < {self.detector.config.quarantine_below}",
            )
        rnd.committed = [d for d in rnd.accepted if d not in rnd.left_out and d in rnd.held]
        self.strategy.check_round_size(len(rnd.committed))
        for device in rnd.committed:
            rnd.aggregation.commit(rnd.held[device][1])
        rnd.held.clear()
        if rnd.left_out:
            _log.warning("round %d: left out %s", rnd.number, {d[:16]: r for d, r in rnd.left_out.items()})

    def quarantine(self, device_id: str, reason: str) -> None:
        """Quarantine a device (no longer selected, its updates refused) and record the security event."""
        self._store.quarantine_device(device_id, reason)
        self._store.record_security_event(QUARANTINED, reason[:2000], device_id=device_id)
        _log.warning("device %s... quarantined: %s", device_id[:16], reason)

    def reinstate(self, device_id: str) -> None:
        """An operator's reinstatement of a quarantined device: selectable again, reputation afresh."""
        with self._lock:
            before = self._store.device_status(device_id)
            self._store.reinstate_device(device_id)
            if self.detector is not None:
                self.detector.reinstate(device_id)
        if before == "quarantined":
            self._store.record_security_event("reinstated", "an operator reinstated the device", device_id=device_id)

    def _fail(self, rnd: OpenRound, reason: str) -> None:
        """Mark the round failed, with its ledger entry in the same transaction; the next round opens."""
        entry = self._ledger_entry(rnd, reason, None)
        self._store.set_round_state(rnd.number, rnd.db_state, "failed", ledger=entry)
        if self._round is rnd:
            self._round = None

    def _close(self, rnd: OpenRound) -> None:
        """Aggregate, sign and publish as the next model version, with the round's ledger entry.

        A round whose aggregation fails is marked failed (never stuck).  When the storage cannot be
        written the round stays aggregating with its result kept, and :meth:`tick` tries again."""
        try:
            if rnd.result is None:
                if rnd.secure is not None:
                    rnd.result = apply_mean(self.strategy, rnd.base.flat, rnd.secure.mean(), len(rnd.accepted))
                else:
                    if self.detector is not None and rnd.committed is None:
                        self._judge(rnd)
                    rnd.result = rnd.aggregation.finish()
            if rnd.db_state == "open":
                self._store.set_round_state(rnd.number, "open", "aggregating")
                rnd.db_state = "aggregating"
            published = self._publish(self.model.version + 1, rnd.result, rnd.number)
            folded = len(rnd.accepted) if rnd.committed is None else len(rnd.committed)
            metrics: dict[str, object] = {"updates": folded, "examples": rnd.aggregation.total_examples}
            if rnd.left_out:
                metrics["left_out"] = dict(sorted(rnd.left_out.items()))
            if rnd.secure is not None:
                metrics["secure_aggregation"] = rnd.secure.summary()
            rows = [u for u in self._store.updates_for_round(rnd.number) if u.device_id not in rnd.left_out]
            train_loss = mean_reported_loss(u.metrics for u in rows)
            if train_loss is not None:
                metrics["train_loss"] = train_loss
            if self._blobs is not None:  # optimiser moments / noise: a restart continues them
                pipeline_state = encode_pipeline_state(self.strategy)
                if pipeline_state is not None:
                    metrics["server_state"] = self._blobs.put(pipeline_state)[0]
                if self.detector is not None:  # reputations: a restart keeps them
                    metrics["detection_state"] = self._blobs.put(self.detector.encode_state())[0]
            entry = self._ledger_entry(rnd, None, published)
            self._store.publish_model(
                rnd.number, published.version, published.sha256, published.envelope, metrics, ledger=entry
            )
        except StorageFullError as exc:
            _log.warning("round %d: publication deferred until the storage can be written: %s", rnd.number, exc)
            return
        except QflareError as exc:
            _log.error("round %d failed to aggregate [%s]: %s", rnd.number, exc.code, exc)
            if exc.code in _UNSAFE_AGGREGATE:  # the sanity check of the new model: an attack or a bug
                self._store.record_security_event(
                    exc.code, f"round {rnd.number}: {exc}"[:2000], device_id=exc.device_id
                )
            self._fail(rnd, str(exc.code))
            self._round = None
            return
        self.model = published
        self._round = None
        if rnd.number >= self.config.rounds:
            self.finished = True
        if self._on_model is not None:
            try:  # an observer (evaluation, metrics): its failure must not undo or hide the publication
                self._on_model(published)
            except Exception:
                _log.exception("round %d: the on_model callback failed (the model is published)", rnd.number)
