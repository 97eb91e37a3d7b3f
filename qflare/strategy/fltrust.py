"""FLTrust (Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS).

The server holds a small clean *root* data set and, each round, trains the current global model on it
itself, giving the root update g0.  Each device update g_i then gets the trust score
TS_i = ReLU(cos(g_i, g0)), is rescaled to g0's norm, and the round's pseudo-gradient is

    Δ = Σ TS_i · (‖g0‖ / ‖g_i‖) · g_i  /  Σ TS_i

An update pointing away from the server's own direction (cosine <= 0) gets weight 0 and is recorded
as left out; rescaling bounds what any one update can do to ‖g0‖.  Unweighted by example counts, as
in the paper.  If no update has a positive trust score the round fails (code ``no_trusted_updates``)
and the model stays as it was.

The root update comes from the pipeline's :class:`RootUpdate` source (``Pipeline.root``), given the
round's global model when the round opens; a pipeline with this combine and no root source refuses to
open a round (code ``no_root_data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from qflare.errors import ConfigError, ValidationError
from qflare.strategy.combine import _check_input, _no_updates

__all__ = ["FLTrust", "RootUpdate"]


@runtime_checkable
class RootUpdate(Protocol):
    """The server's own update on its root data, from ``global_flat`` (a flat float32 delta)."""

    def update(self, global_flat: torch.Tensor) -> torch.Tensor: ...


class _FLTrustAccumulator:
    """Streaming: each update's trust score and rescaled contribution are folded in as it arrives."""

    def __init__(self, dim: int, root: torch.Tensor) -> None:
        if root.dtype != torch.float32 or root.shape != (dim,):
            raise ValidationError(f"the root update must be a float32 vector of shape ({dim},)", code="bad_shape")
        if not bool(torch.isfinite(root).all()):
            raise ValidationError("the root update is not finite", code="non_finite")
        self._dim = dim
        self._root = root.double()
        self._root_norm = float(torch.linalg.vector_norm(self._root))
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._trust_total = 0.0
        self._count = 0
        self.trust: list[float] = []
        """Each added update's trust score, in the order added."""

    @property
    def count(self) -> int:
        return self._count

    @property
    def selected(self) -> tuple[int, ...]:
        """The updates with a positive trust score (the rest did not enter the result)."""
        return tuple(i for i, t in enumerate(self.trust) if t > 0)

    def add(self, delta: torch.Tensor, weight: float) -> None:
        _check_input(delta, weight, self._dim)
        d = delta.double()
        norm = float(torch.linalg.vector_norm(d))
        trust = 0.0
        if norm > 0 and self._root_norm > 0:
            trust = max(0.0, float(torch.dot(d, self._root)) / (norm * self._root_norm))
        if trust > 0:
            self._sum.add_(d, alpha=trust * self._root_norm / norm)
            self._trust_total += trust
        self.trust.append(trust)
        self._count += 1

    def result(self) -> torch.Tensor:
        if self._count == 0:
            raise _no_updates()
        if self._trust_total <= 0:
            raise ValidationError(
                f"FLTrust: none of the {self._count} updates points along the server's root update "
                "(every trust score is 0); the round is not aggregated",
                code="no_trusted_updates",
            )
        return (self._sum / self._trust_total).to(torch.float32)


@dataclass(frozen=True)
class FLTrust:
    """FLTrust's trust-weighted, norm-rescaled mean (see the module docstring)."""

    streaming: ClassVar[bool] = True
    needs_individual_updates: ClassVar[bool] = True
    needs_root_update: ClassVar[bool] = True

    def start(self, dim: int, root_update: torch.Tensor | None = None) -> _FLTrustAccumulator:
        if root_update is None:
            raise ConfigError("FLTrust needs the server's root update to open a round", code="no_root_data")
        return _FLTrustAccumulator(dim, root_update)
