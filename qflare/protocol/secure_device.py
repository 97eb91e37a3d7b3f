"""A device's part in a secure-aggregation round (docs/secure-aggregation.md): the coordinator's round
configuration, then :class:`~qflare.secagg.SecAggClient`'s five phases over the device's session.

Each phase is one call: :meth:`SecureParticipant.advertise`, :meth:`~SecureParticipant.share_keys`,
:meth:`~SecureParticipant.masked_input` (the trained delta, quantised and masked instead of sent as a
plaintext update), :meth:`~SecureParticipant.consistency` (its signature on the survivor set of the
coordinator's signed request) and :meth:`~SecureParticipant.unmask` (answered only with the relayed
consistency proof: a quorum of signatures on the very survivor set this device signed).  The relayed messages a phase needs are asked
for first (SECAGG_RELAY).  The configuration arrives over the session authenticated by the pinned
coordinator key; the device checks it is in range and builds its own :class:`~qflare.secagg.SecAggConfig`
from it, with the session's suite and the pinned key as the coordinator's (so the round's session hash
binds what this device was told).  Its state between phases is :meth:`SecureParticipant.to_json`
(the round's secrets: keep it like the device key, mode 0600); the phase calls take ``persist=``, called
with that state before a message is released (the client's rule: persist before you send).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..crypto import VerifyKey
from ..crypto.payloads import Frame, open_parts, seal_parts
from ..errors import MalformedError
from ..secagg import QuantSpec, SecAggClient, SecAggConfig, SecAggParams
from ..secagg.params import MAX_DEVICES
from .device import Device
from .messages import Route, TaskInfo
from .secure_round import RELAY_ADVERTS, RELAY_REQUEST, RELAY_SHARES

__all__ = ["SecureParticipant", "parse_config"]

_CONFIG_KEYS = frozenset(
    {
        "round",
        "index",
        "n",
        "k",
        "t",
        "corrupt",
        "graph_seed",
        "clip",
        "max_devices",
        "max_weight",
        "length",
        "weighting",
        "roster",
        "session",
    }
)


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MalformedError(f"secure-aggregation config: {key} is not an integer in {lo}..{hi}", code="bad_task")
    return value


def parse_config(device: Device, round_number: int, raw: bytes) -> tuple[SecAggConfig, int, str]:
    """``(config, this device's index, weighting)`` from the coordinator's SECAGG_CONFIG JSON; total on
    hostile input (MalformedError ``bad_task``; ConfigError from the secagg types' own checks)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise MalformedError("secure-aggregation config is not JSON", code="bad_task") from None
    if not isinstance(doc, dict) or set(doc) != _CONFIG_KEYS:
        raise MalformedError("secure-aggregation config has other keys than expected", code="bad_task")
    n = _int(doc, "n", 2, MAX_DEVICES)
    roster = doc["roster"]
    seed, session = doc["graph_seed"], doc["session"]
    if (
        not isinstance(roster, list)
        or len(roster) != n
        or not all(isinstance(k, str) and len(k) <= 8192 for k in roster)
        or not isinstance(seed, str)
        or not isinstance(session, str)
        or doc["weighting"] not in ("uniform", "examples")
        or isinstance(doc["clip"], bool)
        or not isinstance(doc["clip"], int | float)
    ):
        raise MalformedError("secure-aggregation config has values of the wrong type", code="bad_task")
    if _int(doc, "round", 0, 2**53) != round_number:
        raise MalformedError(f"secure-aggregation config is for round {doc['round']}", code="bad_task")
    try:
        keys = {i + 1: VerifyKey.from_bytes(device.suite.sig, bytes.fromhex(k)) for i, k in enumerate(roster)}
        graph_seed, expected = bytes.fromhex(seed), bytes.fromhex(session)
    except ValueError:
        raise MalformedError("secure-aggregation config has bad hex", code="bad_task") from None
    config = SecAggConfig(
        round=round_number,
        params=SecAggParams(n, _int(doc, "k", 1, n - 1), _int(doc, "t", 1, n - 1), _int(doc, "corrupt", 0, n - 1)),
        graph_seed=graph_seed,
        quant=QuantSpec(float(doc["clip"]), _int(doc, "max_devices", 2, 10**6), _int(doc, "max_weight", 1, 10**6)),
        length=_int(doc, "length", 1, 2**31),
        roster=keys,
        coordinator=device.server_key,
        suite=device.suite,
    )
    if config.length != device.layout.numel:
        raise MalformedError(
            f"round masks {config.length} values, this model has {device.layout.numel}", code="bad_task"
        )
    if config.session != expected:
        raise MalformedError("secure-aggregation config does not hash to the session it names", code="bad_task")
    return config, _int(doc, "index", 1, n), str(doc["weighting"])


class SecureParticipant:
    """``device``'s side of the secure round ``task`` names (its SecAggClient, its requests)."""

    def __init__(self, device: Device, round_number: int, *, state: str | None = None) -> None:
        self.device, self.round = device, round_number
        self.sent_masked = False
        raw = self._exchange(Route.SECAGG_CONFIG, Frame.SECAGG_CONFIG_REQUEST, [], Frame.SECAGG_CONFIG, 1, 1)[0]
        self.config, index, self.weighting = parse_config(device, round_number, raw)
        if state is None:
            self.client = SecAggClient(self.config, index, device.identity)
        else:
            self.client = SecAggClient.from_json(self.config, device.identity, state)

    @classmethod
    def for_task(cls, device: Device, task: TaskInfo) -> SecureParticipant:
        if not task.secagg or not task.selected:
            raise MalformedError("the task is not a secure round this device takes part in", code="bad_task")
        return cls(device, task.round)

    def to_json(self) -> str:
        return self.client.to_json()

    def _exchange(
        self, route: Route, frame: Frame, parts: list[bytes], reply: Frame, fewest: int, most: int
    ) -> list[bytes]:
        return self.device.exchange(
            route,
            lambda ch: seal_parts(ch, frame, self.round, parts),
            lambda ch, data: open_parts(ch, reply, self.round, data, min_parts=fewest, max_parts=most),
        )

    def send(self, route: Route, frame: Frame, parts: list[bytes]) -> None:
        self._exchange(route, frame, parts, Frame.SECAGG_ACK, 0, 0)

    def relay(self, what: int) -> list[bytes]:
        return self._exchange(
            Route.SECAGG_RELAY, Frame.SECAGG_RELAY_REQUEST, [bytes([what])], Frame.SECAGG_RELAY, 0, 2 * MAX_DEVICES
        )

    def advertise(self) -> None:
        self.send(Route.SECAGG_ADVERTISE, Frame.SECAGG_ADVERTISE, [self.client.advertise()])

    def share_keys(self, *, persist: Callable[[str], None] | None = None) -> None:
        manifest, entries = self.client.share_keys(self.relay(RELAY_ADVERTS), persist=persist)
        self.send(Route.SECAGG_SHARES, Frame.SECAGG_SHARES, [manifest, *entries])

    def weight(self, num_examples: int) -> int:
        """This device's integer weight: 1 (uniform), else its example count capped at the round's maximum."""
        if self.weighting == "uniform":
            return 1
        return max(1, min(int(num_examples), self.config.quant.max_weight))

    def mask(
        self, delta: torch.Tensor, num_examples: int, *, persist: Callable[[str], None] | None = None
    ) -> list[bytes]:
        """``[MASKED_INPUT, vector]``: the trained ``delta`` quantised (weighted by :meth:`weight`) and
        masked with the shares the coordinator relays (sent by :meth:`send_masked`)."""
        flat = self.relay(RELAY_SHARES)
        if len(flat) % 2:
            raise MalformedError("relayed shares come in (manifest, entry) pairs", code="malformed")
        pairs = list(zip(flat[0::2], flat[1::2], strict=True))
        update = delta.detach().to("cpu", torch.float32).numpy().astype(np.float64)
        raw, vector = self.client.masked_input(pairs, update, self.weight(num_examples), persist=persist)
        return [raw, vector]

    def send_masked(self, parts: list[bytes]) -> None:
        self.send(Route.SECAGG_MASKED, Frame.SECAGG_MASKED, parts)
        self.sent_masked = True

    def masked_input(self, delta: torch.Tensor, num_examples: int) -> None:
        """Quantise, mask and send the trained ``delta``: :meth:`mask` then :meth:`send_masked`."""
        self.send_masked(self.mask(delta, num_examples))

    def sign_request(self, *, persist: Callable[[str], None] | None = None) -> list[bytes]:
        """``[CONSISTENCY]``: this device's signature on the survivor set of the relayed unmask request
        (sent by :meth:`consistency`; signed at most once per round, for a set containing this device)."""
        relayed = self.relay(RELAY_REQUEST)
        if len(relayed) != 1:
            raise MalformedError("in the consistency phase the coordinator relays one request", code="malformed")
        return [self.client.consistency(relayed[0], persist=persist)]

    def consistency(self, *, persist: Callable[[str], None] | None = None) -> None:
        self.send(Route.SECAGG_CONSISTENCY, Frame.SECAGG_CONSISTENCY, self.sign_request(persist=persist))

    def answer(self, *, persist: Callable[[str], None] | None = None) -> list[bytes]:
        """``[UNMASK_RESPONSE]`` to the relayed request and consistency proof (``unmask_refused`` unless
        the request names the survivor set this device signed and a quorum of devices signed it too)."""
        relayed = self.relay(RELAY_REQUEST)
        if not relayed:
            raise MalformedError("the coordinator relayed no unmask request", code="malformed")
        return [self.client.unmask(relayed[0], relayed[1:], persist=persist)]

    def unmask(self, *, persist: Callable[[str], None] | None = None) -> None:
        self.send(Route.SECAGG_UNMASK, Frame.SECAGG_UNMASK, self.answer(persist=persist))
