"""A device's saved secure-aggregation state: what each phase keeps, its JSON form, and the checks that
refuse an incomplete or edited state.

The JSON holds the round's secrets until DONE (store it like the device key, mode 0600).  What is kept
shrinks as the round goes: the channel KEM seed is dropped once the shares are opened (MASKED); after
the unmask answer only that answer and the consistency signature remain (no ``b``, ``msk``, shares,
pair seeds or public keys), which is all a retry needs.  A DONE state without its answer, or a phase
lacking what it needs, is ``bad_json``: a device must never resume into answering twice.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from qflare.errors import ErrorCode, ValidationError, WrongRoundError
from qflare.secagg.keys import KEM_SEED_LEN

__all__ = ["MAX_STATE_CHARS", "STATE_VERSION", "ClientPhase", "DeviceState", "Held", "decode_state", "encode_state"]

MAX_STATE_CHARS = 16 * 1024 * 1024  # a device state is ~1 kB per neighbour; refuse anything far larger
STATE_VERSION = 2


class ClientPhase(enum.StrEnum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


@dataclass
class Held:
    """What a neighbour dealt this device: its two shares, and the edge's pair seed."""

    self_share: bytes
    pair_share: bytes
    pair_seed: bytes


@dataclass
class DeviceState:
    phase: ClientPhase
    b: bytes | None  # secrets: None once no longer needed (DONE)
    msk: bytes | None
    channel_seed: bytes | None  # None once the shares are opened (MASKED)
    publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (channel, mask) public
    held: dict[int, Held] = field(default_factory=dict)
    answered: tuple[bytes, bytes] | None = None  # (SHA-256 of the signed request body, response)
    masked: bytes | None = None  # the MASKED_INPUT sent (its VECTOR_HASH pins the vector)
    signed: tuple[bytes, bytes] | None = None  # (survivors hash, CONSISTENCY) signed this round


def encode_state(s: DeviceState, session: bytes, index: int) -> str:
    """``s`` as JSON (keys sorted)."""

    def hx(value: bytes | None) -> str | None:
        return None if value is None else value.hex()

    doc: dict[str, Any] = {
        "version": STATE_VERSION,
        "session": session.hex(),
        "index": index,
        "phase": s.phase.value,
        "b": hx(s.b),
        "msk": hx(s.msk),
        "channel_seed": hx(s.channel_seed),
        "publics": {str(p): [c.hex(), m.hex()] for p, (c, m) in s.publics.items()},
        "held": {str(p): [h.self_share.hex(), h.pair_share.hex(), h.pair_seed.hex()] for p, h in s.held.items()},
        "answered": None if s.answered is None else [s.answered[0].hex(), s.answered[1].hex()],
        "masked": hx(s.masked),
        "signed": None if s.signed is None else [s.signed[0].hex(), s.signed[1].hex()],
    }
    return json.dumps(doc, sort_keys=True)


def decode_state(text: str, session: bytes) -> tuple[DeviceState, int]:
    """``(state, index)`` from :func:`encode_state`'s JSON for the round ``session``; ``bad_json`` if it is
    not a complete state (size, depth and types bounded), ``wrong_round`` if it is another round's."""

    def hx(value: Any) -> bytes | None:
        return None if value is None else bytes.fromhex(value)

    def pair(value: Any) -> tuple[bytes, bytes] | None:
        return None if value is None else (bytes.fromhex(value[0]), bytes.fromhex(value[1]))

    if not isinstance(text, str) or len(text) > MAX_STATE_CHARS:
        raise ValidationError("not a secure-aggregation device state (type or size)", code=ErrorCode.BAD_JSON)
    try:
        doc = json.loads(text)
        if doc["version"] != STATE_VERSION:
            raise ValidationError(f"device state version {doc['version']!r}, not 2", code=ErrorCode.BAD_JSON)
        if bytes.fromhex(doc["session"]) != session:
            raise WrongRoundError("saved state is for another round", code=ErrorCode.WRONG_ROUND)
        state = DeviceState(
            ClientPhase(doc["phase"]),
            hx(doc["b"]),
            hx(doc["msk"]),
            hx(doc["channel_seed"]),
            {int(p): (bytes.fromhex(c), bytes.fromhex(m)) for p, (c, m) in doc["publics"].items()},
            {
                int(p): Held(bytes.fromhex(a), bytes.fromhex(b), bytes.fromhex(c))
                for p, (a, b, c) in doc["held"].items()
            },
            pair(doc["answered"]),
            hx(doc["masked"]),
            pair(doc["signed"]),
        )
        index = int(doc["index"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        raise ValidationError(f"not a secure-aggregation device state: {exc}", code=ErrorCode.BAD_JSON) from None
    _check_state(state)
    return state, index


def _check_state(s: DeviceState) -> None:
    """The fields each phase needs are there, with the right sizes (a rolled-back or edited state is not
    silently resumed: a DONE state without its answer would answer twice)."""
    done = s.phase is ClientPhase.DONE
    opened = s.phase in (ClientPhase.MASKED, ClientPhase.DONE)
    ok = (
        (done or (s.b is not None and len(s.b) == 32 and s.msk is not None and len(s.msk) == 32))
        and (opened or (s.channel_seed is not None and len(s.channel_seed) == KEM_SEED_LEN))
        and (not opened or s.channel_seed is None)
        and ((s.phase is ClientPhase.MASKED) == (s.masked is not None))
        and (opened or s.signed is None)
        and (done == (s.answered is not None))
        and (not done or (s.signed is not None and s.b is None and s.msk is None and not s.held))
    )
    if not ok:
        raise ValidationError(f"secure-aggregation state in phase {s.phase} is incomplete", code=ErrorCode.BAD_JSON)
