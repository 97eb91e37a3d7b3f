"""The round state machine: selection, acceptance of updates, quorum, deadline, aggregation, publication.

State lives in the :class:`~qflare.protocol.store.CoordinatorStore` (rounds, updates, model versions), the tensors in
memory (the running aggregate) and, when a :class:`~qflare.protocol.store.BlobSink` is given, update and
model blobs on disk — which is what lets a restarted coordinator rebuild the open round exactly: every
acknowledged update is re-read from its blob and folded in again, none twice.

    OPEN --quorum reached--> (aggregate, sign, publish) --> CLOSED --> next round OPEN
    OPEN --deadline, >= min_participants--> same as quorum
    OPEN --deadline, < min_participants--> FAILED --> next round OPEN on the same model
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from ..crypto import SigningKey, Suite, sign_global_model
from ..errors import ConfigError, ErrorCode, QflareError, RoundError, StaleModelError, ValidationError, WrongRoundError
from ..strategy import ClientUpdate, Pipeline, RoundAggregation
from ..strategy.state import encode_pipeline_state, load_pipeline_state
from ..wire import ParamLayout, decode_blob, encode_model
from .selection import ClientSelector, SelectorFactory, build_selector, check_selection
from .store import BlobSink, CoordinatorStore

__all__ = ["PublishedModel", "RoundConfig", "RoundManager"]

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

    def __post_init__(self) -> None:
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


@dataclass
class _OpenRound:
    number: int
    selected: tuple[str, ...]
    quorum: int
    min_participants: int
    deadline: float
    base: PublishedModel
    aggregation: RoundAggregation
    accepted: dict[str, str]  # device id -> update hash


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class RoundManager:
    """Owns the current round and the current global model.  Thread-safe."""

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
    ) -> None:
        self.layout, self.strategy, self.config = layout, strategy, config
        self._identity, self._suite, self._store, self._blobs = identity, suite, store, blobs
        self._clock, self._on_model = clock, on_model
        self._lock = threading.RLock()
        self._selector = build_selector(config.selector)
        self._round: _OpenRound | None = None
        self.finished = False
        latest = store.latest_model()
        if latest is None:
            self.model = self._publish(0, initial_flat.detach().to(torch.float32).clone())
            store.add_model_version(0, None, self.model.sha256, None, self.model.envelope, {})
        else:
            self.model = self._recover_model(latest.version, latest.model_hash)
            self._recover_round()

    # ------------------------------------------------------------------ models
    def _publish(self, version: int, flat: torch.Tensor) -> PublishedModel:
        blob = encode_model(self.layout, flat, {"version": str(version)})
        env, digest = sign_global_model(self._identity, self._suite, version, blob, int(self._clock()))
        if self._blobs is not None:
            self._blobs.put(blob)
        return PublishedModel(version, flat, blob, digest, env)

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
        return PublishedModel(version, flat, blob, digest, bytes(row.signature))

    def _recover_round(self) -> None:
        row = self._store.current_round()
        if row is None or row.state not in ("open", "aggregating"):
            last = self._store.list_rounds(limit=1)
            self.finished = bool(last) and last[0].round_number >= self.config.rounds and last[0].state == "closed"
            return
        assert self._blobs is not None
        agg = self.strategy.begin(self.model.flat)
        accepted: dict[str, str] = {}
        for upd in self._store.updates_for_round(row.round_number):
            blob = self._blobs.get(upd.update_hash)
            flat = decode_blob(blob, self.layout, kind="update", expected_sha256=upd.update_hash).flat
            agg.add(ClientUpdate(upd.device_id, flat, upd.num_examples, dict(upd.metrics)))
            accepted[upd.device_id] = upd.update_hash
        self._round = _OpenRound(
            row.round_number,
            tuple(row.selected_devices),
            row.quorum,
            row.min_participants,
            row.deadline.timestamp(),
            self.model,
            agg,
            accepted,
        )
        if row.state == "aggregating":  # crashed between quorum and publication: finish the job
            self._close(self._round, already_aggregating=True)
        elif len(accepted) >= row.quorum:  # crashed after the last update, before aggregating
            self._close(self._round)

    # ------------------------------------------------------------------ rounds
    @property
    def current(self) -> _OpenRound | None:
        return self._round

    def open_next(self) -> _OpenRound | None:
        """Open the next round with the devices the selector chooses among the active ones, in enrollment
        order (None when finished).  A selection that is not ``per_round`` distinct active devices (or
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
            if not active:
                raise RoundError("no active devices to select", code="no_devices")
            k = min(self.config.per_round, len(active))
            chosen = check_selection(
                self._selector.select(number, tuple(active), k, self.config.seed), active, k, number
            )
            minimum = min(self.config.min_participants or k, k)
            deadline = self._clock() + self.config.round_timeout_s
            self._store.open_round(number, self.model.sha256, chosen, minimum, k, _utc(deadline))
            self._round = _OpenRound(
                number, chosen, k, minimum, deadline, self.model, self.strategy.begin(self.model.flat), {}
            )
            return self._round

    def accept(
        self,
        update: ClientUpdate,
        update_hash: str,
        base_hash: str,
        signature: bytes,
        blob: bytes | memoryview,
        *,
        round_number: int,
    ) -> tuple[int, bool]:
        """Record and fold in one verified update signed for ``round_number``; (accepted count, duplicate?).

        Idempotent per (round, device).  The expensive per-update work (checks, writing the blob) runs
        outside the round lock so that concurrent uploads overlap; recording and folding in are done under
        it, after re-checking that the round and the device's slot are still as they were.  Once an update
        is recorded it is acknowledged, whatever happens to the aggregation that it completes.
        """
        rnd, count = self._admit(update, update_hash, round_number, base_hash)
        if rnd is None:
            return count, True
        prepared = rnd.aggregation.check(update)
        if self._blobs is not None:
            self._blobs.put(blob, expected_sha256=update_hash)
        with self._lock:
            again, count = self._admit(update, update_hash, round_number, base_hash)
            if again is None:
                return count, True  # the same update won a race with its own retry
            self._store.record_update(
                rnd.number, update.device_id, update_hash, base_hash, update.num_examples, signature, update.metrics
            )
            rnd.aggregation.commit(prepared)
            rnd.accepted[update.device_id] = update_hash
            count = len(rnd.accepted)
            if count >= rnd.quorum:
                self._close(rnd)
            return count, False

    def _admit(
        self, update: ClientUpdate, update_hash: str, round_number: int, base_hash: str
    ) -> tuple[_OpenRound | None, int]:
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
            if previous is None:
                return rnd, len(rnd.accepted)
            if previous == update_hash:
                return None, len(rnd.accepted)
            raise ValidationError("a different update was already accepted for this round", code="duplicate_submission")

    def step(self) -> _OpenRound | None:
        """What a server calls periodically: handle the deadline, open the next round when none is."""
        with self._lock:
            self.tick()
            if self._round is None and not self.finished:
                active = self._store.list_devices(status="active")
                if len(active) >= self.config.min_devices:
                    self.open_next()
            return self._round

    def status(self) -> dict[str, object]:
        rnd = self._round
        return {
            "round": rnd.number if rnd else None,
            "state": "open" if rnd else ("finished" if self.finished else "waiting"),
            "selected": len(rnd.selected) if rnd else 0,
            "accepted": len(rnd.accepted) if rnd else 0,
            "deadline": rnd.deadline if rnd else None,
            "model_version": self.model.version,
            "model_sha256": self.model.sha256,
            "rounds_total": self.config.rounds,
        }

    def tick(self) -> None:
        """Deadline handling: aggregate with what arrived, or fail the round and move on."""
        with self._lock:
            rnd = self._round
            if rnd is None or self._clock() < rnd.deadline:
                return
            if len(rnd.accepted) >= rnd.min_participants:
                self._close(rnd)
            else:
                self._store.set_round_state(rnd.number, "open", "failed")
                self._round = None

    def _close(self, rnd: _OpenRound, *, already_aggregating: bool = False) -> None:
        """Aggregate, sign and publish; a round whose aggregation fails is marked failed (never stuck)."""
        state = "aggregating" if already_aggregating else "open"
        try:
            new_flat = rnd.aggregation.finish()
            published = self._publish(rnd.number, new_flat)
        except QflareError as exc:
            _log.error("round %d failed to aggregate [%s]: %s", rnd.number, exc.code, exc)
            if exc.code in _UNSAFE_AGGREGATE:  # the sanity check of the new model: an attack or a bug
                self._store.record_security_event(
                    exc.code, f"round {rnd.number}: {exc}"[:2000], device_id=exc.device_id
                )
            self._store.set_round_state(rnd.number, state, "failed")
            self._round = None
            return
        if not already_aggregating:
            self._store.set_round_state(rnd.number, "open", "aggregating")
        metrics: dict[str, object] = {"updates": len(rnd.accepted), "examples": rnd.aggregation.total_examples}
        pipeline_state = encode_pipeline_state(self.strategy) if self._blobs is not None else None
        if (
            pipeline_state is not None and self._blobs is not None
        ):  # optimiser moments / noise: a restart continues them
            metrics["server_state"] = self._blobs.put(pipeline_state)[0]
        self._store.publish_model(rnd.number, rnd.number, published.sha256, published.envelope, metrics)
        self.model = published
        self._round = None
        if rnd.number >= self.config.rounds:
            self.finished = True
        if self._on_model is not None:
            self._on_model(published)
