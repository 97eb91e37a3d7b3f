"""The parts an aggregation pipeline is composed of, as one-method protocols, and the update record.

Convention (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data"; Reddi et al. 2021, "Adaptive Federated Optimization"): each device sends a flat float32
``delta = local_params - global_params``.  A :class:`Combine` reduces the deltas of a round to one
pseudo-gradient Δ and a :class:`ServerOptimizer` turns ``(global, Δ)`` into the next global model.
A plain server step with learning rate 1.0 after a weighted mean is exactly FedAvg.

Every refusal of an input raises :class:`qflare.errors.ValidationError` with a specific ``code``;
every refusal of a configuration raises :class:`qflare.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch

__all__ = [
    "Accumulator",
    "ClientUpdate",
    "Combine",
    "Noise",
    "ServerOptimizer",
    "Transform",
    "UpdateCheck",
    "Weighting",
]


@dataclass
class ClientUpdate:
    """One device's contribution to a round: a flat float32 delta and how many examples produced it."""

    device_id: str
    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class UpdateCheck(Protocol):
    """Accept or refuse one update (raise ``ValidationError`` with a specific code)."""

    #: True when the check reads the update's values, which secure aggregation hides from the server.
    inspects_values: ClassVar[bool]

    def check(self, update: ClientUpdate, dim: int) -> None: ...


@runtime_checkable
class Weighting(Protocol):
    """The (positive, finite) weight of one update in the combination."""

    def weight(self, update: ClientUpdate) -> float: ...


@runtime_checkable
class Transform(Protocol):
    """A per-update rewrite of the delta applied after weighting and before combining."""

    def apply(self, delta: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Accumulator(Protocol):
    """One round's running combination.  ``result`` with nothing added raises code ``no_updates``."""

    @property
    def count(self) -> int: ...

    def add(self, delta: torch.Tensor, weight: float) -> None: ...

    def result(self) -> torch.Tensor: ...


@runtime_checkable
class Combine(Protocol):
    """Factory of per-round accumulators.

    ``streaming`` is True when an accumulator holds O(model) memory whatever the number of updates;
    ``needs_individual_updates`` is True when the rule must see each update separately (robust rules),
    which secure aggregation forbids.
    """

    streaming: ClassVar[bool]
    needs_individual_updates: ClassVar[bool]

    def start(self, dim: int) -> Accumulator: ...


@runtime_checkable
class Noise(Protocol):
    """Noise added to the combined delta (central differential privacy)."""

    def apply(self, delta: torch.Tensor, num_updates: int) -> torch.Tensor: ...


@runtime_checkable
class ServerOptimizer(Protocol):
    """Turns ``(global, Δ)`` into the next global vector without mutating either input.

    Stateful optimisers keep their state across rounds and expose it for checkpointing.
    """

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, object]: ...

    def load_state_dict(self, state: Mapping[str, object]) -> None: ...
