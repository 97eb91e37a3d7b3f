"""What operators read: the JSON shapes of devices, security events, rounds, tokens and the ledger.

One module serves both operator surfaces, the admin API (:mod:`qflare.server.admin`) and the dashboard
(:mod:`qflare.server.dashboard`), so they cannot drift apart.  Every function reads the database (and, for
reputations, the live detector); nothing here writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..ledger import LedgerEntry
from ..protocol import Coordinator
from ..storage import DeviceRow, LedgerRow, RoundRow, SecurityEventRow, Store, TokenRow

__all__ = [
    "device_view",
    "devices_view",
    "event_view",
    "iso",
    "ledger_view",
    "round_detail",
    "round_view",
    "rounds_view",
    "token_view",
]


def iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def device_view(
    d: DeviceRow, *, last_seen: datetime | None = None, reputation: float | None = None, extended: bool = False
) -> dict[str, Any]:
    """A device as the admin API lists it; ``extended`` adds last contact and reputation (the dashboard's)."""
    out: dict[str, Any] = {
        "device_id": d.device_id,
        "sig_alg": d.sig_alg,
        "status": d.status,
        "enrolled_at": iso(d.enrolled_at),
        "revoked_at": iso(d.revoked_at),
        "revoked_reason": d.revoked_reason,
        "quarantined_at": iso(d.quarantined_at),
        "quarantine_reason": d.quarantine_reason,
    }
    if extended:
        out["last_seen"] = iso(last_seen)
        out["reputation"] = reputation
    return out


def devices_view(store: Store, coordinator: Coordinator, status: str | None = None) -> list[dict[str, Any]]:
    """Every enrolled device with its last contact and, when threat detection is on, its reputation."""
    rows, seen = store.list_devices(status), store.last_seen()
    detector = coordinator.rounds.detector
    return [
        device_view(
            d,
            last_seen=seen.get(d.device_id),
            reputation=detector.reputation(d.device_id) if detector is not None else None,
            extended=True,
        )
        for d in rows
    ]


def event_view(e: SecurityEventRow) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": iso(e.at),
        "reason": e.reason,
        "detail": e.detail,
        "device_id": e.device_id,
        "session_id": e.session_id,
        "remote_addr": e.remote_addr,
    }


def round_view(r: RoundRow, models: dict[int, dict[str, Any]]) -> dict[str, Any]:
    metrics = models.get(r.round_number, {})
    ev = metrics.get("eval")
    seconds = (r.closed_at - r.opened_at).total_seconds() if r.closed_at is not None else None
    updates = metrics.get("updates")
    return {
        "round": r.round_number,
        "state": r.state,
        "selected": len(r.selected_devices),
        "min_participants": r.min_participants,
        "updates": updates,
        "examples": metrics.get("examples"),
        "accuracy": ev.get("accuracy") if isinstance(ev, dict) else None,
        "loss": ev.get("loss") if isinstance(ev, dict) else None,
        "opened_at": iso(r.opened_at),
        "closed_at": iso(r.closed_at),
        "seconds": seconds,
        "result_model_sha256": r.result_model_hash,
    }


def rounds_view(store: Store, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` rounds, oldest first, with their published model's metrics."""
    rows = store.list_rounds(limit)
    models = {m.round_number: dict(m.metrics) for m in store.list_models() if m.round_number is not None}
    return [round_view(r, models) for r in rows]


def _ledger_body(row: LedgerRow) -> dict[str, Any] | None:
    try:
        return dict(LedgerEntry.parse(row.body, row.signatures).body)
    except Exception:  # a damaged stored entry: `qflare ledger verify` reports it; the view shows it as unreadable
        return None


def round_detail(store: Store, number: int) -> dict[str, Any] | None:
    """One round: its selected devices, the updates it recorded, what its ledger entry left out and why,
    and the security events recorded while it was open (refusals), or None if there is no such round."""
    row = store.get_round(number)
    if row is None:
        return None
    models = {m.round_number: dict(m.metrics) for m in store.list_models() if m.round_number == number}
    out = round_view(row, models)
    out["selected_devices"] = list(row.selected_devices)
    out["base_model_sha256"] = row.base_model_hash
    out["accepted"] = [
        {
            "device_id": u.device_id,
            "update_sha256": u.update_hash,
            "examples": u.num_examples,
            "received_at": iso(u.received_at),
        }
        for u in store.updates_for_round(number)
    ]
    entry = store.ledger_entry_for_round(number)
    body = _ledger_body(entry) if entry is not None else None
    left_out: list[dict[str, Any]] = []
    if body is not None and isinstance(body.get("left_out"), list):
        for item in body["left_out"]:
            if isinstance(item, list) and len(item) == 3:
                left_out.append({"device_id": item[0], "update_sha256": item[1], "reason": item[2]})
    out["left_out"] = left_out
    out["ledger_seq"] = entry.seq if entry is not None else None
    out["outcome_reason"] = body.get("reason") if body is not None else None
    events = store.security_events(200, since=row.opened_at)
    until = row.closed_at
    out["refused"] = [event_view(e) for e in events if until is None or e.at <= until]
    return out


def token_view(row: TokenRow, now: datetime) -> dict[str, Any]:
    """A token's metadata (never its plaintext: only the hash is stored); ``id`` is the hash's first 16 hex."""
    if row.used_at is not None:
        state = "used"
    elif row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at <= now:
        state = "expired"
    else:
        state = "valid"
    return {
        "id": row.token_hash[:16],
        "token_sha256": row.token_hash,
        "label": row.label,
        "state": state,
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "used_at": iso(row.used_at),
        "used_by_device": row.used_by_device,
        "revoked_at": iso(row.revoked_at),
    }


def ledger_view(store: Store, limit: int) -> dict[str, Any]:
    """The newest ``limit`` provenance ledger entries (newest first) and the model lineage (every version)."""
    head = store.last_ledger_entry()
    entries: list[dict[str, Any]] = []
    if head is not None:
        first = max(0, head.seq - limit)
        for row in reversed(store.ledger_entries(after_seq=first, limit=limit)):
            body = _ledger_body(row)
            entries.append(
                {
                    "seq": row.seq,
                    "kind": row.kind,
                    "round": row.round_number,
                    "entry_sha256": row.entry_hash,
                    "prev_sha256": row.prev_hash,
                    "created_at": iso(row.created_at),
                    "outcome": body.get("outcome") if body is not None else None,
                    "model_sha256": body.get("model") if body is not None else None,
                    "signers": [key for key, _ in row.signatures],
                }
            )
    lineage = [
        {
            "version": m.version,
            "round": m.round_number,
            "model_sha256": m.model_hash,
            "parent_sha256": m.parent_hash,
            "created_at": iso(m.created_at),
        }
        for m in store.list_models()
    ]
    return {"entries": entries, "lineage": lineage}
