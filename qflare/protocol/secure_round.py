"""A secure-aggregation round as the round manager runs it (docs/secure-aggregation.md, section 9).

When the pipeline says ``secure_aggregation``, :class:`~qflare.protocol.rounds.RoundManager` opens each
round as a :class:`SecureRound`: the selected devices, in selection order, are the roster (indices
1..n, each with its enrolled ML-DSA key), the graph seed is drawn from the OS CSPRNG, ``(n, k, t)`` come
from :func:`~qflare.secagg.choose` with the configured dropout and corruption rates, and the quantisation
sums at most n devices.  The round then moves through the five phases of
:class:`~qflare.secagg.SecAggServer`::

    ADVERTISE -> SHARE_KEYS -> MASKED_INPUT -> CONSISTENCY -> UNMASK -> finish (aggregate) -> publish
                  (any phase: too few devices, signatures or shares -> failed, secagg_aborted)

A phase closes as soon as every device expected in it answered (all of the roster, then U1, U2, U3,
then the devices of U3 that signed it), or at its own deadline (``phase_timeout_s`` after it began)
with whoever answered.  In CONSISTENCY the relay carries the signed unmask request (naming U3) and each
device of U3 signs U3; fewer than ``params.quorum`` signatures at the close fail the round.  In UNMASK
the relay carries the request followed by the consistency proof (``params.quorum`` signatures), without
which no device reveals a share.  After ``finish`` the
weighted mean update goes through the parts of the pipeline that compose with secure aggregation --
central noise and the server optimiser -- and the same model check as a plaintext round; the round
manager then signs and publishes it with a ledger entry.

The ledger entry of a secure round lists, as its ``updates``, the survivors U3 with the SHA-256 of
their masked vector (the digest each signed in its MASKED_INPUT) and 0 examples: the coordinator never
sees a plaintext update nor a device's weight (only their sum), so there is no plaintext update hash to
commit to.  ``left_out`` names the other selected devices with the phase they dropped in
(``secagg_no_advert``, ``secagg_no_shares``, ``secagg_no_input``) or the code their message was
refused with.

Persistence is the round manager's (:mod:`qflare.protocol.secure_manager`): every accepted message and
phase close is stored through :attr:`SecureRound.persist`, and :meth:`SecureRound.resume` rebuilds the
round from the store after a restart (every message checked again).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..crypto import SigningKey, Suite, VerifyKey
from ..crypto.payloads import Frame
from ..errors import ConfigError, ErrorCode, MalformedError, ProtocolError, QflareError, RoundError, ValidationError
from ..ledger import LeftOut, RoundRecord, RoundUpdate
from ..secagg import QuantSpec, SecAggConfig, SecAggParams, SecAggResult, SecAggServer, ServerPhase, choose
from ..secagg.messages import SecAggField, SecAggMessage, SecAggMsg
from ..strategy import Pipeline
from ..strategy.weighting import ByExamples, Uniform
from .messages import Route
from .provenance import describe_pipeline, round_record
from .records import RoundRow, SecAggRoundRow

_log = logging.getLogger("qflare.rounds")

__all__ = [
    "NO_ADVERT",
    "NO_INPUT",
    "NO_SHARES",
    "SecAggSettings",
    "SecureRound",
    "apply_mean",
    "check_secure_pipeline",
    "lost_round_record",
]

NO_ADVERT = "secagg_no_advert"
"""left_out reason: a selected device that sent no advert (it is in no phase of the round)."""
NO_SHARES = "secagg_no_shares"
"""left_out reason: a device that advertised but did not share its keys."""
NO_INPUT = "secagg_no_input"
"""left_out reason: a device that shared its keys but sent no masked input (it dropped: its masks were
removed with its neighbours' shares)."""

RELAY_ADVERTS, RELAY_SHARES, RELAY_REQUEST = 1, 2, 3
"""What a SECAGG_RELAY_REQUEST asks for (its one byte).  ``RELAY_REQUEST`` answers ``[request]`` in the
CONSISTENCY phase and ``[request, signature, ...]`` (the consistency proof) in UNMASK."""

# route -> (request frame, fewest parts, most parts, the phase it belongs to)
_INBOUND: Mapping[Route, tuple[Frame, int, int, ServerPhase | None]] = {
    Route.SECAGG_CONFIG: (Frame.SECAGG_CONFIG_REQUEST, 0, 0, None),
    Route.SECAGG_RELAY: (Frame.SECAGG_RELAY_REQUEST, 1, 1, None),
    Route.SECAGG_ADVERTISE: (Frame.SECAGG_ADVERTISE, 1, 1, ServerPhase.ADVERTISE),
    Route.SECAGG_SHARES: (Frame.SECAGG_SHARES, 1, 1 + 10_000, ServerPhase.SHARE_KEYS),
    Route.SECAGG_MASKED: (Frame.SECAGG_MASKED, 2, 2, ServerPhase.MASKED_INPUT),
    Route.SECAGG_CONSISTENCY: (Frame.SECAGG_CONSISTENCY, 1, 1, ServerPhase.CONSISTENCY),
    Route.SECAGG_UNMASK: (Frame.SECAGG_UNMASK, 1, 1, ServerPhase.UNMASK),
}

_MESSAGE = {
    Frame.SECAGG_ADVERTISE: SecAggMsg.ADVERTISE,
    Frame.SECAGG_SHARES: SecAggMsg.MANIFEST,
    Frame.SECAGG_MASKED: SecAggMsg.MASKED_INPUT,
    Frame.SECAGG_CONSISTENCY: SecAggMsg.CONSISTENCY,
    Frame.SECAGG_UNMASK: SecAggMsg.UNMASK_RESPONSE,
}


def inbound(route: Route) -> tuple[Frame, int, int]:
    """(request frame, fewest parts, most parts) of a secure-aggregation route."""
    frame, lo, hi, _ = _INBOUND[route]
    return frame, lo, hi


@dataclass(frozen=True)
class SecAggSettings:
    """How the round manager runs secure rounds (used only when the pipeline says secure_aggregation)."""

    dropout: float = 0.1
    """The fraction of devices that may drop out of a round without aborting it (sizes ``t`` and ``k``)."""
    corruption: float = 0.1
    """The fraction of devices that may collude with the coordinator (sizes ``t`` and ``k``)."""
    clip: float = 1.0
    """Each coordinate of an update is clipped to [-clip, clip] before quantisation."""
    max_weight: int = 65_536
    """A device's integer weight is min(its example count, this) (1 with uniform weighting)."""
    phase_timeout_s: float | None = None
    """Each phase's deadline after it begins; None: the round timeout, per phase."""

    def __post_init__(self) -> None:
        for name in ("dropout", "corruption"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 0.5:
                raise ConfigError(f"secure aggregation {name} must be in [0, 0.5), got {value!r}")
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure aggregation clip must be a positive finite number, got {self.clip!r}")
        if isinstance(self.max_weight, bool) or not isinstance(self.max_weight, int) or not self.max_weight >= 1:
            raise ConfigError(f"secure aggregation max_weight must be an integer >= 1, got {self.max_weight!r}")
        t = self.phase_timeout_s
        if t is not None and not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
            raise ConfigError(f"secure aggregation phase_timeout_s must be > 0 (or None), got {t!r}")


def check_secure_pipeline(pipeline: Pipeline, per_round: int) -> str:
    """The weighting devices apply (``"examples"`` or ``"uniform"``); ConfigError when a secure round
    cannot run this pipeline (another weighting, DP-FedAvg's per-update clipping, rounds of one device)."""
    if per_round < 2:
        raise ConfigError("secure aggregation needs rounds of at least 2 devices (per_round >= 2)")
    if pipeline.needs_root:
        raise ConfigError("secure aggregation cannot run an aggregator that needs root data")
    if isinstance(pipeline.weighting, Uniform):
        return "uniform"
    if isinstance(pipeline.weighting, ByExamples):
        return "examples"
    raise ConfigError(
        f"secure aggregation weighs updates on the device by example count or uniformly; "
        f"{pipeline.weighting!r} cannot be applied to masked updates"
    )


def apply_mean(pipeline: Pipeline, base: torch.Tensor, mean: torch.Tensor, count: int) -> torch.Tensor:
    """What :meth:`~qflare.strategy.RoundAggregation.finish` does after combining, for a mean that secure
    aggregation produced: central noise (for ``count`` updates), the server optimiser's step, and the
    check of the new model (``aggregate_non_finite`` / ``aggregate_out_of_bounds``; the optimiser's
    state is then restored)."""
    combined = mean
    if pipeline.noise is not None:
        combined = pipeline.noise.apply(combined, count)
    saved = pipeline.server_opt.state_dict()
    new = pipeline.server_opt.step(base, combined)
    if new.dtype != torch.float32 or new.shape != base.shape:
        pipeline.server_opt.load_state_dict(saved)
        raise ValidationError("the server step changed the model's shape or dtype", code="bad_shape")
    largest = float(new.abs().max()) if new.numel() else 0.0
    if not largest <= pipeline.max_model_abs:  # NaN fails too
        pipeline.server_opt.load_state_dict(saved)
        code = "aggregate_out_of_bounds" if math.isfinite(largest) else "aggregate_non_finite"
        raise ValidationError(
            f"the aggregated model's largest weight is {largest:.6g} (bound {pipeline.max_model_abs:.6g}); "
            "it is not published",
            code=code,
        )
    return new


_PHASE_ORDER = list(ServerPhase)


@dataclass
class SecureRound:
    """The coordinator's side of one secure round: the roster, the phase machine, its deadlines."""

    number: int
    selected: tuple[str, ...]
    config: SecAggConfig
    weighting: str
    server: SecAggServer
    identity: SigningKey
    phase_timeout_s: float
    phase_deadline: float
    answered: set[int] = field(default_factory=set)
    """Roster indices whose message of the current phase was accepted."""
    vector_hashes: dict[int, str] = field(default_factory=dict)
    """Index -> hex SHA-256 of its masked vector (as signed in its MASKED_INPUT)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Device id -> code of its last refused phase message (ledger left_out)."""
    result: SecAggResult | None = None
    stored: bool = False
    """Whether a state of the round (with its running sum) is in the store."""
    persist: Callable[[SecureRound, bool, bool], None] | None = None
    """Called with (round, running sum changed?, about to unmask?) after each accepted message and
    phase close, and before the masks are removed; it raising stops the unmasking."""

    @classmethod
    def open(
        cls,
        *,
        number: int,
        selected: Sequence[str],
        keys: Mapping[str, VerifyKey],
        identity: SigningKey,
        suite: Suite,
        length: int,
        weighting: str,
        settings: SecAggSettings,
        round_timeout_s: float,
        now: float,
    ) -> SecureRound:
        """A new round over ``selected`` (RoundError ``secagg_aborted`` when no (k, t) fits them)."""
        n = len(selected)
        try:
            params = choose(n, dropout=settings.dropout, corruption=settings.corruption)
        except ConfigError as exc:
            raise RoundError(f"no secure aggregation over {n} devices: {exc}", code=ErrorCode.SECAGG_ABORTED) from None
        max_weight = 1 if weighting == "uniform" else settings.max_weight
        config = SecAggConfig(
            round=number,
            params=params,
            graph_seed=secrets.token_bytes(32),
            quant=QuantSpec(settings.clip, max_devices=max(2, n), max_weight=max_weight),
            length=length,
            roster={i + 1: keys[d] for i, d in enumerate(selected)},
            coordinator=identity.public,
            suite=suite,
        )
        timeout = settings.phase_timeout_s or round_timeout_s
        server = SecAggServer(config, identity)
        return cls(number, tuple(selected), config, weighting, server, identity, timeout, now + timeout)

    # -- persistence -------------------------------------------------------------------------------------
    def _parameters(self) -> dict[str, object]:
        """The round's public parameters, as stored and as sent to its devices (the session hashes them all)."""
        c = self.config
        return {
            "n": c.params.n,
            "k": c.params.k,
            "t": c.params.t,
            "corrupt": c.params.corrupt,
            "graph_seed": c.graph_seed.hex(),
            "clip": c.quant.clip,
            "max_devices": c.quant.max_devices,
            "max_weight": c.quant.max_weight,
            "length": c.length,
            "weighting": self.weighting,
        }

    def public_doc(self) -> dict[str, object]:
        """The public configuration to store (the roster is the round's selection, the keys enrolled)."""
        return {**self._parameters(), "phase_timeout_s": self.phase_timeout_s}

    @classmethod
    def resume(
        cls,
        row: RoundRow,
        stored: SecAggRoundRow,
        *,
        keys: Mapping[str, VerifyKey],
        identity: SigningKey,
        suite: Suite,
    ) -> SecureRound:
        """The round a restart finds in the store, every stored message checked again
        (:meth:`SecAggServer.restore`); ValidationError ``bad_json`` when the state does not fit."""
        doc = stored.config
        try:
            config = SecAggConfig(
                round=row.round_number,
                params=SecAggParams(int(doc["n"]), int(doc["k"]), int(doc["t"]), int(doc["corrupt"])),
                graph_seed=bytes.fromhex(str(doc["graph_seed"])),
                quant=QuantSpec(float(doc["clip"]), int(doc["max_devices"]), int(doc["max_weight"])),
                length=int(doc["length"]),
                roster={i + 1: keys[d] for i, d in enumerate(row.selected_devices)},
                coordinator=identity.public,
                suite=suite,
            )
            weighting, timeout = str(doc["weighting"]), float(doc["phase_timeout_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(
                f"stored secure round {row.round_number} does not fit: {exc}", code="bad_json"
            ) from None
        server = SecAggServer.restore(config, identity, stored.state, stored.total)
        secure = cls(
            row.round_number,
            tuple(row.selected_devices),
            config,
            weighting,
            server,
            identity,
            timeout,
            stored.phase_deadline.timestamp(),
        )
        secure._derive()
        return secure

    def _derive(self) -> None:
        """``answered`` and ``vector_hashes`` from the server's accepted messages (after a restore)."""
        self.answered = set(self.server.received())
        self.vector_hashes = {
            i: SecAggMessage.parse(raw, expected=SecAggMsg.MASKED_INPUT).get(SecAggField.VECTOR_HASH).hex()
            for i, raw in self.server.masked_inputs().items()
        }

    def checkpoint(self) -> tuple[str, bytes]:
        return self.server.snapshot()

    def rollback(self, checkpoint: tuple[str, bytes]) -> None:
        """Back to ``checkpoint`` (a message whose state could not be stored is not accepted)."""
        self.server = SecAggServer.restore(self.config, self.identity, *checkpoint)
        self._derive()

    def _save(self, total: bool = False, unmasking: bool = False) -> None:
        if self.persist is not None:
            self.persist(self, total, unmasking)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def phase(self) -> ServerPhase:
        return self.server.phase

    def index_of(self, device_id: str) -> int:
        try:
            return self.selected.index(device_id) + 1
        except ValueError:
            raise RoundError(f"device was not selected for round {self.number}", code="not_selected") from None

    def expected(self) -> frozenset[int]:
        """The indices that may still answer in the current phase."""
        s = self.server
        return {
            ServerPhase.ADVERTISE: frozenset(range(1, len(self.selected) + 1)),
            ServerPhase.SHARE_KEYS: s.u1,
            ServerPhase.MASKED_INPUT: s.u2,
            ServerPhase.CONSISTENCY: s.u3,
            ServerPhase.UNMASK: s.signers,
        }.get(s.phase, frozenset())

    def submitted(self, device_id: str) -> bool:
        return device_id in self.selected and self.selected.index(device_id) + 1 in self.answered

    def config_json(self, device_id: str) -> bytes:
        """What a device needs to build the round's :class:`SecAggConfig` (the coordinator key and the
        suite are its session's) and its own index."""
        c = self.config
        doc = {
            "round": c.round,
            "index": self.index_of(device_id),
            **self._parameters(),
            "roster": [c.roster[i].raw.hex() for i in range(1, c.params.n + 1)],
            "session": c.session.hex(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def relay(self, device_id: str, what: bytes) -> list[bytes]:
        """The signed phase messages relayed to ``device_id``: 1 its neighbours' adverts, 2 the share
        entries addressed to it (manifest, entry, manifest, entry, ...), 3 the unmask request (in
        CONSISTENCY, to sign) or the request and the consistency proof (in UNMASK, to answer)."""
        index = self.index_of(device_id)
        kind = what[0] if len(what) == 1 else 0
        s = self.server
        if kind == RELAY_ADVERTS:
            return s.adverts_for(index)
        if kind == RELAY_SHARES:
            return [raw for pair in s.shares_for(index) for raw in pair]
        if kind == RELAY_REQUEST:
            request = s.request
            if s.phase is ServerPhase.CONSISTENCY and request is not None and index in s.u3:
                return [request]
            if s.phase is ServerPhase.UNMASK and request is not None and index in s.signers:
                return [request, *s.consistency_proof()]
            raise RoundError(f"no unmask request for device {index} now", code=ErrorCode.NOT_SELECTED)
        raise MalformedError("a relay request is one byte: 1, 2 or 3", code="malformed")

    # -- messages ----------------------------------------------------------------------------------------
    def accept(self, device_id: str, route: Route, parts: list[bytes]) -> None:
        """:meth:`receive`, and store the new state in the same step: when it cannot be stored the
        message is not accepted (the round goes back to where it was) and the error is raised."""
        before = self.checkpoint() if self.persist is not None else None
        self.receive(device_id, route, parts)
        try:
            self._save(total=route is Route.SECAGG_MASKED)
        except BaseException:
            if before is not None:
                self.rollback(before)
            raise

    def receive(self, device_id: str, route: Route, parts: list[bytes]) -> None:
        """Accept one device's phase message (every check of :class:`SecAggServer`; a refusal changes
        nothing and is remembered for the ledger)."""
        index = self.index_of(device_id)
        frame, _, _, phase = _INBOUND[route]
        if phase is not self.phase:
            raise ProtocolError(
                f"a {route.value} message in phase {self.phase.value} of round {self.number}",
                code=ErrorCode.SECAGG_MISMATCH,
            )
        try:
            sender = SecAggMessage.parse(parts[0], expected=_MESSAGE[frame]).get_int(SecAggField.FROM)
            if sender != index:
                raise ProtocolError(
                    f"message names roster index {sender}, this session's device is {index}",
                    code=ErrorCode.SECAGG_MISMATCH,
                )
            s = self.server
            if route is Route.SECAGG_ADVERTISE:
                s.receive_advert(parts[0])
            elif route is Route.SECAGG_SHARES:
                s.receive_shares(parts[0], parts[1:])
            elif route is Route.SECAGG_MASKED:
                s.receive_masked(parts[0], parts[1])
                signed = SecAggMessage.parse(parts[0], expected=SecAggMsg.MASKED_INPUT)
                self.vector_hashes[index] = signed.get(SecAggField.VECTOR_HASH).hex()
            elif route is Route.SECAGG_CONSISTENCY:
                s.receive_consistency(parts[0])
            else:
                s.receive_unmask(parts[0])
        except QflareError as exc:
            self.refused[device_id] = str(exc.code)
            raise
        self.refused.pop(device_id, None)
        self.answered.add(index)

    def advance(self, now: float) -> SecAggResult | None:
        """Close every phase that is complete (all expected answered) or past its deadline; the result
        once ``finish`` ran (RoundError ``secagg_aborted`` when the round cannot complete)."""
        while self.result is None:
            s = self.server
            if not (self.expected() <= self.answered or now >= self.phase_deadline):
                return None
            if s.phase is ServerPhase.ADVERTISE:
                s.close_advertise()
            elif s.phase is ServerPhase.SHARE_KEYS:
                s.close_shares()
            elif s.phase is ServerPhase.MASKED_INPUT:
                s.close_masked()
            elif s.phase is ServerPhase.CONSISTENCY:
                s.close_consistency()
            elif s.phase is ServerPhase.UNMASK:
                self._save(unmasking=True)  # stored before any mask is removed: never unmasked twice
                self.result = s.finish()
                return self.result
            else:  # DONE without a result, or ABORTED: nothing more can come of this round
                raise RoundError(f"round {self.number} is {s.phase.value}", code=ErrorCode.SECAGG_ABORTED)
            self.answered = set()
            self.phase_deadline = now + self.phase_timeout_s
            try:
                self._save()
            except QflareError as exc:  # the phase is closed in memory; a restart resumes the stored one
                _log.warning("round %d: the close of a phase could not be stored: %s", self.number, exc)
        return self.result

    def summary(self) -> dict[str, int]:
        """What the round's model metrics record: (n, k, t), survivors, dropped, the sum of the weights
        (the coordinator learns it; no single weight)."""
        assert self.result is not None
        p = self.config.params
        return {
            "n": p.n,
            "k": p.k,
            "t": p.t,
            "survivors": len(self.result.survivors),
            "dropped": len(self.result.dropped),
            "weight_sum": self.result.weight_sum,
        }

    def mean(self) -> torch.Tensor:
        assert self.result is not None
        return torch.from_numpy(np.ascontiguousarray(self.result.mean, dtype=np.float32))

    # -- ledger ------------------------------------------------------------------------------------------
    def record(
        self,
        *,
        outcome: str,
        reason: str | None,
        parent_model: str,
        model: str | None,
        model_version: int | None,
        opened: int,
        closed: int,
        pipeline: Pipeline,
    ) -> RoundRecord:
        """The round's ledger record (see the module docs for what ``updates`` and ``left_out`` hold)."""
        s = self.server
        survivors = sorted(self.result.survivors) if self.result is not None else sorted(s.u3)
        updates = tuple(
            RoundUpdate(self.selected[i - 1], self.vector_hashes[i], 0) for i in survivors if i in self.vector_hashes
        )
        listed = {u.device for u in updates}
        left: list[LeftOut] = []
        for i, device in enumerate(self.selected, start=1):
            if device in listed:
                continue
            if device in self.refused:
                why = self.refused[device]
            elif i not in s.u1:
                why = NO_ADVERT
            elif i not in s.u2:
                why = NO_SHARES
            else:
                why = NO_INPUT
            left.append(LeftOut(device, self.vector_hashes.get(i), why[:64]))
        described, dp = describe_pipeline(pipeline, len(updates))
        n = len(self.selected)
        return RoundRecord(
            round_number=self.number,
            outcome=outcome,
            reason=reason,
            parent_model=parent_model,
            model=model,
            model_version=model_version,
            updates=updates,
            left_out=tuple(left),
            quorum=n,
            min_participants=min(self.config.params.t, n),
            opened=opened,
            closed=closed,
            pipeline=described,
            dp=dp if outcome == "closed" else None,
        )


def lost_round_record(row: RoundRow, parent_model: str, now: int, pipeline: Pipeline) -> RoundRecord:
    """The failed ledger record of a secure round whose state a restart lost (reason ``secagg_aborted``;
    every selected device is left out with ``no_update``: no masked input is known any more)."""
    return round_record(
        round_number=row.round_number,
        outcome="failed",
        reason=ErrorCode.SECAGG_ABORTED.value,
        parent_model=parent_model,
        model=None,
        model_version=None,
        rows=[],
        combined=None,
        refused={},
        selected=tuple(row.selected_devices),
        quorum=row.quorum,
        min_participants=row.min_participants,
        opened=int(row.opened_at.timestamp()),
        closed=now,
        pipeline=pipeline,
    )
