"""DP-FedAvg: central, user-level differential privacy with adaptive clipping and an accountant.

The mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):

1. every update counts the same (uniform weighting: a device's claimed example count is ignored);
2. each update Δ_i is clipped to L2 norm C: Δ_i · min(1, C / ‖Δ_i‖);
3. the clipped updates are summed and N(0, (z_Δ · C)²) noise is added to every coordinate of the sum;
4. the noised sum is divided by the *expected* number of participants m (``per_round``), not by the
   number that arrived: the fixed-denominator estimator, whose sensitivity C / m does not depend on who
   took part.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"): C
follows the ``target_quantile`` γ of the update norms.  Each round counts the updates that were not
clipped, b = Σ 1[‖Δ_i‖ ≤ C], releases b̃ = (b + N(0, σ_b²)) / m and sets C ← C · exp(−η (b̃ − γ)).
That count is a second Gaussian query on the same devices; the paper's split keeps the total at the
configured noise multiplier z: z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so the pair of queries costs exactly what
one Gaussian query with multiplier z costs, and the accountant charges z.  (σ_b defaults to the paper's
m / 20, raised to z when that is smaller -- with few participants m / 20 would leave the sum almost no
noise budget; 2σ_b must exceed z.)

Accounting (:mod:`qflare.strategy.accounting`) charges every noised round with the round's sampling rate
q = selected / candidates, given by the coordinator when it opens the round (:meth:`DPFedAvg.begin_round`).
A privacy budget (``epsilon``) stops the federation *before* a round whose noising would exceed it.

What this protects, and from whom (docs/defences.md, "Differential privacy"): the released global models
are (ε, δ)-DP with respect to any one device's whole data.  The coordinator itself sees every update
before clipping and noise: it is trusted.  The amplification by sampling in ε assumes the selection is
secret; the federation's ``seed`` and the ledger (which names each round's participants) reveal it, so
against their readers ``epsilon_unsampled`` (no amplification) is the bound that holds.

The noise comes from a torch generator seeded from ``os.urandom`` (a test may pass ``seed``); its state is
never stored, so a restarted coordinator draws fresh noise.  torch's normal sampler is not a
cryptographic one and floating-point Gaussian sampling is known to leak in theory (Mironov 2012 showed it
for Laplace); these are limitations shared with the libraries this follows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qflare.errors import ConfigError, RoundError, ValidationError
from qflare.strategy.accounting import ACCOUNTANTS, PrivacyAccountant, calibrate_noise_multiplier
from qflare.strategy.base import Accumulator
from qflare.strategy.pipeline import Pipeline, _pipeline, register_strategy
from qflare.strategy.server_opt import ServerSGD
from qflare.strategy.weighting import Uniform

__all__ = ["DPFedAvg", "PrivacySpent", "RoundRelease", "dp_fedavg", "privacy_of"]

_CLIP_RANGE = (1e-9, 1e9)
"""Adaptive clipping keeps C within this range (a run of all-clipped or no-clipped rounds moves it
geometrically; the bounds keep it a usable finite number)."""


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"DP-FedAvg: {name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RoundRelease:
    """What one noised round used and released (for the ledger and the history)."""

    clip_norm: float
    """C of the round (before its adaptive update)."""
    next_clip_norm: float
    sum_noise_stddev: float
    """z_Δ · C: the standard deviation of the noise on each coordinate of the clipped sum."""
    applied_stddev: float
    """z_Δ · C / m: on each coordinate of the published mean."""
    updates: int
    unclipped: int | None
    """How many updates were not clipped (None without adaptive clipping; never published, the noised
    fraction is)."""
    noised_unclipped_fraction: float | None
    sampling_rate: float


@dataclass(frozen=True)
class PrivacySpent:
    epsilon: float
    """Spent ε with amplification by sampling (holds while the selection is secret)."""
    epsilon_unsampled: float
    """Spent ε without amplification: holds against an observer who knows who took part."""
    delta: float
    rounds: int
    budget: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "epsilon_unsampled": self.epsilon_unsampled,
            "delta": self.delta,
            "rounds": self.rounds,
            "budget": self.budget,
        }


class DPFedAvg:
    """The DP-FedAvg combine: clip, sum, add Gaussian noise, divide by the expected participants.

    Use it through :func:`dp_fedavg` (the ``dp-fedavg`` preset), which fixes uniform weighting.
    ``noise_multiplier`` z is what the accountant charges per round; ``expected_participants`` m is the
    fixed denominator; ``sampling_rate`` the default q of a round (the coordinator states the actual one).
    ``epsilon`` is a budget at ``delta``; ``target_quantile=None`` keeps C fixed.
    """

    streaming: ClassVar[bool] = True
    needs_individual_updates: ClassVar[bool] = True  # the server clips each update
    uniform_weights_only: ClassVar[bool] = True

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_participants: int,
        sampling_rate: float,
        delta: float,
        epsilon: float | None = None,
        target_quantile: float | None = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
        accountant: str = "rdp",
        seed: int | None = None,
    ) -> None:
        self.clip_norm = _positive("clip_norm", clip_norm)
        z = _positive("noise_multiplier", noise_multiplier)
        m = expected_participants
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"DP-FedAvg: expected_participants must be a positive integer, got {m!r}")
        self.expected_participants = m
        self.sampling_rate = _positive("sampling_rate", sampling_rate)
        if self.sampling_rate > 1:
            raise ConfigError(f"DP-FedAvg: sampling_rate must be at most 1, got {sampling_rate!r}")
        self.budget = None if epsilon is None else _positive("epsilon", epsilon)
        if target_quantile is not None and (
            isinstance(target_quantile, bool)
            or not isinstance(target_quantile, int | float)
            or not 0 < target_quantile < 1
        ):
            raise ConfigError(f"DP-FedAvg: target_quantile must be in (0, 1) or None, got {target_quantile!r}")
        self.target_quantile = None if target_quantile is None else float(target_quantile)
        self.clip_lr = _positive("clip_lr", clip_lr)
        if self.target_quantile is None:
            if count_stddev is not None:
                raise ConfigError("DP-FedAvg: count_stddev applies to adaptive clipping only (target_quantile)")
            self.count_stddev: float | None = None
            self.sum_noise_multiplier = z
        else:
            # the paper's m / 20, but at least z: with few participants m / 20 would leave the sum almost
            # nothing of the privacy (z_Δ -> infinity as 2 σ_b -> z); σ_b = z costs the sum a factor 1.155
            sb = max(m / 20, z) if count_stddev is None else _positive("count_stddev", count_stddev)
            if 2 * sb <= z:
                raise ConfigError(
                    f"DP-FedAvg: adaptive clipping needs 2 x count_stddev > noise_multiplier (got {sb:g} and {z:g}): "
                    "the count's noise alone would exceed the privacy the noise multiplier buys; raise count_stddev "
                    "or use a fixed clip norm"
                )
            self.count_stddev = sb
            self.sum_noise_multiplier = (z**-2 - (2 * sb) ** -2) ** -0.5
        self.accountant = PrivacyAccountant(z, float(delta), accountant)
        self.seeded = seed is not None
        self._generator = torch.Generator(device="cpu").manual_seed(
            int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        )
        self._round_rate: float | None = None
        self.last: RoundRelease | None = None
        if self.budget is not None and self.accountant.epsilon(then=[self.sampling_rate]) > self.budget:
            raise ConfigError(
                f"DP-FedAvg: not even one round fits the privacy budget epsilon {self.budget:g} at delta {delta:g} "
                f"with noise multiplier {z:g}; raise the noise multiplier or the budget"
            )

    @property
    def noise_multiplier(self) -> float:
        return self.accountant.noise_multiplier

    def __repr__(self) -> str:
        adaptive = (
            "fixed"
            if self.target_quantile is None
            else f"quantile={self.target_quantile:g}, clip_lr={self.clip_lr:g}, count_stddev={self.count_stddev:g}"
        )
        return (
            f"DPFedAvg(noise_multiplier={self.noise_multiplier:g}, expected_participants={self.expected_participants}, "
            f"clip={adaptive}, accountant={self.accountant.kind})"
        )

    def noise_to_signal(self, dim: int) -> float:
        """Expected norm of the noise added to one round's published mean, in clip norms: z_Δ · √dim / m.

        Every clipped update has norm at most C, so the mean's signal is at most C; the noise on the mean
        is N(0, (z_Δ C / m)²) on each of ``dim`` coordinates, norm ≈ z_Δ C √dim / m.  A diagnostic, not a
        threshold: spread over ``dim`` directions, noise well above 1 can still leave training intact
        (measured on fmnist-dir05's CNN: 23 at ε = 128 trained as well as FedAvg), while ~99 (ε = 8 over
        10 rounds) replaced the weights with noise in one round and local training diverged in the next
        (docs/defences.md, "Why small federations cannot train under DP")."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"DP-FedAvg: a model dimension is a positive integer, got {dim!r}")
        return self.sum_noise_multiplier * math.sqrt(dim) / self.expected_participants

    # ------------------------------------------------------------------ budget
    def spent(self) -> PrivacySpent:
        return PrivacySpent(
            self.accountant.epsilon(),
            self.accountant.epsilon(unsampled=True),
            self.accountant.delta,
            self.accountant.rounds,
            self.budget,
        )

    def budget_stop(self, sampling_rate: float | None = None) -> str | None:
        """Why the next round (sampled at ``sampling_rate``, default the configured rate) must not run, or
        None when it fits the budget (always None without one)."""
        if self.budget is None:
            return None
        q = self.sampling_rate if sampling_rate is None else sampling_rate
        after = self.accountant.epsilon(then=[q])
        if after <= self.budget:
            return None
        return (
            f"privacy budget reached: {self.accountant.rounds} noised round(s) spent epsilon "
            f"{self.accountant.epsilon():.4g} at delta {self.accountant.delta:g}; one more round would spend "
            f"{after:.4g} > the budget {self.budget:g}, so training stops here"
        )

    def begin_round(self, sampling_rate: float) -> None:
        """The coordinator's statement of the sampling rate of the round it is opening (selected /
        candidates); charged when the round is noised."""
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int | float) or not 0 < sampling_rate <= 1:
            raise ConfigError(f"a sampling rate is in (0, 1], got {sampling_rate!r}")
        self._round_rate = float(sampling_rate)

    # ------------------------------------------------------------------ the combine
    def start(self, dim: int) -> Accumulator:
        return _DPRound(self, dim, self.clip_norm)

    def release(self, clipped_sum: torch.Tensor, updates: int, unclipped: int, clip: float) -> torch.Tensor:
        """Noise a round's clipped sum, divide by m, move C, charge the accountant (once per round)."""
        m = self.expected_participants
        std = self.sum_noise_multiplier * clip
        noise = torch.randn(clipped_sum.shape, generator=self._generator, dtype=torch.float32)
        mean = clipped_sum.add(noise, alpha=std).div_(m)
        fraction: float | None = None
        next_clip = clip
        if self.target_quantile is not None:
            assert self.count_stddev is not None
            count_noise = float(torch.randn((), generator=self._generator, dtype=torch.float64))
            fraction = (unclipped + self.count_stddev * count_noise) / m
            next_clip = clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))
            next_clip = min(max(next_clip, _CLIP_RANGE[0]), _CLIP_RANGE[1])
        q = self.sampling_rate if self._round_rate is None else self._round_rate
        self.accountant.record(q)
        self._round_rate = None
        self.clip_norm = next_clip
        self.last = RoundRelease(
            clip, next_clip, std, std / m, updates, unclipped if self.target_quantile is not None else None, fraction, q
        )
        return mean

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, object]:
        """The clip norm and the accounted rounds (never the generator: a restart draws fresh noise)."""
        return {"clip_norm": self.clip_norm, "accounted": self.accountant.state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        clip, accounted = state.get("clip_norm"), state.get("accounted")
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not (math.isfinite(clip) and clip > 0):
            raise ValidationError("DP-FedAvg state: clip_norm must be a positive finite number")
        try:
            self.accountant.load(accounted)
        except ValueError as exc:
            raise ValidationError(f"DP-FedAvg state: {exc}") from None
        self.clip_norm = float(clip)


class _DPRound:
    """One round's clipped sum.  ``result`` noises once; calling it again returns the same release."""

    def __init__(self, mechanism: DPFedAvg, dim: int, clip: float) -> None:
        self._mech, self._clip = mechanism, clip
        self._sum = torch.zeros(dim, dtype=torch.float32)
        self._count = 0
        self._unclipped = 0
        self._result: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self._count

    def add(self, delta: torch.Tensor, weight: float) -> None:
        if weight != 1.0:
            raise ValidationError(f"DP-FedAvg weighs every update 1, got weight {weight}", code="bad_weight")
        if self._result is not None:
            raise RoundError("this DP-FedAvg round was already released", code="round_closed")
        norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
        if norm <= self._clip:
            self._sum.add_(delta)
            self._unclipped += 1
        else:
            self._sum.add_(delta, alpha=self._clip / norm)
        self._count += 1

    def result(self) -> torch.Tensor:
        if self._count == 0:
            raise ValidationError("nothing to combine: no update was added", code="no_updates")
        if self._result is None:
            self._result = self._mech.release(self._sum, self._count, self._unclipped, self._clip)
        return self._result.clone()


def privacy_of(pipeline: Pipeline) -> DPFedAvg | None:
    """The pipeline's DP-FedAvg mechanism, or None when it adds no accounted noise."""
    return pipeline.combine if isinstance(pipeline.combine, DPFedAvg) else None


def dp_fedavg(
    *,
    devices: int,
    per_round: int,
    rounds: int,
    noise_multiplier: float | None = None,
    epsilon: float | None = None,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    target_quantile: float | None = 0.5,
    clip_lr: float = 0.2,
    count_stddev: float | None = None,
    accountant: str = "rdp",
    seed: int | None = None,
    **overrides: Any,
) -> Pipeline:
    """DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021).

    ``devices``, ``per_round`` and ``rounds`` are the federation's (a spec passes its own): q = per_round /
    devices, m = per_round.  Give ``noise_multiplier`` (optionally with an ``epsilon`` budget that stops
    training before it is exceeded), or ``epsilon`` alone to calibrate the noise multiplier so that
    ``rounds`` rounds spend it.  ``target_quantile=None`` (or 0) keeps ``clip_norm`` fixed."""
    for name, value in (("devices", devices), ("per_round", per_round), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"DP-FedAvg: {name} must be a positive integer, got {value!r}")
    if per_round > devices:
        raise ConfigError(f"DP-FedAvg: per_round ({per_round}) cannot exceed devices ({devices})")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"DP-FedAvg: unknown accountant {accountant!r}; one of: {', '.join(ACCOUNTANTS)}")
    for fixed in ("weighting", "combine", "noise", "secure_aggregation"):
        if fixed in overrides:
            raise ConfigError(f"DP-FedAvg fixes {fixed}: its guarantee depends on it")
    q = per_round / devices
    if noise_multiplier is None:
        if epsilon is None:
            raise ConfigError("DP-FedAvg needs a noise multiplier or a privacy budget epsilon (or both)")
        # the total multiplier: with adaptive clipping the count query takes its share of it (z_Δ > z)
        noise_multiplier = calibrate_noise_multiplier(epsilon, delta, rounds, q, kind=accountant)
    mechanism = DPFedAvg(
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        expected_participants=per_round,
        sampling_rate=q,
        delta=delta,
        epsilon=epsilon,
        target_quantile=target_quantile or None,
        clip_lr=clip_lr,
        count_stddev=count_stddev,
        accountant=accountant,
        seed=seed,
    )
    return _pipeline({"weighting": Uniform(), "combine": mechanism, "server_opt": ServerSGD(1.0)}, overrides)


register_strategy("dp-fedavg", dp_fedavg)
