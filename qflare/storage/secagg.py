"""Store operations for secure-aggregation rounds (``secagg_rounds``, migration 0006)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from qflare.errors import RoundError, ValidationError, WrongRoundError
from qflare.storage import tables as t
from qflare.storage._base import StoreBase, check_json, require_aware
from qflare.storage.records import SecAggRoundRow, snapshot

__all__ = ["SecAggOps"]


class SecAggOps(StoreBase):
    def save_secagg_round(
        self,
        round_number: int,
        *,
        config: dict[str, Any],
        state: str,
        total: bytes | None,
        phase_deadline: datetime,
        unmasking: bool = False,
    ) -> None:
        """Write the state of OPEN secure round ``round_number`` in one transaction (``total`` None keeps
        the stored running sum, which is then not read either; ``unmasking`` stamps ``unmasking_at``, which
        is never cleared).  RoundError ``round_state_conflict`` unless the round is open."""
        due = require_aware(phase_deadline, "phase_deadline")
        doc = check_json(config, "config")
        if not isinstance(state, str):
            raise ValidationError("secure-aggregation state must be text")
        with self._write() as s:
            rnd = s.get(t.Round, round_number)
            if rnd is None:
                raise WrongRoundError(f"unknown round {round_number}")
            if rnd.state != "open":
                raise RoundError(f"round {round_number} is {rnd.state}, not open", code="round_state_conflict")
            now = self._now()
            row = s.get(t.SecAggRound, round_number)
            if row is None:
                if total is None:
                    raise ValidationError("the first state of a secure round carries its running sum")
                s.add(
                    t.SecAggRound(
                        round_number=round_number,
                        config=doc,
                        state=state,
                        total=total,
                        phase_deadline=due,
                        unmasking_at=now if unmasking else None,
                        updated_at=now,
                    )
                )
                return
            if row.config != doc:
                raise ValidationError("a secure round's configuration does not change")
            row.state, row.phase_deadline, row.updated_at = state, due, now
            if total is not None:
                row.total = total
            if unmasking and row.unmasking_at is None:
                row.unmasking_at = now

    def get_secagg_round(self, round_number: int) -> SecAggRoundRow | None:
        with self._read() as s:
            row = s.get(t.SecAggRound, round_number)
            return None if row is None else snapshot(SecAggRoundRow, row)
