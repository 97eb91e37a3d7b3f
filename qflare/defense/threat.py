"""Simulated attackers: which devices attack, and what each attack does in the device's training step.

An attacker device runs the real protocol (enrolment, PQ session, signed and sealed updates); only its
training step differs.  Two kinds of attack:

* *data poisoning* (``label-flip``, ``backdoor``): the device trains honestly on poisoned examples
  (:mod:`qflare.defense.data_poison`);
* *model poisoning* (``sign-flip``, ``scale``, ``gaussian``, ``min-max``): the device trains honestly,
  then rewrites the update before sealing it:

  - ``sign-flip``: −Δ (Li et al. 2019, "RSA: Byzantine-Robust Stochastic Aggregation Methods");
  - ``scale``: λ·Δ, λ = ``scale`` (10 by default): a boosted, model-replacement style update
    (Bagdasaryan et al. 2020);
  - ``gaussian``: Δ replaced by N(0, σ²) noise, σ = ``noise_std`` (Fang et al. 2020);
  - ``min-max``: Shejwalkar & Houmansadr 2021 (:mod:`qflare.defense.minmax`), in the *full-knowledge*
    setting: the attackers collude and see the round's benign updates (the simulation queues their
    training behind the benign devices' and hands them those updates).  Every attacker of a round sends
    the same update.

The attackers are ``round(malicious × devices)`` devices drawn once, by a seeded permutation, for the
whole run; the simulation knows them, which is what lets it count detection true/false positives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .data_poison import flip_labels, poison_backdoor
from .minmax import min_max_update

__all__ = ["ATTACKS", "AttackConfig"]

ATTACKS: tuple[str, ...] = ("sign-flip", "scale", "gaussian", "label-flip", "backdoor", "min-max")
"""Every simulated attack, by name."""

_DATA_ATTACKS = frozenset({"label-flip", "backdoor"})
_ATTACKER_SEED = 0x5EED_A77A


def _bad(message: str) -> ConfigError:
    return ConfigError(message, code="bad_attack")


@dataclass(frozen=True)
class AttackConfig:
    """One simulated attack (see the module docstring).  Bad values raise ConfigError ``bad_attack``."""

    name: str
    malicious: float = 0.2
    """The share of devices that attack."""
    scale: float = 10.0
    """λ of the ``scale`` attack."""
    noise_std: float = 1.0
    """σ of the ``gaussian`` attack."""
    target: int = 0
    """The backdoor's target class."""
    poison_fraction: float = 0.5
    """The share of a backdoor attacker's examples that carry the trigger."""
    seed: int = 0
    """Seeds the choice of attackers (with the federation's seed) and the attacks' randomness."""

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise _bad(f"unknown attack {self.name!r}; one of: {', '.join(ATTACKS)}")
        for field_name, low, high in (("malicious", 0.0, 1.0), ("poison_fraction", 0.0, 1.0)):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v < high):
                raise _bad(f"{field_name} must be a number strictly between {low} and {high}, got {v!r}")
        for field_name in ("scale", "noise_std"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise _bad(f"{field_name} must be a positive finite number, got {v!r}")
        for field_name in ("target", "seed"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _bad(f"{field_name} must be a non-negative integer, got {v!r}")

    @property
    def poisons_data(self) -> bool:
        return self.name in _DATA_ATTACKS

    @property
    def needs_benign(self) -> bool:
        """True when an attacker must see the round's benign updates (min-max, full knowledge)."""
        return self.name == "min-max"

    def attackers(self, devices: int) -> frozenset[int]:
        """The attacking device indices among ``devices`` (at least one; never all)."""
        k = round(self.malicious * devices)
        if k < 1 or k >= devices:
            raise _bad(
                f"--malicious {self.malicious:g} of {devices} device(s) makes {k} attacker(s); "
                "an attack needs at least one attacker and one honest device"
            )
        order = torch.randperm(devices, generator=torch.Generator().manual_seed(_ATTACKER_SEED + self.seed))
        return frozenset(int(i) for i in order[:k])

    def check_classes(self, num_classes: int) -> None:
        if self.name == "backdoor" and self.target >= num_classes:
            raise _bad(f"the backdoor target class {self.target} is not one of the data set's {num_classes} classes")

    def poison_data(
        self, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int, *, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attacker's examples as it trains on them (unchanged for model-poisoning attacks)."""
        if self.name == "label-flip":
            return inputs, flip_labels(targets, num_classes)
        if self.name == "backdoor":
            return poison_backdoor(inputs, targets, target=self.target, fraction=self.poison_fraction, seed=seed)
        return inputs, targets

    def poison_update(self, delta: torch.Tensor, *, seed: int, benign: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The update the attacker sends instead of its honest ``delta``."""
        if self.name == "sign-flip":
            return -delta
        if self.name == "scale":
            return delta * self.scale
        if self.name == "gaussian":
            noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            return noise * self.noise_std
        if self.name == "min-max":
            return min_max_update(benign) if benign else delta  # no benign update to aim at: send honestly
        return delta

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
