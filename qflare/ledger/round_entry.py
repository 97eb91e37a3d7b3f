"""The ``round`` entry kind: what one closed or failed round combined, left out, and published.

Fields (besides the common ones of :mod:`qflare.ledger.entry`; layout in docs/provenance.md)::

    outcome           "closed" | "failed"
    reason            null (closed) | why it failed, e.g. "quorum_not_reached", "too_few_updates"
    parent_model      64 hex   SHA-256 of the model the round trained on
    model             64 hex | null   SHA-256 of the published model file (null when failed)
    model_version     integer | null  its model version (null when failed)
    updates           [[device key id, update SHA-256, examples], ...]   the updates combined into
                      ``model`` (closed), or the acknowledged updates of a failed round, in the
                      order they were accepted
    updates_root      64 hex   Merkle root (RFC 9162) over update_leaf() of each of ``updates``
    left_out          [[device key id, update SHA-256 | null, reason], ...]
    selected          [device key id, ...]   the devices selected for the round
    quorum            integer   updates that close the round early
    min_participants  integer   updates needed at the deadline
    pipeline          object    the aggregation pipeline's parts as their descriptions (strings)
    dp                null | object   differential-privacy parameters of the pipeline's noise
    opened, closed    integer   Unix seconds
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qflare.errors import MalformedError

from .canonical import is_hex32
from .entry import KindSpec, TrustState, register_kind
from .merkle import merkle_root, update_leaf

_LOWER_HEX = re.compile(r"[0-9a-f]*\Z")

__all__ = ["ROUND_FIELDS", "ROUND_KIND", "LeftOut", "RoundRecord", "RoundUpdate", "round_leaves"]

ROUND_FIELDS = frozenset(
    {
        "outcome",
        "reason",
        "parent_model",
        "model",
        "model_version",
        "updates",
        "updates_root",
        "left_out",
        "quorum",
        "min_participants",
        "pipeline",
        "dp",
        "opened",
        "closed",
    }
)


@dataclass(frozen=True)
class RoundUpdate:
    device: str
    update_hash: str
    examples: int

    def leaf(self) -> bytes:
        return update_leaf(self.device, self.update_hash, self.examples)


@dataclass(frozen=True)
class LeftOut:
    device: str
    update_hash: str | None
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    """What the round manager knows about a round when it closes or fails it."""

    round_number: int
    outcome: str
    reason: str | None
    parent_model: str
    model: str | None
    model_version: int | None
    updates: tuple[RoundUpdate, ...]
    left_out: tuple[LeftOut, ...]
    quorum: int
    min_participants: int
    opened: int
    closed: int
    pipeline: Mapping[str, Any] = field(default_factory=dict)
    dp: Mapping[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        """The kind's body fields (the round number travels in the common ``round`` field)."""
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "parent_model": self.parent_model,
            "model": self.model,
            "model_version": self.model_version,
            "updates": [[u.device, u.update_hash, u.examples] for u in self.updates],
            "updates_root": merkle_root([u.leaf() for u in self.updates]).hex(),
            "left_out": [[x.device, x.update_hash, x.reason] for x in self.left_out],
            "quorum": self.quorum,
            "min_participants": self.min_participants,
            "pipeline": dict(self.pipeline),
            "dp": None if self.dp is None else dict(self.dp),
            "opened": self.opened,
            "closed": self.closed,
        }


def _bad(msg: str) -> MalformedError:
    return MalformedError(msg, code="malformed")


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(f"{name} must be an integer >= {minimum}")
    return value


def _reason(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise _bad(f"{name} must be a string of 1..64 characters")
    return value


def round_leaves(body: Mapping[str, Any]) -> list[bytes]:
    """The Merkle leaves of a round body's ``updates``, in order (MalformedError if one is not
    ``[64 lowercase hex, 64 lowercase hex, 0 <= integer < 2**64]``)."""
    updates = body["updates"]
    if not isinstance(updates, list):
        raise _bad("updates must be a list")
    if not updates:
        return []
    try:
        if {type(u) for u in updates} != {list} or {len(u) for u in updates} != {3}:
            raise ValueError
        devices, hashes, examples = zip(*updates, strict=True)
        if {type(x) for x in devices + hashes} != {str} or {len(x) for x in devices + hashes} != {64}:
            raise ValueError
        if {type(n) for n in examples} != {int} or min(examples) < 0 or max(examples) >= 2**64:
            raise ValueError
        joined = "".join(devices) + "".join(hashes)
        if _LOWER_HEX.match(joined) is None:
            raise ValueError
        raw = bytes.fromhex(joined)
    except (ValueError, TypeError):
        raise _bad(
            "each update is [device key id (64 lowercase hex), update sha256 (64 lowercase hex), examples]"
        ) from None
    n = len(updates)
    return [
        raw[32 * i : 32 * i + 32] + raw[32 * (n + i) : 32 * (n + i) + 32] + examples[i].to_bytes(8, "big")
        for i in range(n)
    ]


def _check_round(body: Mapping[str, Any]) -> dict[str, Any]:
    outcome = body["outcome"]
    if outcome == "closed":
        if body["reason"] is not None or not is_hex32(body["model"]):
            raise _bad("a closed round names its model and no failure reason")
        _int(body["model_version"], "model_version", 1)
    elif outcome == "failed":
        _reason(body["reason"], "reason")
        if body["model"] is not None or body["model_version"] is not None:
            raise _bad("a failed round publishes no model")
    else:
        raise _bad(f"outcome must be 'closed' or 'failed', not {outcome!r}")
    if not is_hex32(body["parent_model"]) or not is_hex32(body["updates_root"]):
        raise _bad("parent_model and updates_root are 64 lowercase hex characters")
    leaves = round_leaves(body)
    if merkle_root(leaves).hex() != body["updates_root"]:
        raise _bad("updates_root is not the Merkle root of the listed updates")
    left = body["left_out"]
    if not isinstance(left, list) or not all(
        isinstance(x, list)
        and len(x) == 3
        and is_hex32(x[0])
        and (x[1] is None or is_hex32(x[1]))
        and isinstance(x[2], str)
        and 1 <= len(x[2]) <= 64
        for x in left
    ):
        raise _bad("each left_out item is [device key id, update sha256 or null, reason]")
    devices = [u[0] for u in body["updates"]] + [x[0] for x in left]
    if len(set(devices)) != len(devices):
        raise _bad("a device appears twice in updates and left_out")
    quorum = _int(body["quorum"], "quorum", 1)
    if not 1 <= _int(body["min_participants"], "min_participants", 1) <= quorum:
        raise _bad("min_participants must be between 1 and quorum")
    if _int(body["closed"], "closed") < _int(body["opened"], "opened"):
        raise _bad("closed is before opened")
    if not isinstance(body["pipeline"], dict) or not (body["dp"] is None or isinstance(body["dp"], dict)):
        raise _bad("pipeline is an object and dp an object or null")
    return {"round": body["round"], "parent_model": body["parent_model"], "model": body["model"]}


def _apply_round(summary: Mapping[str, Any], state: TrustState) -> None:
    rnd = summary["round"]
    if state.last_round is not None and rnd <= state.last_round:
        raise _bad(f"round {rnd} does not come after round {state.last_round}")
    parent = summary["parent_model"]
    if state.current_model is not None and parent != state.current_model:
        raise _bad(f"parent_model is not the model the previous closed round published ({state.current_model[:16]}...)")
    state.last_round = rnd
    if summary["model"] is not None:
        state.current_model = summary["model"]


ROUND_KIND = register_kind(KindSpec("round", ROUND_FIELDS, signers=1, check=_check_round, apply=_apply_round))
