"""What the round manager writes to the provenance ledger: the ``round`` entry of a closed or failed round.

The entry format lives in :mod:`qflare.ledger` (docs/provenance.md); this module turns the round
manager's knowledge (the round's row, its accepted updates, its refusals, the strategy pipeline) into a
:class:`~qflare.ledger.RoundRecord` and signs the next entry of the chain with the coordinator key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto import SigningKey, VerifyKey
from ..errors import ConfigError
from ..ledger import GENESIS_PREV, LedgerEntry, LeftOut, RoundRecord, RoundUpdate, decimal, entry_line, header_line
from ..strategy import Pipeline
from ..strategy.dp import DPFedAvg, privacy_of
from ..strategy.noise import GaussianNoise
from ..strategy.transforms import ClipNorm
from .records import LedgerRow, UpdateRow
from .store import CoordinatorStore

__all__ = [
    "NOT_COMBINED",
    "NO_UPDATE",
    "QUORUM_NOT_REACHED",
    "ExportSummary",
    "describe_pipeline",
    "entry_of",
    "export_ledger",
    "next_entry",
    "round_record",
]

NO_UPDATE = "no_update"
"""left_out reason: a selected device whose update was never recorded."""
NOT_COMBINED = "not_combined"
"""left_out reason: an acknowledged update the combine did not use (Krum / Multi-Krum's rejects)."""
QUORUM_NOT_REACHED = "quorum_not_reached"
"""Failure reason: the deadline passed with fewer than ``min_participants`` updates."""


def describe_pipeline(pipeline: Pipeline, num_updates: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(pipeline description, DP parameters) for a round entry.

    Parts are described by their ``repr``; the noise is described by its class name only, and its
    parameters go to the DP object *without* the noise seed (publishing it would let anyone subtract
    the noise).  A bare noise part runs no privacy accountant, so it claims no (epsilon, delta); DP-FedAvg
    (:mod:`qflare.strategy.dp`) records its round's release and the (epsilon, delta) spent after it."""
    noise = pipeline.noise
    mechanism = privacy_of(pipeline)
    described: dict[str, Any] = {
        "checks": [repr(c) for c in pipeline.checks],
        "weighting": repr(pipeline.weighting),
        "transforms": [repr(t) for t in pipeline.transforms],
        "combine": repr(pipeline.combine),
        "noise": None if noise is None else type(noise).__name__,
        "server_opt": repr(pipeline.server_opt),
        "secure_aggregation": pipeline.secure_aggregation,
        "max_model_abs": decimal(pipeline.max_model_abs),
    }
    if mechanism is not None:
        return described, _dp_fedavg(mechanism, num_updates)
    if noise is None:
        return described, None
    clips = [t.max_norm for t in pipeline.transforms if isinstance(t, ClipNorm)]
    dp: dict[str, Any] = {
        "mechanism": type(noise).__name__,
        "clip_norm": decimal(min(clips)) if clips else None,
        "noised_updates": num_updates,
        "accountant": None,
    }
    if isinstance(noise, GaussianNoise):
        applied = noise.stddev / num_updates if noise.divide_by_count and num_updates else noise.stddev
        dp.update(
            stddev=decimal(noise.stddev),
            divide_by_count=noise.divide_by_count,
            applied_stddev=decimal(applied),
        )
    return described, dp


def _dp_fedavg(mechanism: DPFedAvg, num_updates: int) -> dict[str, Any]:
    """DP-FedAvg's object: the mechanism, this round's clip and noise, and the spent (epsilon, delta)."""
    last = mechanism.last
    spent = mechanism.spent()
    dp: dict[str, Any] = {
        "mechanism": "DPFedAvg",
        "noised_updates": num_updates,
        "noise_multiplier": decimal(mechanism.noise_multiplier),
        "sum_noise_multiplier": decimal(mechanism.sum_noise_multiplier),
        "expected_participants": mechanism.expected_participants,
        "adaptive_clipping": None
        if mechanism.target_quantile is None or mechanism.count_stddev is None
        else {
            "target_quantile": decimal(mechanism.target_quantile),
            "clip_lr": decimal(mechanism.clip_lr),
            "count_stddev": decimal(mechanism.count_stddev),
        },
        "accountant": mechanism.accountant.kind,
        "epsilon": decimal(spent.epsilon),
        "epsilon_unsampled": decimal(spent.epsilon_unsampled),
        "delta": decimal(spent.delta),
        "rounds_accounted": spent.rounds,
        "budget": None if spent.budget is None else decimal(spent.budget),
    }
    if last is not None:
        dp.update(
            clip_norm=decimal(last.clip_norm),
            next_clip_norm=decimal(last.next_clip_norm),
            sum_stddev=decimal(last.sum_noise_stddev),
            applied_stddev=decimal(last.applied_stddev),
            sampling_rate=decimal(last.sampling_rate),
            noised_unclipped_fraction=None
            if last.noised_unclipped_fraction is None
            else decimal(last.noised_unclipped_fraction),
        )
    return dp


def round_record(
    *,
    round_number: int,
    outcome: str,
    reason: str | None,
    parent_model: str,
    model: str | None,
    model_version: int | None,
    rows: Sequence[UpdateRow],
    combined: Sequence[str] | None,
    refused: Mapping[str, tuple[str, str]],
    selected: Sequence[str],
    flagged: Mapping[str, str] | None = None,
    quorum: int,
    min_participants: int,
    opened: int,
    closed: int,
    pipeline: Pipeline,
) -> RoundRecord:
    """The record of one round.  ``rows`` are its recorded updates in acceptance order; ``combined`` the
    device ids the combine used (None: all of ``rows``); ``refused`` device -> (update hash, error code)
    for updates this process refused in the round; ``flagged`` device -> reason (``anomalous``,
    ``quarantined``) for recorded updates that threat detection kept out of the combine."""
    used = None if combined is None else set(combined)
    updates: list[RoundUpdate] = []
    left: list[LeftOut] = []
    for row in rows:
        if used is None or row.device_id in used:
            updates.append(RoundUpdate(row.device_id, row.update_hash, row.num_examples))
        else:
            why = (flagged or {}).get(row.device_id, NOT_COMBINED)
            left.append(LeftOut(row.device_id, row.update_hash, why))
    recorded = {row.device_id for row in rows}
    for device in selected:
        if device in recorded:
            continue
        if device in refused:
            update_hash, code = refused[device]
            left.append(LeftOut(device, update_hash, code))
        else:
            left.append(LeftOut(device, None, NO_UPDATE))
    described, dp = describe_pipeline(pipeline, len(updates))
    return RoundRecord(
        round_number=round_number,
        outcome=outcome,
        reason=reason,
        parent_model=parent_model,
        model=model,
        model_version=model_version,
        updates=tuple(updates),
        left_out=tuple(left),
        quorum=quorum,
        min_participants=min_participants,
        opened=opened,
        closed=closed,
        pipeline=described,
        dp=dp if outcome == "closed" else None,
    )


def next_entry(head: LedgerRow | None, record: RoundRecord, identity: SigningKey, time: int) -> LedgerEntry:
    """The round entry that follows ``head`` (the last stored entry, None for an empty ledger)."""
    return LedgerEntry.create(
        "round",
        seq=1 if head is None else head.seq + 1,
        prev_hash=GENESIS_PREV if head is None else head.entry_hash,
        round_number=record.round_number,
        time=time,
        fields=record.fields(),
        keys=[identity],
    )


def entry_of(row: LedgerRow) -> LedgerEntry:
    """The entry a stored row holds (its exact bytes, parsed strictly)."""
    return LedgerEntry.parse(row.body, row.signatures)


@dataclass(frozen=True)
class ExportSummary:
    entries: int
    rounds: int
    key_id: str
    """The header's ``coordinator``: the key trusted from the first entry on (what a verifier pins)."""
    keys: int = 1
    """How many coordinator keys the header lists (1 + the rotations)."""


def export_ledger(
    store: CoordinatorStore,
    coordinator: VerifyKey,
    out: str | os.PathLike[str],
    *,
    envelopes: bool = True,
    page: int = 1000,
    former_keys: Sequence[VerifyKey] = (),
) -> ExportSummary:
    """Write the whole ledger of ``store`` to ``out`` (docs/provenance.md, "Export"), atomically.

    ``coordinator`` is the coordinator's current public key and ``former_keys`` the keys it rotated
    away from, oldest first (``ChainState.keys[:-1]`` of its rotation chain): the header's
    ``coordinator`` is the oldest of them (trusted from the first entry; key_rotation entries lead the
    verifier on) and ``coordinator_keys`` lists them all.  Every enrolled device's key goes into the
    header.  With ``envelopes`` each round entry carries its updates' signed envelopes.  ConfigError
    ``config_error`` if an entry is signed by a key that is none of these."""
    chain = [*former_keys, coordinator]
    allowed = {k.key_id for k in chain}
    target = Path(out)
    head = store.last_ledger_entry()
    count = 0 if head is None else head.seq
    devices = [VerifyKey.from_bytes(d.sig_alg, d.sig_public_key) for d in store.list_devices()]
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    rounds = 0
    try:
        with tmp.open("wb") as fh:
            fh.write(header_line(chain[0], devices, count, chain) + b"\n")
            after = 0
            while after < count:
                rows = store.ledger_entries(after_seq=after, limit=page)
                if not rows:
                    break
                for row in rows:
                    if row.seq > count:
                        break
                    entry = entry_of(row)
                    unknown = [k for k, _ in entry.signatures if k not in allowed]
                    if unknown:
                        raise ConfigError(
                            f"ledger entry {row.seq} is signed by key {unknown[0][:16]}..., none of the "
                            f"coordinator keys given for the export (current {coordinator.key_id[:16]}... and "
                            f"{len(former_keys)} former)",
                            code="config_error",
                        )
                    stored: list[bytes | None] = []
                    if entry.kind == "round" and entry.round_number is not None:
                        rounds += 1
                        by_update = {}
                        if envelopes:
                            by_update = {
                                (u.device_id, u.update_hash): u.envelope
                                for u in store.updates_for_round(entry.round_number)
                            }
                        stored = [by_update.get((d, u)) for d, u, _ in entry.body["updates"]]
                    fh.write(entry_line(entry, stored) + b"\n")
                    after = row.seq
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(count, rounds, chain[0].key_id, len(chain))
