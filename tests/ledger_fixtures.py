"""Helpers for the ledger tests: synthetic round entries, chains and export files (fixed seeds)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from qflare.crypto.identity import SigningKey
from qflare.ledger import GENESIS_PREV, LedgerEntry, LeftOut, RoundRecord, RoundUpdate, entry_line, header_line

__all__ = ["chain", "coordinator_key", "h", "round_entry", "write_export"]


def h(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def coordinator_key(label: str = "coordinator") -> SigningKey:
    return SigningKey.from_seed("ML-DSA-65", hashlib.sha256(f"qflare-test/{label}".encode()).digest())


def round_entry(
    key: SigningKey,
    *,
    seq: int,
    prev: str,
    round_number: int,
    parent: str,
    model: str | None,
    updates: Sequence[RoundUpdate] = (),
    left_out: Sequence[LeftOut] = (),
    time: int = 1_700_000_000,
) -> LedgerEntry:
    record = RoundRecord(
        round_number=round_number,
        outcome="closed" if model is not None else "failed",
        reason=None if model is not None else "quorum_not_reached",
        parent_model=parent,
        model=model,
        model_version=None if model is None else round_number,
        updates=tuple(updates),
        left_out=tuple(left_out),
        quorum=max(1, len(updates) + len(left_out)),
        min_participants=1,
        opened=time - 60,
        closed=time,
        pipeline={"combine": "WeightedMean()"},
        dp=None,
    )
    return LedgerEntry.create(
        "round", seq=seq, prev_hash=prev, round_number=round_number, time=time, fields=record.fields(), keys=[key]
    )


def chain(key: SigningKey, rounds: int, updates: int = 3, *, failed: Sequence[int] = ()) -> list[LedgerEntry]:
    """Round entries 1..rounds (rounds in ``failed`` fail), each with ``updates`` synthetic updates."""
    out: list[LedgerEntry] = []
    prev, model = GENESIS_PREV, h("model", 0)
    for r in range(1, rounds + 1):
        ups = [RoundUpdate(h("device", j), h("update", r, j), 10 + j) for j in range(updates)]
        new = None if r in failed else h("model", r)
        entry = round_entry(key, seq=r, prev=prev, round_number=r, parent=model, model=new, updates=ups)
        out.append(entry)
        prev = entry.entry_hash
        model = new or model
    return out


def write_export(path: Path, key: SigningKey, entries: Sequence[LedgerEntry], *, count: int | None = None) -> Path:
    lines = [header_line(key.public, [], len(entries) if count is None else count)]
    lines += [entry_line(e, [None] * len(e.body["updates"])) for e in entries]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
