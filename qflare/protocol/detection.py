"""Adaptive threat detection: per-update scores, per-device reputation, quarantine (docs/defences.md).

The :class:`RoundManager` holds a round's updates when a :class:`DetectionConfig` is set
(``RoundConfig.detection``) and, when the round closes, hands them to :meth:`Detector.judge` *before*
folding any in: the round's robust statistics need the whole round, so "scored before folding in"
means at close time.  The verdict names the updates to leave out (reason ``anomalous``, or
``quarantined`` when the update also took its device's reputation below the threshold); those land
in the round's ledger entry ``left_out`` list and the published model's metrics.

Reputation is a beta score with forgetting: each judged update of a device first decays its counts by
``forgetting``, then adds 1 to ``clean`` or to ``flagged``; reputation = (clean + 1) / (clean +
flagged + 2).  A device with at least ``min_observations`` judged updates whose reputation falls below
``quarantine_below`` is quarantined: not selected any more, its updates refused, a security event
recorded, until an operator reinstates it (which starts its reputation afresh).

Hook for named presets (e.g. an aggregator registry's ``reputation`` preset): build the pipeline as
usual and pass ``RoundConfig(detection=reputation_detection(**options))``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, ValidationError
from ..strategy.anomaly import UpdateScore, score_round

__all__ = [
    "ANOMALOUS",
    "QUARANTINED",
    "DetectionConfig",
    "Detector",
    "RoundVerdict",
    "Standing",
    "reputation_detection",
]

ANOMALOUS = "anomalous"
"""left_out reason: the update was scored anomalous in its round and not folded in."""
QUARANTINED = "quarantined"
"""left_out reason: the update's device is quarantined (by this round's verdict or by an operator)."""


@dataclass(frozen=True)
class DetectionConfig:
    """Parameters of the detector (docs/defences.md explains each and its default)."""

    k: float = 3.5
    """An update is anomalous beyond median + k · MADn of its round's values (z-score > k)."""
    min_norm_ratio: float = 2.0
    """...and, for the norm score, only if it is at least this many times the norm the round's size
    relation predicts for its example count (a small MADn must not turn small differences into flags)."""
    min_updates: int = 5
    """Rounds with fewer updates are not judged (robust statistics of 4 values mean little)."""
    history_decay: float = 0.5
    """Weight of the newest clean update in a device's direction history (an exponential moving average)."""
    forgetting: float = 0.9
    """Each judged update first multiplies a device's clean/flagged counts by this (older rounds fade)."""
    quarantine_below: float = 0.35
    """Quarantine a device whose reputation falls below this..."""
    min_observations: int = 3
    """...once at least this many of its updates were judged."""

    def __post_init__(self) -> None:
        def number(name: str, lo: float, hi: float) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"detection {name} must be a finite number, got {value!r}")
            if not lo <= value <= hi:
                raise ConfigError(f"detection {name} must be in [{lo}, {hi}], got {value!r}")
            return float(value)

        number("k", 1.0, 100.0)
        number("min_norm_ratio", 1.0, 1e6)
        number("history_decay", 0.0, 1.0)
        number("forgetting", 0.0, 1.0)
        number("quarantine_below", 0.0, 1.0)
        for name, lo in (("min_updates", 3), ("min_observations", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 1_000_000:
                raise ConfigError(f"detection {name} must be an integer >= {lo}, got {value!r}")


def reputation_detection(**options: Any) -> DetectionConfig:
    """A :class:`DetectionConfig` from keyword options (ConfigError naming an unknown one)."""
    unknown = sorted(set(options) - set(DetectionConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"unknown detection option(s) {unknown}; valid: {sorted(DetectionConfig.__dataclass_fields__)}"
        )
    return DetectionConfig(**options)


@dataclass
class Standing:
    """A device's record with the detector: decayed counts of clean and flagged judged updates."""

    clean: float = 0.0
    flagged: float = 0.0
    observations: int = 0

    @property
    def reputation(self) -> float:
        return (self.clean + 1.0) / (self.clean + self.flagged + 2.0)


@dataclass(frozen=True)
class RoundVerdict:
    """What the detector decided about one round."""

    round_number: int
    judged: bool
    """False when the round had too few updates to judge (nothing left out, no reputation changed)."""
    scores: Mapping[str, UpdateScore] = field(default_factory=dict)
    left_out: Mapping[str, str] = field(default_factory=dict)
    """device id -> ``anomalous`` | ``quarantined``."""
    quarantined: tuple[str, ...] = ()
    """Devices this verdict quarantines."""
    reputation: Mapping[str, float] = field(default_factory=dict)
    """Reputation after the round of every device judged in it."""


class Detector:
    """Scores rounds and keeps the reputations.  Not thread-safe: the round manager calls it under its lock."""

    def __init__(self, config: DetectionConfig) -> None:
        self.config = config
        self.standing: dict[str, Standing] = {}
        self._direction: dict[str, torch.Tensor] = {}

    def reputation(self, device_id: str) -> float:
        standing = self.standing.get(device_id)
        return (standing or Standing()).reputation

    def judge(self, round_number: int, updates: Sequence[tuple[str, torch.Tensor, int]]) -> RoundVerdict:
        """Judge one round's updates (device id, delta, claimed example count), in any order; updates
        reputations and history."""
        cfg = self.config
        if len(updates) < cfg.min_updates:
            return RoundVerdict(round_number, False)
        history = [self._direction.get(device) for device, _, _ in updates]
        scores = score_round(
            [d for _, d, _ in updates],
            history,
            [n for _, _, n in updates],
            k=cfg.k,
            min_norm_ratio=cfg.min_norm_ratio,
        )
        left: dict[str, str] = {}
        quarantined: list[str] = []
        reputation: dict[str, float] = {}
        for (device, delta, _), score in zip(updates, scores, strict=True):
            st = self.standing.setdefault(device, Standing())
            st.clean *= cfg.forgetting
            st.flagged *= cfg.forgetting
            st.observations += 1
            if score.anomalous:
                st.flagged += 1.0
                left[device] = ANOMALOUS
                if st.observations >= cfg.min_observations and st.reputation < cfg.quarantine_below:
                    left[device] = QUARANTINED
                    quarantined.append(device)
            else:
                st.clean += 1.0
                self._remember(device, delta)
            reputation[device] = st.reputation
        by_device = {device: score for (device, _, _), score in zip(updates, scores, strict=True)}
        return RoundVerdict(round_number, True, by_device, left, tuple(quarantined), reputation)

    def _remember(self, device: str, delta: torch.Tensor) -> None:
        norm = float(delta.norm())
        if not (math.isfinite(norm) and norm > 0):
            return
        unit = delta.detach().to(torch.float32) / norm
        past = self._direction.get(device)
        a = self.config.history_decay
        self._direction[device] = unit.clone() if past is None else (1 - a) * past + a * unit

    def reinstate(self, device_id: str) -> None:
        """An operator's reinstatement: the device starts afresh (no reputation, no history)."""
        self.standing.pop(device_id, None)
        self._direction.pop(device_id, None)

    # -- persistence (the reputations; directions are rebuilt from later rounds) -----------------
    def encode_state(self) -> bytes:
        """The reputations as canonical JSON bytes."""
        doc = {"format": 1, "standing": {d: asdict(s) for d, s in sorted(self.standing.items())}}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def load_state(self, data: bytes) -> None:
        """Restore :meth:`encode_state` bytes (ValidationError ``malformed_blob`` if they are not)."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("standing"), dict):
                raise ValueError("not a detector state")
            standing: dict[str, Standing] = {}
            for device, row in doc["standing"].items():
                if not isinstance(row, dict) or set(row) != {"clean", "flagged", "observations"}:
                    raise ValueError(f"bad standing of {device!r}")
                clean, flagged, obs = row["clean"], row["flagged"], row["observations"]
                if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in (clean, flagged)):
                    raise ValueError(f"bad counts of {device!r}")
                if isinstance(obs, bool) or not isinstance(obs, int) or obs < 0:
                    raise ValueError(f"bad observations of {device!r}")
                standing[str(device)] = Standing(float(clean), float(flagged), obs)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"detector state is not valid: {exc}", code="malformed_blob") from None
        self.standing = standing
