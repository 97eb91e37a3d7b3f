"""The device loop's part in secure-aggregation rounds (docs/secure-aggregation.md).

On each poll of a secure round (``TaskInfo.secagg``) :class:`SecureRounds` does this device's message of
the current phase, once: ADVERTISE, then its key shares, then its trained update quantised and masked,
then its signature on the coordinator's survivor set (CONSISTENCY), then its unmask answer (only to a
request naming the set it signed, with a quorum of signatures on it).  Between polls (and across a restart of the device) the round's state is the
file ``secagg.json`` in the state directory, mode 0600 (it holds the round's secrets): the
:class:`~qflare.secagg.SecAggClient` state and the *outbox*, the message built for the current phase.
The outbox is written before the message is sent, so a message whose answer was lost is sent again
byte for byte (the coordinator accepts the same bytes again) instead of being built a second time
(which :class:`~qflare.secagg.SecAggClient` refuses).  Once the unmask answer is accepted the file is
deleted.  A device that joins a round after its first
phase, or whose state file is for another round, sits the round out.

A refusal that retrying cannot fix -- by the coordinator (the phase moved on, a message refused) or by
this device (an unmask request it must not answer, a forged share) -- ends this device's part in the
round: the state is deleted and :class:`~qflare.errors.RoundError` ``secagg_aborted`` (skip the round)
is raised for the loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..crypto.payloads import Frame
from ..errors import ErrorCode, QflareError, Retry, RoundError
from ..protocol import Device, TaskInfo
from ..protocol.messages import Route
from ..protocol.secure_device import SecureParticipant
from ..protocol.secure_round import RELAY_ADVERTS
from ..secagg import ClientPhase
from ..training import TrainResult
from .state import DeviceState, write_private

__all__ = ["SECAGG_STATE", "SecureRounds"]

log = logging.getLogger("qflare.client")

SECAGG_STATE = "secagg.json"

_STEPS: dict[str, tuple[Route, Frame, frozenset[ClientPhase]]] = {
    "advertise": (Route.SECAGG_ADVERTISE, Frame.SECAGG_ADVERTISE, frozenset({ClientPhase.NEW})),
    "share_keys": (Route.SECAGG_SHARES, Frame.SECAGG_SHARES, frozenset({ClientPhase.ADVERTISED})),
    "masked_input": (Route.SECAGG_MASKED, Frame.SECAGG_MASKED, frozenset({ClientPhase.SHARED})),
    "consistency": (Route.SECAGG_CONSISTENCY, Frame.SECAGG_CONSISTENCY, frozenset({ClientPhase.MASKED})),
    "unmask": (Route.SECAGG_UNMASK, Frame.SECAGG_UNMASK, frozenset({ClientPhase.MASKED, ClientPhase.DONE})),
}


class SecureRounds:
    """One device's secure rounds over ``device``; ``train(task)`` trains on the task's model (None when
    the loop's training limits say not now)."""

    def __init__(self, device: Device, state: DeviceState, train: Callable[[TaskInfo], TrainResult | None]) -> None:
        self.device, self.state, self._train = device, state, train
        self.done: set[int] = set()
        """Rounds whose unmask answer this device sent (its part is complete)."""

    @property
    def path(self) -> Path:
        return self.state.dir / SECAGG_STATE

    def _load(self) -> dict[str, object] | None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("secure-aggregation state unreadable (%s); the round is sat out", exc)
            self.forget()
            return None
        return doc if isinstance(doc, dict) else None

    def _save(self, rnd: int, client: str, outbox: tuple[str, list[bytes]] | None) -> None:
        doc = {
            "round": rnd,
            "client": client,
            "outbox": None if outbox is None else [outbox[0], [p.hex() for p in outbox[1]]],
        }
        write_private(self.path, json.dumps(doc).encode())

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    def step(self, task: TaskInfo) -> bool:
        """This device's message of ``task``'s phase (True once its part of the round is complete)."""
        phase = task.secagg
        if phase in ("done", "aborted") or not task.selected:
            self.forget()
            return False
        if task.round in self.done or phase not in _STEPS:
            return False
        try:
            return self._step(task, phase)
        except QflareError as exc:
            if exc.retry in (Retry.TRANSIENT, Retry.RENEW_SESSION) or exc.unauthenticated:
                raise
            self.forget()
            raise RoundError(
                f"secure round {task.round}: this device's part ended in phase {phase} [{exc.code}]: {exc}",
                code=ErrorCode.SECAGG_ABORTED,
            ) from exc

    def _step(self, task: TaskInfo, phase: str) -> bool:
        doc = self._load()
        if doc is not None and doc.get("round") != task.round:
            self.forget()
            doc = None
        if doc is None:
            if phase != "advertise":
                log.info("secure round %d is in phase %s: joined too late, sitting it out", task.round, phase)
                return False
            participant = SecureParticipant(self.device, task.round)
        else:
            participant = SecureParticipant(self.device, task.round, state=str(doc["client"]))
        route, frame, ready = _STEPS[phase]
        outbox = doc.get("outbox") if doc is not None else None
        if isinstance(outbox, list) and outbox[0] == route.value and not task.submitted:
            parts = [bytes.fromhex(p) for p in outbox[1]]
            log.info("secure round %d: resending the %s message whose answer was lost", task.round, phase)
        elif task.submitted or participant.client.phase not in ready:
            return False  # answered already (or not this device's turn)
        else:
            built = self._build(task, phase, participant, lambda state: self._save(task.round, state, None))
            if built is None:
                return False
            parts = built
            # before sending: the client's state was persisted before it released the message, and the
            # outbox now makes a resend the same bytes
            self._save(task.round, participant.to_json(), (route.value, parts))
        participant.send(route, frame, parts)
        log.info("secure round %d: %s sent", task.round, phase)
        if phase == "unmask":  # the round's secrets are no longer needed: gone from the disk
            self.forget()
            self.done.add(task.round)
            return True
        self._save(task.round, participant.to_json(), None)
        return False

    def _build(
        self, task: TaskInfo, phase: str, participant: SecureParticipant, persist: Callable[[str], None]
    ) -> list[bytes] | None:
        client = participant.client
        if phase == "advertise":
            return [client.advertise()]
        if phase == "share_keys":
            manifest, entries = client.share_keys(participant.relay(RELAY_ADVERTS), persist=persist)
            return [manifest, *entries]
        if phase == "masked_input":
            result = self._train(task)
            if result is None:
                return None
            return participant.mask(result.delta, result.num_examples, persist=persist)
        if phase == "consistency":
            return participant.sign_request(persist=persist)
        return participant.answer(persist=persist)
