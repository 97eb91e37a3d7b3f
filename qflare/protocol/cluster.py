"""The round manager's part in a coordinator of several workers (``qflare server --workers N`` / ``--cluster``).

Every worker runs a :class:`~qflare.protocol.rounds.RoundManager` on the same store.  The round state
machine lives in the store (rounds, updates and model versions, moved by compare-and-set transitions);
each worker's in-memory round is a copy it *follows* from the store at every step (and at once, through
:meth:`ClusterRoundOps.catch_up`, when an update names a round opened since its last step).  Any worker
accepts an update: it checks it, writes its blob, records its row (the store refuses a row unless the round is
open and before its deadline, under a shared lock on the round's row) and acknowledges it.  Only the
*leader* (:class:`Leadership`, a PostgreSQL advisory lock in :mod:`qflare.storage.leader`) opens rounds,
enforces deadlines and closes rounds.

Closing is the one place where the workers' work meets: the leader first moves the round from ``open``
to ``aggregating`` (which waits for every row being recorded under the round's lock and refuses every
later one), then reads the round's updates back from the blob store and folds them in **in the order
of the round's selection** -- not in the order they happened to arrive at the workers -- so that one,
two or three workers give bit-identical models for the same seed.  (Partial sums kept by each worker
and added at the end would not: floating-point addition is not associative, so the bits of the result
would depend on which worker took which update.)  Every rule works the same way, robust rules and
threat detection included, since every update is read.

A leader killed in the middle of a close leaves the round ``aggregating``; the next leader finds it so
and closes it again from the stored updates (same order, same model bytes).  A publication is a
compare-and-set from ``aggregating`` to ``closed`` in the transaction that appends the round's ledger
entry, so a round is published once even if a leader that lost its lock keeps running.

Not cluster-aware (refused at start): secure aggregation, whose round state is the coordinator's memory
between phases.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import QflareError, StorageFullError
from ..strategy import ClientUpdate, Pipeline, PreparedUpdate, RoundAggregation
from ..wire import ParamLayout, decode_blob
from .provenance import QUORUM_NOT_REACHED
from .records import RoundRow, UpdateRow
from .store import BlobSink, CoordinatorStore

if TYPE_CHECKING:
    from .detection import Detector
    from .rounds import OpenRound, PublishedModel, RoundConfig

__all__ = ["CLOCK_SKEW_S", "ClusterRoundOps", "Leadership"]

CLOCK_SKEW_S = 60.0
"""How far apart the workers' and the blob store's clocks may be (garbage collection keeps any blob
written later than this before its previous pass began)."""

_log = logging.getLogger("qflare.rounds")


class Leadership(Protocol):
    """Who, among the workers on one store, runs the round state machine (one at a time)."""

    def leading(self) -> bool:
        """True when this worker leads now (taking the leadership when it is free)."""
        ...

    def release(self) -> None:
        """Give the leadership up."""
        ...


class ClusterRoundOps:
    """Cluster rounds of a :class:`~qflare.protocol.rounds.RoundManager` (a mixin: the attributes
    below are the manager's)."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _round: OpenRound | None
        _store: CoordinatorStore
        _blobs: BlobSink | None
        _clock: Callable[[], float]
        _leadership: Leadership | None
        _gc_suspects: set[str]
        _gc_pass_at: float | None
        layout: ParamLayout
        model: PublishedModel
        strategy: Pipeline
        config: RoundConfig
        detector: Detector | None
        finished: bool

        def _recover_model(self, version: int, digest: str) -> PublishedModel: ...

        def _fail(self, rnd: OpenRound, reason: str) -> None: ...

        def _begin_privacy_of(self, row: RoundRow) -> None: ...

        def _report_unreadable(self, round_number: int, upd: UpdateRow, exc: QflareError, when: str) -> None: ...

        def _close(self, rnd: OpenRound) -> None: ...

        def open_next(self) -> OpenRound | None: ...

    @property
    def clustered(self) -> bool:
        """Whether this manager is one worker of several on a shared store."""
        return self._leadership is not None

    def catch_up(self) -> OpenRound | None:
        """This worker's round, brought up to the store's now (outside a cluster: the round as it is).  For
        a request about a round this worker has not followed yet: the store moved since its last step."""
        with self._lock:
            if self._leadership is not None:
                self._follow()
            return self._round

    def _follow(self) -> None:
        """Bring this worker's copy of the model and the round up to the store's (under the round lock)."""
        latest = self._store.latest_model()
        if latest is not None and latest.version != self.model.version:
            self.model = self._recover_model(latest.version, latest.model_hash)
        row = self._store.current_round()
        if row is None or row.state not in ("open", "aggregating"):
            self._round = None
            self.finished = (
                row is not None and row.round_number >= self.config.rounds and row.state in ("closed", "failed")
            )
            return
        rnd = self._round
        if rnd is None or rnd.number != row.round_number:
            if row.base_model_hash != self.model.sha256:  # not the latest model: a store we cannot follow
                _log.error("round %d is based on a model that is not the latest one", row.round_number)
                self._round = None
                return
            rnd = self._round = self._round_from_row(row)
            self._begin_privacy_of(row)
        if rnd.result is None:
            rnd.db_state = row.state
        rnd.deadline = row.deadline.timestamp()
        if self._store.count_updates(row.round_number) != len(rnd.accepted):  # one cheap query at most steps
            for upd in self._store.updates_for_round(row.round_number):
                rnd.accepted.setdefault(upd.device_id, upd.update_hash)

    def _round_from_row(
        self,
        row: RoundRow,
        aggregation: RoundAggregation | None = None,
        accepted: dict[str, str] | None = None,
        deadline: float | None = None,
    ) -> OpenRound:
        """The stored round ``row`` on the current model (a fresh aggregation and nothing accepted unless given)."""
        from .rounds import OpenRound

        return OpenRound(
            row.round_number,
            tuple(row.selected_devices),
            row.quorum,
            row.min_participants,
            row.deadline.timestamp() if deadline is None else deadline,
            self.model,
            self.strategy.begin(self.model.flat) if aggregation is None else aggregation,
            {} if accepted is None else accepted,
            opened=row.opened_at.timestamp(),
            db_state=row.state,
        )

    def _cluster_step(self) -> OpenRound | None:
        """A worker's step: follow the store; the leader also runs deadlines, quorum, closes and opens."""
        assert self._leadership is not None
        leading = self._leadership.leading()  # a database round trip: not under the round lock uploads need
        with self._lock:
            self._follow()
            if not leading:
                return self._round
            rnd = self._round
            if rnd is not None and (rnd.closing or len(rnd.accepted) >= rnd.quorum or self._clock() >= rnd.deadline):
                self._close_clustered(rnd)
            if self._round is None and not self.finished:
                active = self._store.list_devices(status="active")
                if len(active) >= self.config.min_devices:
                    self.open_next()
            return self._round

    def _close_clustered(self, rnd: OpenRound) -> None:
        """Stop the round taking updates (``open`` -> ``aggregating``, which waits for every update being
        recorded under the round's row lock and refuses later ones), then count and fold in what was
        recorded: publish when it is at least ``min_participants``, else fail the round.  Counting before
        that transition would race a worker still recording an update (acknowledged, then dropped)."""
        if rnd.db_state == "open":
            try:
                self._store.set_round_state(rnd.number, "open", "aggregating")
            except QflareError as exc:  # another leader moved it: follow the store at the next step
                _log.warning("round %d: not closed here (%s)", rnd.number, exc)
                self._round = None
                return
            rnd.db_state = "aggregating"
        if rnd.result is None:
            if not self._gather(rnd):
                return
            if len(rnd.accepted) < rnd.min_participants:
                self._fail_clustered(rnd, QUORUM_NOT_REACHED)
                return
        self._close(rnd)

    def _fail_clustered(self, rnd: OpenRound, reason: str) -> None:
        try:
            self._fail(rnd, reason)
        except QflareError as exc:
            _log.warning("round %d: not failed here (%s)", rnd.number, exc)
        self._round = None

    def _gather(self, rnd: OpenRound) -> bool:
        """Rebuild ``rnd``'s aggregation from the stored updates, in selection order.  False when it cannot:
        the blob store is unreachable or full for now (the round stays aggregating; the next step tries
        again), or an acknowledged update cannot be read back or no longer passes the checks (the round is
        failed, with a security event naming the update)."""
        assert self._blobs is not None
        position = {device: i for i, device in enumerate(rnd.selected)}
        rows = sorted(
            self._store.updates_for_round(rnd.number), key=lambda u: (position.get(u.device_id, len(position)), u.id)
        )
        agg = self.strategy.begin(rnd.base.flat)
        held: dict[str, tuple[torch.Tensor, PreparedUpdate]] = {}
        accepted: dict[str, str] = {}
        for upd in rows:
            try:
                blob = self._blobs.get(upd.update_hash)
                flat = decode_blob(blob, self.layout, kind="update", expected_sha256=upd.update_hash).flat
                update = ClientUpdate(upd.device_id, flat, upd.num_examples, dict(upd.metrics))
                prepared = agg.check(update)
            except StorageFullError as exc:
                _log.warning("round %d: the blob store cannot be read now, closing later: %s", rnd.number, exc)
                return False
            except QflareError as exc:  # a damaged store, or a check that no longer passes
                self._report_unreadable(rnd.number, upd, exc, "at close")
                rnd.accepted = {u.device_id: u.update_hash for u in rows}
                self._fail_clustered(rnd, str(exc.code))
                return False
            if self.detector is not None:
                held[upd.device_id] = (flat, prepared)
            else:
                agg.commit(prepared)
            accepted[upd.device_id] = upd.update_hash
        rnd.aggregation, rnd.accepted, rnd.held = agg, accepted, held
        return True

    def _collect_clustered(self, listed: list[str], referenced: set[str]) -> list[str]:
        """The blobs a cluster's leader may delete: unreferenced at its previous pass and now, and not written
        since that pass began.  Another worker may be between writing a blob and recording its row (an
        upload takes seconds; passes are minutes apart), and a retry may rewrite the very bytes of a blob
        that was an orphan at the previous pass -- the write time tells that rewrite apart."""
        if self._leadership is None or not self._leadership.leading():
            return []
        assert self._blobs is not None
        now = self._clock()
        unreferenced = {d for d in listed if d not in referenced}
        previous, since = self._gc_suspects, self._gc_pass_at
        doomed = []
        for digest in sorted(unreferenced & previous):
            written = self._blobs.written_at(digest)
            if written is not None and since is not None and written < since - CLOCK_SKEW_S:
                doomed.append(digest)
        self._gc_suspects, self._gc_pass_at = unreferenced - set(doomed), now
        return doomed
