"""The Min-Max attack of Shejwalkar and Houmansadr 2021 ("Manipulating the Byzantine: Optimizing Model
Poisoning Attacks and Defenses for Federated Learning", NDSS), AGR-agnostic form.

The colluding attackers send ∇m = μ + γ·∇p, with μ the mean of the benign updates and ∇p = −σ the
inverse of their coordinate-wise standard deviation, and γ the largest value for which ∇m is no
farther from any benign update than the benign updates are from each other:

    max_i ‖∇m − ∇_i‖ <= max_{i,j} ‖∇_i − ∇_j‖

so a distance-based rule (Krum, Bulyan) cannot tell ∇m from the benign updates while it still drags
the aggregate as far as it can.  γ is found by the paper's halving search from γ_init = 50 down to a
step of 1e-5.  Full-knowledge setting: the attackers see the round's benign updates (the simulation's
attackers collude and read them, see :mod:`qflare.defense.threat`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["min_max_update"]

GAMMA_INIT = 50.0
TOLERANCE = 1e-5


def _max_distance_to(point: torch.Tensor, stack: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(stack - point, dim=1).max())


def min_max_update(benign: Sequence[torch.Tensor]) -> torch.Tensor:
    """The malicious update for one round given the benign updates (flat float32, same length).

    With one benign update the search admits γ = 0 only (the benign spread is 0): the attack sends that
    update's value.  It needs at least one benign update (ValueError otherwise)."""
    if not benign:
        raise ValueError("min-max needs at least one benign update")
    stack = torch.stack([b.double() for b in benign])
    mean = stack.mean(dim=0)
    deviation = stack.std(dim=0, unbiased=False) if len(benign) > 1 else torch.zeros_like(mean)
    if len(benign) > 1:
        gram = stack @ stack.T
        sq = gram.diagonal()
        spread = float((sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0).max().sqrt())
    else:
        spread = 0.0
    gamma, step, success = GAMMA_INIT, GAMMA_INIT / 2, 0.0
    while abs(success - gamma) > TOLERANCE:
        if _max_distance_to(mean - gamma * deviation, stack) <= spread:
            success = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return (mean - success * deviation).to(torch.float32)
