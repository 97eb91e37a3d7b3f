"""Store operations for rounds, submitted updates and model versions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qflare.errors import (
    PolicyError,
    QflareError,
    ReplayError,
    RevokedError,
    RoundError,
    StaleModelError,
    UnknownDeviceError,
    ValidationError,
    WrongRoundError,
)
from qflare.ledger import LedgerEntry
from qflare.storage import tables as t
from qflare.storage._base import (
    StoreBase,
    check_json,
    check_nonempty,
    finite_int,
    require_aware,
)
from qflare.storage.ledger import insert_ledger
from qflare.storage.records import ModelRow, NewUpdate, RoundRow, UpdateRow, snapshot

__all__ = ["ROUND_FIELDS", "ROUND_TRANSITIONS", "TrainingOps"]

#: Legal ``set_round_state`` moves; "closed" and "failed" are terminal.
ROUND_TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "open": frozenset({"aggregating", "failed"}),
    "aggregating": frozenset({"closed", "failed"}),
}
#: Columns ``set_round_state`` may change alongside the state.
ROUND_FIELDS: Final[frozenset[str]] = frozenset({"deadline", "closed_at", "result_model_hash"})


class TrainingOps(StoreBase):
    # -- rounds -------------------------------------------------------------------------------

    def open_round(
        self,
        round_number: int,
        base_model_hash: str,
        selected: Sequence[str],
        min_participants: int,
        quorum: int,
        deadline: datetime,
        *,
        now: datetime | None = None,
    ) -> RoundRow:
        """Open a new round.  Numbers strictly increase and only one round is open/aggregating."""
        finite_int(round_number, "round_number", 0)
        check_nonempty(base_model_hash, "base_model_hash", 128)
        finite_int(min_participants, "min_participants", 1)
        finite_int(quorum, "quorum", 1)
        chosen = list(selected)
        if any(not isinstance(d, str) or not d for d in chosen) or len(set(chosen)) != len(chosen):
            raise ValidationError("selected must be distinct, non-empty device ids")
        opened = self._now(now)
        due = require_aware(deadline, "deadline")
        if due <= opened:
            raise ValidationError("round deadline must be in the future")
        try:
            with self._write() as s:
                self._lock_table(s, "rounds")
                last = s.scalars(select(t.Round).order_by(t.Round.round_number.desc()).limit(1)).first()
                if last is not None:
                    if last.round_number == round_number:
                        raise RoundError(f"round {round_number} exists", code="round_exists")
                    if round_number < last.round_number:
                        raise RoundError(
                            f"round {round_number} is not after round {last.round_number}",
                            code="round_number_not_increasing",
                        )
                    if last.state in ROUND_TRANSITIONS:
                        raise RoundError(
                            f"round {last.round_number} is still {last.state}",
                            code="round_in_progress",
                        )
                row = t.Round(
                    round_number=round_number,
                    state="open",
                    base_model_hash=base_model_hash,
                    selected_devices=chosen,
                    min_participants=min_participants,
                    quorum=quorum,
                    deadline=due,
                    opened_at=opened,
                    closed_at=None,
                    result_model_hash=None,
                )
                s.add(row)
                s.flush()
                return snapshot(RoundRow, row)
        except IntegrityError as exc:
            raise RoundError(f"round {round_number} exists", code="round_exists") from exc

    def get_round(self, round_number: int) -> RoundRow | None:
        with self._read() as s:
            row = s.get(t.Round, round_number)
            return None if row is None else snapshot(RoundRow, row)

    def current_round(self) -> RoundRow | None:
        """The highest-numbered round, whatever its state; ``None`` before the first round."""
        with self._read() as s:
            row = s.scalars(select(t.Round).order_by(t.Round.round_number.desc()).limit(1)).first()
            return None if row is None else snapshot(RoundRow, row)

    def list_rounds(self, limit: int | None = None) -> list[RoundRow]:
        """Rounds in ascending order; with ``limit``, the newest ``limit`` of them."""
        with self._read() as s:
            stmt = select(t.Round).order_by(t.Round.round_number.desc())
            if limit is not None:
                stmt = stmt.limit(finite_int(limit, "limit", 0))
            return [snapshot(RoundRow, r) for r in reversed(list(s.scalars(stmt)))]

    def set_round_state(
        self,
        round_number: int,
        from_state: str,
        to_state: str,
        *,
        now: datetime | None = None,
        ledger: LedgerEntry | None = None,
        **fields: Any,
    ) -> RoundRow:
        """Compare-and-set the round's state; refuses unless it is currently ``from_state``.

        ``fields`` may set ``deadline``, ``closed_at`` and ``result_model_hash``.  Entering a
        terminal state stamps ``closed_at`` (default: now); "closed" requires a result model hash.
        ``ledger``, only with ``to_state="failed"``, is the round's signed ledger entry, appended in the
        same transaction (see :func:`qflare.storage.ledger.insert_ledger`).
        """
        if to_state not in ROUND_TRANSITIONS.get(from_state, frozenset()):
            raise RoundError(f"illegal transition {from_state} -> {to_state}", code="bad_transition")
        unknown = set(fields) - ROUND_FIELDS
        if unknown:
            raise ValidationError(f"set_round_state cannot set {sorted(unknown)}")
        if ledger is not None and to_state != "failed":
            raise ValidationError(
                "a ledger entry goes with the failed transition (publish_model writes the closed one)"
            )
        values = self._round_values(fields)
        if to_state not in ROUND_TRANSITIONS:
            values.setdefault("closed_at", self._now(now))
        try:
            with self._write() as s:
                row = self._cas_round(s, round_number, from_state, to_state, values)
                if ledger is not None:
                    insert_ledger(s, self._lock_table, ledger, values["closed_at"], round_number=round_number)
                return row
        except IntegrityError as exc:
            raise ReplayError("ledger entry hash already present", code="ledger_conflict") from exc

    def _round_values(self, fields: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in ("deadline", "closed_at"):
            if name in fields:
                values[name] = require_aware(fields[name], name)
        if "result_model_hash" in fields:
            values["result_model_hash"] = check_nonempty(fields["result_model_hash"], "result_model_hash", 128)
        return values

    def _cas_round(
        self, s: Session, round_number: int, from_state: str, to_state: str, values: dict[str, Any]
    ) -> RoundRow:
        stmt = (
            update(t.Round)
            .where(t.Round.round_number == round_number, t.Round.state == from_state)
            .values(state=to_state, **values)
            .execution_options(synchronize_session=False)
        )
        changed = cast(CursorResult[Any], s.execute(stmt)).rowcount == 1
        row = s.get(t.Round, round_number, populate_existing=True)
        if row is None:
            raise WrongRoundError(f"unknown round {round_number}")
        if not changed:
            raise RoundError(
                f"round {round_number} is {row.state}, not {from_state}",
                code="round_state_conflict",
            )
        if to_state == "closed" and row.result_model_hash is None:
            raise ValidationError("closing a round needs result_model_hash")
        return snapshot(RoundRow, row)

    # -- updates ------------------------------------------------------------------------------

    def record_update(
        self,
        round_number: int,
        device_id: str,
        update_hash: str,
        base_model_hash: str,
        num_examples: int,
        signature: bytes,
        metrics: dict[str, Any],
        *,
        envelope: bytes | None = None,
        now: datetime | None = None,
    ) -> tuple[UpdateRow, bool]:
        """Store a device's update for an open round, idempotently.

        ``envelope`` is the exact signed UPDATE envelope (it must end with ``signature``), kept so that
        the signature re-verifies from the database.  Resubmitting the same ``update_hash`` returns
        ``(existing, False)``; a different hash for the same (round, device) raises
        ReplayError("duplicate_submission").
        """
        args = self._update_args(
            NewUpdate(
                round_number, device_id, update_hash, base_model_hash, num_examples, signature, metrics, envelope
            ),
            self._now(now),
        )
        try:
            with self._write() as s:
                return self._record_update(s, *args)
        except IntegrityError:
            # A concurrent insert for the same (round, device) committed first; running again
            # finds it and answers idempotently (or with duplicate_submission).
            with self._write() as s:
                return self._record_update(s, *args)

    def record_updates(self, batch: Sequence[NewUpdate]) -> list[tuple[UpdateRow, bool] | QflareError]:
        """:meth:`record_update` for several updates in ONE transaction: one commit (one fsync) for the
        batch, a group commit.  Each entry's outcome is what ``record_update`` would give it, its result
        or the QflareError refusing it (a refused entry writes nothing; the others are still recorded).
        Nothing of the batch is durable before this returns; a failure of the transaction itself (full
        disk, database down) raises and records none of them."""
        at = self._now()
        prepared: list[tuple[Any, ...] | QflareError] = []
        for entry in batch:
            try:
                prepared.append(self._update_args(entry, at))
            except QflareError as exc:
                prepared.append(exc)
        outcomes: list[tuple[UpdateRow, bool] | QflareError] = []
        try:
            with self._write() as s:
                for args in prepared:
                    if isinstance(args, QflareError):
                        outcomes.append(args)
                        continue
                    try:
                        outcomes.append(self._record_update(s, *args))
                    except QflareError as exc:  # raised before its row is added: the others go on
                        outcomes.append(exc)
        except IntegrityError:  # another writer inserted one of these rows meanwhile: each on its own
            outcomes = [args if isinstance(args, QflareError) else self._record_alone(args) for args in prepared]
        return outcomes

    def _record_alone(self, args: tuple[Any, ...]) -> tuple[UpdateRow, bool] | QflareError:
        try:
            with self._write() as s:
                return self._record_update(s, *args)
        except QflareError as exc:
            return exc

    def _update_args(self, u: NewUpdate, at: datetime) -> tuple[Any, ...]:
        check_nonempty(u.update_hash, "update_hash", 128)
        check_nonempty(u.base_model_hash, "base_model_hash", 128)
        finite_int(u.num_examples, "num_examples", 0)
        if not isinstance(u.signature, bytes | bytearray) or not u.signature:
            raise ValidationError("signature must be non-empty bytes")
        if u.envelope is not None and (
            not isinstance(u.envelope, bytes | bytearray) or not bytes(u.envelope).endswith(bytes(u.signature))
        ):
            raise ValidationError("envelope must be the signed bytes ending with the signature")
        clean = check_json(u.metrics, "metrics")
        envelope = None if u.envelope is None else bytes(u.envelope)
        return (
            u.round_number,
            u.device_id,
            u.update_hash,
            u.base_model_hash,
            u.num_examples,
            bytes(u.signature),
            clean,
            at,
            envelope,
        )

    def _record_update(
        self,
        s: Session,
        round_number: int,
        device_id: str,
        update_hash: str,
        base_hash: str,
        num_examples: int,
        signature: bytes,
        metrics: dict[str, Any],
        at: datetime,
        envelope: bytes | None,
    ) -> tuple[UpdateRow, bool]:
        # FOR SHARE: a concurrent open -> aggregating CAS waits until this insert commits, so the
        # aggregator never misses an update accepted while the round was open.
        rnd = s.get(t.Round, round_number, with_for_update={"read": True})
        if rnd is None:
            raise WrongRoundError(f"unknown round {round_number}")
        existing = s.scalars(
            select(t.Update).where(t.Update.round_number == round_number, t.Update.device_id == device_id)
        ).first()
        if existing is not None:
            if existing.update_hash == update_hash:
                return snapshot(UpdateRow, existing), False
            raise ReplayError(
                f"device {device_id} already submitted a different update for round {round_number}",
                code="duplicate_submission",
            )
        if rnd.state != "open":
            raise RoundError(f"round {round_number} is {rnd.state}", code="round_not_open")
        if at > rnd.deadline:
            raise RoundError(f"round {round_number} deadline has passed", code="deadline_passed")
        device = s.get(t.Device, device_id)
        if device is None:
            raise UnknownDeviceError(f"unknown device {device_id}")
        if device.status == "quarantined":
            raise PolicyError(f"device {device_id} is quarantined", code="quarantined")
        if device.status != "active":
            raise RevokedError(f"device {device_id} is revoked")
        if rnd.selected_devices and device_id not in rnd.selected_devices:
            raise PolicyError(f"device {device_id} not selected for round {round_number}", code="not_selected")
        if base_hash != rnd.base_model_hash:
            raise StaleModelError(f"update trained on {base_hash}, round uses {rnd.base_model_hash}")
        row = t.Update(
            round_number=round_number,
            device_id=device_id,
            update_hash=update_hash,
            base_model_hash=base_hash,
            num_examples=num_examples,
            signature=signature,
            metrics=metrics,
            received_at=at,
            envelope=envelope,
        )
        s.add(row)
        s.flush()
        return snapshot(UpdateRow, row), True

    def extend_round_deadline(self, round_number: int, deadline: datetime) -> RoundRow:
        """Move an OPEN round's deadline (a restart gives the devices the time its downtime took)."""
        due = require_aware(deadline, "deadline")
        with self._write() as s:
            stmt = (
                update(t.Round)
                .where(t.Round.round_number == round_number, t.Round.state == "open")
                .values(deadline=due)
                .execution_options(synchronize_session=False)
            )
            changed = cast(CursorResult[Any], s.execute(stmt)).rowcount == 1
            row = s.get(t.Round, round_number, populate_existing=True)
            if row is None:
                raise WrongRoundError(f"unknown round {round_number}")
            if not changed:
                raise RoundError(f"round {round_number} is {row.state}, not open", code="round_state_conflict")
            return snapshot(RoundRow, row)

    def referenced_blobs(self) -> set[str]:
        """Every blob digest the database refers to: update blobs, model blobs, server-state and detector-state blobs."""
        with self._read() as s:
            found = set(s.scalars(select(t.Update.update_hash)))
            for model_hash, metrics in s.execute(select(t.ModelVersion.model_hash, t.ModelVersion.metrics)):
                found.add(model_hash)
                for key in ("server_state", "detection_state"):
                    state = (metrics or {}).get(key)
                    if isinstance(state, str):
                        found.add(state)
            return found

    def updates_for_round(self, round_number: int) -> list[UpdateRow]:
        with self._read() as s:
            stmt = select(t.Update).where(t.Update.round_number == round_number).order_by(t.Update.id)
            return [snapshot(UpdateRow, r) for r in s.scalars(stmt)]

    def count_updates(self, round_number: int | None = None) -> int:
        """Updates recorded for ``round_number``, or in all rounds when it is ``None``."""
        with self._read() as s:
            stmt = select(func.count()).select_from(t.Update)
            if round_number is not None:
                stmt = stmt.where(t.Update.round_number == round_number)
            return int(s.scalar(stmt) or 0)

    # -- model versions -----------------------------------------------------------------------

    def add_model_version(
        self,
        version: int,
        round_number: int | None,
        model_hash: str,
        parent_hash: str | None,
        signature: bytes,
        metrics: dict[str, Any],
        *,
        created_at: datetime | None = None,
    ) -> ModelRow:
        """Append to the model lineage: ``version`` = latest + 1, ``parent_hash`` = latest's hash."""
        at = self._now(created_at, "created_at")
        with self._write() as s:
            return self._insert_model(s, version, round_number, model_hash, parent_hash, signature, metrics, at)

    def publish_model(
        self,
        round_number: int,
        version: int,
        model_hash: str,
        signature: bytes,
        metrics: dict[str, Any],
        *,
        now: datetime | None = None,
        ledger: LedgerEntry | None = None,
    ) -> tuple[RoundRow, ModelRow]:
        """In ONE transaction: close an aggregating round with its result, add the version and append
        ``ledger``, the round's signed ledger entry (which must name this model and version).

        The new version's parent is the round's base model, which must be the latest model.
        """
        at = self._now(now)
        check_nonempty(model_hash, "model_hash", 128)
        if ledger is not None and (ledger.body.get("model"), ledger.body.get("model_version")) != (model_hash, version):
            raise ValidationError("the ledger entry does not name the model being published")
        try:
            with self._write() as s:
                rnd = s.get(t.Round, round_number)
                if rnd is None:
                    raise WrongRoundError(f"unknown round {round_number}")
                model = self._insert_model(
                    s, version, round_number, model_hash, rnd.base_model_hash, signature, metrics, at
                )
                values = {"result_model_hash": model_hash, "closed_at": at}
                row = self._cas_round(s, round_number, "aggregating", "closed", values)
                if ledger is not None:
                    insert_ledger(s, self._lock_table, ledger, at, round_number=round_number)
                return row, model
        except IntegrityError as exc:
            raise ReplayError("ledger entry hash already present", code="ledger_conflict") from exc

    def _insert_model(
        self,
        s: Session,
        version: int,
        round_number: int | None,
        model_hash: str,
        parent_hash: str | None,
        signature: bytes,
        metrics: dict[str, Any],
        at: datetime,
    ) -> ModelRow:
        finite_int(version, "version", 0)
        check_nonempty(model_hash, "model_hash", 128)
        if not isinstance(signature, bytes | bytearray) or not signature:
            raise ValidationError("signature must be non-empty bytes")
        clean = check_json(metrics, "metrics")
        self._lock_table(s, "model_versions")
        if round_number is not None and s.get(t.Round, round_number) is None:
            raise WrongRoundError(f"unknown round {round_number}")
        if s.get(t.ModelVersion, version) is not None:
            raise ReplayError(f"model version {version} exists", code="model_version_exists")
        latest = s.scalars(select(t.ModelVersion).order_by(t.ModelVersion.version.desc()).limit(1)).first()
        if latest is not None:
            if version != latest.version + 1:
                raise StaleModelError(f"next model version is {latest.version + 1}, not {version}")
            if parent_hash != latest.model_hash:
                raise StaleModelError(f"parent {parent_hash} is not the latest {latest.model_hash}")
        row = t.ModelVersion(
            version=version,
            round_number=round_number,
            model_hash=model_hash,
            parent_hash=parent_hash,
            signature=bytes(signature),
            metrics=clean,
            created_at=at,
        )
        s.add(row)
        s.flush()
        return snapshot(ModelRow, row)

    def latest_model(self) -> ModelRow | None:
        with self._read() as s:
            stmt = select(t.ModelVersion).order_by(t.ModelVersion.version.desc()).limit(1)
            row = s.scalars(stmt).first()
            return None if row is None else snapshot(ModelRow, row)

    def get_model(self, version: int) -> ModelRow | None:
        with self._read() as s:
            row = s.get(t.ModelVersion, version)
            return None if row is None else snapshot(ModelRow, row)

    def list_models(self) -> list[ModelRow]:
        """Every model version, in ascending order."""
        with self._read() as s:
            return [snapshot(ModelRow, r) for r in s.scalars(select(t.ModelVersion).order_by(t.ModelVersion.version))]

    def record_model_evaluation(self, version: int, evaluation: dict[str, Any]) -> ModelRow:
        """Store an evaluation of a model version under ``metrics["eval"]`` (replacing an earlier one)."""
        clean = check_json(evaluation, "evaluation")
        with self._write() as s:
            row = s.get(t.ModelVersion, version, with_for_update=True)
            if row is None:
                raise StaleModelError(f"unknown model version {version}", code="unknown_model")
            row.metrics = {**dict(row.metrics), "eval": clean}
            s.flush()
            return snapshot(ModelRow, row)
