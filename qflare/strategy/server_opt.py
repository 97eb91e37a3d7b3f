"""Server optimisers: the step from (global x, pseudo-gradient Δ) to the next global model.

Δ is the combined client delta (local − global), so it points *downhill* and every rule adds it.

* :class:`ServerSGD` — x + η Δ; with η = 1 after a weighted mean this is FedAvg (McMahan et al. 2017).
* :class:`ServerMomentum` — FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"): v ← β v + Δ; x ← x + η v.
* :class:`ServerAdagrad`, :class:`ServerYogi`, :class:`ServerAdam` — FedAdagrad, FedYogi, FedAdam,
  exactly Algorithm 2 of Reddi et al. 2021, "Adaptive Federated Optimization":
  m ← β1 m + (1 − β1) Δ; then v ← v + Δ² (Adagrad), v ← v − (1 − β2) Δ² sign(v − Δ²) (Yogi) or
  v ← β2 v + (1 − β2) Δ² (Adam); x ← x + η m / (√v + τ).  No bias correction (the paper has none);
  m starts at 0 and v at v₋₁ = τ² (the paper requires v₋₁ ≥ τ²; ``initial_v`` overrides it).

No step mutates its inputs; state persists across rounds and round-trips through
``state_dict``/``load_state_dict`` for checkpointing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from qflare.errors import ConfigError, ValidationError

__all__ = ["ServerAdagrad", "ServerAdam", "ServerMomentum", "ServerSGD", "ServerYogi"]


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def _unit_interval(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def _check_pair(global_flat: torch.Tensor, delta: torch.Tensor) -> None:
    for label, t in (("global", global_flat), ("delta", delta)):
        if t.dtype != torch.float32 or t.dim() != 1:
            raise ValidationError(f"server step: {label} must be a 1-D float32 vector", code="bad_shape")
    if global_flat.shape != delta.shape:
        raise ValidationError(
            f"server step: global has {global_flat.numel()} values, delta has {delta.numel()}", code="bad_shape"
        )


def _state_tensor(state: Mapping[str, object], key: str) -> torch.Tensor | None:
    value = state.get(key)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.dim() != 1:
        raise ValidationError(f"optimizer state {key!r} must be a 1-D float32 tensor or None")
    return value.detach().clone()


def _matching_state(t: torch.Tensor | None, delta: torch.Tensor, name: str) -> None:
    if t is not None and t.shape != delta.shape:
        raise ValidationError(
            f"optimizer state {name} has {t.numel()} values but the model has {delta.numel()}", code="bad_shape"
        )


class ServerSGD:
    """x ← x + η Δ."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = _positive("ServerSGD.lr", lr)

    def __repr__(self) -> str:
        return f"ServerSGD(lr={self.lr})"

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        _check_pair(global_flat, delta)
        return torch.add(global_flat, delta, alpha=self.lr)

    def state_dict(self) -> dict[str, object]:
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        return None


class ServerMomentum:
    """FedAvgM (Hsu et al. 2019): v ← β v + Δ (v₀ = 0); x ← x + η v."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr = _positive("ServerMomentum.lr", lr)
        self.momentum = _unit_interval("ServerMomentum.momentum", momentum)
        self.velocity: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ServerMomentum(lr={self.lr}, momentum={self.momentum})"

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        _check_pair(global_flat, delta)
        _matching_state(self.velocity, delta, "velocity")
        if self.velocity is None:
            self.velocity = delta.detach().clone()
        else:
            self.velocity.mul_(self.momentum).add_(delta)
        return torch.add(global_flat, self.velocity, alpha=self.lr)

    def state_dict(self) -> dict[str, object]:
        return {"velocity": None if self.velocity is None else self.velocity.clone()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.velocity = _state_tensor(state, "velocity")


class _AdaptiveOptimizer(ABC):
    """Reddi et al. 2021, Algorithm 2, with the second-moment rule left to subclasses."""

    _name = "adaptive"

    def __init__(self, lr: float, beta1: float, tau: float, initial_v: float | None) -> None:
        self.lr = _positive(f"{self._name}.lr", lr)
        self.beta1 = _unit_interval(f"{self._name}.beta1", beta1)
        self.tau = _positive(f"{self._name}.tau", tau)
        init = self.tau**2 if initial_v is None else initial_v
        if not (math.isfinite(init) and init >= 0):
            raise ConfigError(f"{self._name}.initial_v must be a non-negative finite number, got {init}")
        self.initial_v = float(init)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.rounds = 0

    @abstractmethod
    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Update the second-moment estimate ``v`` in place from Δ²."""

    def step(self, global_flat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        _check_pair(global_flat, delta)
        _matching_state(self.m, delta, "m")
        _matching_state(self.v, delta, "v")
        m = torch.zeros_like(delta) if self.m is None else self.m
        v = torch.full_like(delta, self.initial_v) if self.v is None else self.v
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._update_v(v, delta * delta)
        self.m, self.v = m, v
        self.rounds += 1
        return torch.addcdiv(global_flat, m, v.sqrt().add_(self.tau), value=self.lr)

    def state_dict(self) -> dict[str, object]:
        return {
            "m": None if self.m is None else self.m.clone(),
            "v": None if self.v is None else self.v.clone(),
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        m, v = _state_tensor(state, "m"), _state_tensor(state, "v")
        if (m is None) != (v is None) or (m is not None and v is not None and m.shape != v.shape):
            raise ValidationError("optimizer state: m and v must both be present with equal shapes, or both absent")
        rounds = state.get("rounds", 0)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValidationError(f"optimizer state 'rounds' must be a non-negative integer, got {rounds!r}")
        self.m, self.v, self.rounds = m, v, rounds

    def __repr__(self) -> str:
        extra = f", beta2={self.beta2}" if hasattr(self, "beta2") else ""
        return f"{type(self).__name__}(lr={self.lr}, beta1={self.beta1}{extra}, tau={self.tau})"


class ServerAdagrad(_AdaptiveOptimizer):
    """FedAdagrad: v ← v + Δ²."""

    _name = "ServerAdagrad"

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3, initial_v: float | None = None) -> None:
        super().__init__(lr, beta1, tau, initial_v)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


class ServerYogi(_AdaptiveOptimizer):
    """FedYogi: v ← v − (1 − β2) Δ² sign(v − Δ²) (Zaheer et al. 2018's Yogi, applied at the server)."""

    _name = "ServerYogi"

    def __init__(
        self,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_v: float | None = None,
    ) -> None:
        super().__init__(lr, beta1, tau, initial_v)
        self.beta2 = _unit_interval("ServerYogi.beta2", beta2)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.addcmul_(delta_sq, torch.sign(v - delta_sq), value=-(1.0 - self.beta2))


class ServerAdam(_AdaptiveOptimizer):
    """FedAdam: v ← β2 v + (1 − β2) Δ²."""

    _name = "ServerAdam"

    def __init__(
        self,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_v: float | None = None,
    ) -> None:
        super().__init__(lr, beta1, tau, initial_v)
        self.beta2 = _unit_interval("ServerAdam.beta2", beta2)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)
