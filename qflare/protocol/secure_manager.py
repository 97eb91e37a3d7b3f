"""The round manager's part for secure-aggregation rounds: open, serve, advance, store, resume.

:class:`~qflare.protocol.rounds.RoundManager` inherits these methods; the round logic itself is
:class:`~qflare.protocol.secure_round.SecureRound` (phases, deadlines, ledger record).  Everything here
runs under the round manager's lock.  Persistence: each accepted phase message and each phase close is
written to the store's ``secagg_rounds`` row (migration 0006) -- see :meth:`SecureRoundOps._persist_secure`
and :meth:`SecureRoundOps._resume_secure_round`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..crypto import SigningKey, Suite, VerifyKey
from ..crypto.payloads import Frame
from ..errors import (
    ErrorCode,
    ProtocolError,
    QflareError,
    RoundError,
    StorageFullError,
    UnknownDeviceError,
    WrongRoundError,
)
from ..ledger import LedgerEntry
from ..strategy import Pipeline
from ..wire import ParamLayout
from .messages import Route
from .provenance import next_entry
from .records import RoundRow
from .secure_round import SecureRound, lost_round_record
from .store import CoordinatorStore

if TYPE_CHECKING:
    from .rounds import OpenRound, PublishedModel, RoundConfig

__all__ = ["SecureRoundOps"]

_log = logging.getLogger("qflare.rounds")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class SecureRoundOps:
    """Secure-aggregation rounds of a :class:`~qflare.protocol.rounds.RoundManager` (a mixin: the
    attributes below are the manager's)."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _round: OpenRound | None
        _store: CoordinatorStore
        _identity: SigningKey
        _suite: Suite
        _clock: Callable[[], float]
        _weighting: str | None
        layout: ParamLayout
        model: PublishedModel
        strategy: Pipeline
        config: RoundConfig

        def _fail(self, rnd: OpenRound, reason: str) -> None: ...

        def _close(self, rnd: OpenRound) -> None: ...

    def _new_secure_round(self, number: int, chosen: tuple[str, ...], opened: float) -> SecureRound | None:
        """The secure round ``number`` over ``chosen`` (None when the pipeline is not secure)."""
        if self._weighting is None:
            return None
        return SecureRound.open(
            number=number,
            selected=chosen,
            keys={d: self._device_key(d) for d in chosen},
            identity=self._identity,
            suite=self._suite,
            length=self.layout.numel,
            weighting=self._weighting,
            settings=self.config.secagg,
            round_timeout_s=self.config.round_timeout_s,
            now=opened,
        )

    def _start_secure_round(self, rnd: OpenRound, secure: SecureRound) -> None:
        rnd.secure, secure.persist = secure, self._persist_secure
        try:
            self._persist_secure(secure, True, False)
        except StorageFullError as exc:  # retried with the next message; a restart meanwhile fails the round
            _log.warning("round %d: the secure round's state could not be stored: %s", rnd.number, exc)

    def _persist_secure(self, secure: SecureRound, total: bool, unmasking: bool) -> None:
        """Store ``secure``'s state (its running sum when it changed or was never stored)."""
        state, summed = secure.server.snapshot()
        self._store.save_secagg_round(
            secure.number,
            config=secure.public_doc(),
            state=state,
            total=summed if total or not secure.stored else None,
            phase_deadline=_utc(secure.phase_deadline),
            unmasking=unmasking,
        )
        secure.stored = True

    def _device_key(self, device_id: str) -> VerifyKey:
        row = self._store.get_device(device_id)
        if row is None:
            raise UnknownDeviceError(f"device {device_id[:16]}... is not enrolled", code="unknown_device")
        return VerifyKey.from_bytes(row.sig_alg, row.sig_public_key)

    def secure_message(
        self, device_id: str, route: Route, round_number: int, parts: list[bytes]
    ) -> tuple[Frame, list[bytes]]:
        """Serve one secure-aggregation request of ``device_id`` (already authenticated by its session):
        the reply frame and its parts.  A message that completes its phase advances the round, up to
        the publication of the aggregate."""
        with self._lock:
            rnd = self._round
            if rnd is None or rnd.number != round_number:
                raise WrongRoundError(f"round {round_number} is not the open round")
            secure = rnd.secure
            if secure is None:
                raise ProtocolError(f"round {rnd.number} is not a secure-aggregation round", code="secagg_mismatch")
            if route is Route.SECAGG_CONFIG:
                return Frame.SECAGG_CONFIG, [secure.config_json(device_id)]
            if route is Route.SECAGG_RELAY:
                return Frame.SECAGG_RELAY, secure.relay(device_id, parts[0])
            if rnd.closing:
                raise RoundError(f"round {rnd.number} is being published", code="round_not_open")
            secure.accept(device_id, route, parts)
            self._secure_advance(rnd)
            return Frame.SECAGG_ACK, []

    def _secure_advance(self, rnd: OpenRound) -> None:
        """Close the secure round's complete or expired phases; fail it when it aborts, publish its
        aggregate once unmasked."""
        assert rnd.secure is not None
        try:
            result = rnd.secure.advance(self._clock())
        except QflareError as exc:
            _log.warning("round %d: secure aggregation aborted [%s]: %s", rnd.number, exc.code, exc)
            self._fail(rnd, str(exc.code))
            return
        rnd.deadline = rnd.secure.phase_deadline
        if result is not None:
            rnd.accepted = {rnd.secure.selected[i - 1]: rnd.secure.vector_hashes[i] for i in result.survivors}
            self._close(rnd)

    def _secure_entry(self, rnd: OpenRound, reason: str | None, published: PublishedModel | None) -> LedgerEntry:
        """The signed ledger entry of a secure round (see :meth:`SecureRound.record`)."""
        assert rnd.secure is not None
        closed = int(self._clock())
        record = rnd.secure.record(
            outcome="closed" if published is not None else "failed",
            reason=reason,
            parent_model=rnd.base.sha256,
            model=None if published is None else published.sha256,
            model_version=None if published is None else published.version,
            opened=int(rnd.opened),
            closed=closed,
            pipeline=self.strategy,
        )
        return next_entry(self._store.last_ledger_entry(), record, self._identity, closed)

    def _resume_secure_round(self, row: RoundRow) -> None:
        """A restart found a secure round open: resume it from its stored state, every message checked
        again; fail it (``secagg_aborted``) when there is none, when it cannot be restored, or when the
        unmasking had begun (the result died with the process: the masks are never removed twice)."""
        from .rounds import OpenRound  # the manager's own type (rounds.py imports this module)

        stored = self._store.get_secagg_round(row.round_number)
        why = "no stored state" if stored is None else "the unmasking had begun" if stored.unmasking_at else None
        if stored is not None and why is None:
            try:
                secure = SecureRound.resume(
                    row,
                    stored,
                    keys={d: self._device_key(d) for d in row.selected_devices},
                    identity=self._identity,
                    suite=self._suite,
                )
            except QflareError as exc:
                why = f"its stored state does not restore ({exc.code}: {exc})"
            else:
                secure.stored, secure.persist = True, self._persist_secure
                self._round = OpenRound(
                    row.round_number,
                    tuple(row.selected_devices),
                    row.quorum,
                    row.min_participants,
                    secure.phase_deadline,
                    self.model,
                    self.strategy.begin(self.model.flat),
                    {},
                    opened=row.opened_at.timestamp(),
                    db_state=row.state,
                )
                self._round.secure = secure
                _log.warning("round %d: secure round resumed in phase %s", row.round_number, secure.phase.value)
                self._secure_advance(self._round)
                return
        _log.error("round %d: secure round cannot resume (%s); it fails", row.round_number, why)
        self._store.record_security_event(
            ErrorCode.SECAGG_ABORTED, f"round {row.round_number}: secure round not resumed at restart: {why}"[:2000]
        )
        now = int(self._clock())
        record = lost_round_record(row, self.model.sha256, now, self.strategy)
        entry = next_entry(self._store.last_ledger_entry(), record, self._identity, now)
        self._store.set_round_state(row.round_number, row.state, "failed", ledger=entry)
