"""Protocol messages between a device and the coordinator, and their byte codecs.

Everything a device and a coordinator exchange is bytes, so the same objects run over the in-process
transport and over HTTP.  Signed artefacts (enrollment, handshake, global model header, update header,
receipt) are :class:`~qflare.crypto.SignedEnvelope` s; after the handshake, every request and response
travels as an AES-256-GCM frame of the session :class:`~qflare.crypto.Channel`, whose :class:`Frame`
type and round are bound into the frame's associated data (the frames are built and checked by the
recipes of :mod:`qflare.crypto.payloads`, which also defines :class:`Frame`).  The small control messages inside frames are strict
JSON objects (unknown or missing keys are refused); model and update tensors travel as safetensors blobs
next to their signed header, never as JSON numbers.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..crypto.payloads import Frame, canonical_json
from ..errors import MalformedError

__all__ = [
    "SECAGG_PHASES",
    "SECAGG_ROUTES",
    "Frame",
    "Receipt",
    "Route",
    "TaskInfo",
    "decode_json",
    "encode_json",
]


class Route(enum.StrEnum):
    """The coordinator's endpoints (the HTTP layer serves each under ``/v1/<value>``)."""

    ENROLL = "enroll"
    HELLO = "handshake/hello"
    FINISH = "handshake/finish"
    TASK = "task"
    MODEL = "model"
    UPDATE = "update"
    PROOF = "proof"
    SECAGG_CONFIG = "secagg/config"
    SECAGG_RELAY = "secagg/relay"
    SECAGG_ADVERTISE = "secagg/advertise"
    SECAGG_SHARES = "secagg/shares"
    SECAGG_MASKED = "secagg/masked"
    SECAGG_UNMASK = "secagg/unmask"
    SECAGG_CONSISTENCY = "secagg/consistency"


SECAGG_ROUTES = frozenset(
    {
        Route.SECAGG_CONFIG,
        Route.SECAGG_RELAY,
        Route.SECAGG_ADVERTISE,
        Route.SECAGG_SHARES,
        Route.SECAGG_MASKED,
        Route.SECAGG_UNMASK,
        Route.SECAGG_CONSISTENCY,
    }
)
"""The routes of a secure-aggregation round (sealed in the session, like ``update``)."""


MAX_COUNTER = 2**53 - 1
"""The largest round number, model version or deadline a task may carry (exact in every JSON reader)."""
TASK_STATES = frozenset({"open", "waiting", "finished"})
SECAGG_PHASES = frozenset({"advertise", "share_keys", "masked_input", "consistency", "unmask", "done", "aborted"})
"""The phases a secure round's task may name (``TaskInfo.secagg``; "" in a plaintext round)."""
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class TaskInfo:
    """What the coordinator tells a device when it asks for work."""

    round: int
    state: str  # "open" (selected or not), "waiting" (no round open), "finished" (federation over)
    selected: bool
    model_hash: str = ""
    model_version: int = 0
    deadline: float = 0.0
    submitted: bool = False
    secagg: str = ""
    """A secure-aggregation round: its current phase (one of :data:`SECAGG_PHASES`), and ``submitted``
    says whether this device's message of that phase was accepted; "" in a plaintext round (and then
    the key is left out of the JSON, so a plaintext task's bytes are as before)."""

    def to_bytes(self) -> bytes:
        obj = asdict(self)
        if not self.secagg:
            del obj["secagg"]
        return encode_json(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskInfo:
        """Parse a task, refusing values no coordinator sends (MalformedError ``bad_task``): rounds and
        model versions outside ``0..MAX_COUNTER``, an unknown state, a non-finite or negative deadline,
        a model hash that is not 64 lowercase hex digits (it may be empty only when the device is not
        selected), ``submitted`` without ``selected``."""
        obj = decode_json(data)
        obj.setdefault("secagg", "")
        info: TaskInfo = _strict(cls, obj)
        info.check()
        return info

    def check(self) -> None:
        """Raise MalformedError ``bad_task`` unless every value is in range (see :meth:`from_bytes`)."""
        problems = []
        for name in ("round", "model_version"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_COUNTER:
                problems.append(f"{name} {value} is outside 0..{MAX_COUNTER}")
        if self.state not in TASK_STATES:
            problems.append(f"state {self.state[:32]!r} is not one of {sorted(TASK_STATES)}")
        # range first: a JSON integer of 400 digits would overflow math.isfinite's float conversion
        if not (0 <= self.deadline <= MAX_COUNTER and math.isfinite(self.deadline)):
            problems.append(f"deadline {self.deadline!r} is not a finite non-negative time")
        if not (_HEX64.match(self.model_hash) or (self.model_hash == "" and not self.selected)):
            problems.append("model_hash is not a hex SHA-256 digest")
        if self.submitted and not self.selected:
            problems.append("submitted without being selected")
        if self.selected and self.state != "open":
            problems.append(f"selected in a {self.state!r} state")
        if self.secagg and (self.secagg not in SECAGG_PHASES or self.state != "open"):
            problems.append(f"secure-aggregation phase {self.secagg[:32]!r} is unknown or the round is not open")
        if problems:
            raise MalformedError(f"coordinator sent a task out of range: {'; '.join(problems)}", code="bad_task")


@dataclass(frozen=True)
class Receipt:
    """The coordinator's acknowledgement of an accepted update (``duplicate`` for an idempotent retry),
    sent after the signed UPDATE_ACK in the RECEIPT frame."""

    round: int
    update_hash: str
    updates_in_round: int  # updates accepted in the round so far, this one included
    duplicate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return encode_json(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        return _strict(cls, decode_json(data))


def encode_json(obj: Mapping[str, Any]) -> bytes:
    return canonical_json(obj)


def decode_json(data: bytes, max_len: int = 65536) -> dict[str, Any]:
    if len(data) > max_len:
        raise MalformedError(f"control message of {len(data)} bytes exceeds {max_len}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, an integer too long to convert
        raise MalformedError(f"control message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedError("control message must be a JSON object")
    return obj


_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,)}


def _strict(cls: Any, obj: dict[str, Any]) -> Any:
    names = {f.name: f for f in cls.__dataclass_fields__.values()}
    unknown = set(obj) - set(names)
    if unknown:
        raise MalformedError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name, f in names.items():
        if name not in obj:
            raise MalformedError(f"{cls.__name__}: missing field {name!r}")
        value = obj[name]
        base = {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type), dict)
        ok = isinstance(value, _TYPES[base]) and not (base in (int, float) and isinstance(value, bool))
        if not ok:
            raise MalformedError(f"{cls.__name__}.{name}: expected {base.__name__}")
        kwargs[name] = value
    return cls(**kwargs)
