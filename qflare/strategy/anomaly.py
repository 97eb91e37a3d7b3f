"""Per-update anomaly scores of one round, relative to the round's own robust statistics.

Pure tensor arithmetic, no state: :class:`~qflare.protocol.detection.Detector` keeps the history and the
reputations and calls :func:`score_round` once per round, when the round closes (docs/defences.md).

For the round's updates Δ_1..Δ_n (n >= ``min_updates``):

* **norm**: an honest device's update norm grows with its local step count, i.e. with its data size n_i
  (measured on digits with Dirichlet α = 0.1: norms spread 9x across honest devices, norm per example
  only 3x).  So the round's own relation is fitted: r_i = log‖Δ_i‖ − β · log n_i, with β Siegel's
  repeated-median slope (clamped to [0, 2]) of log norm against log n over the round, and
  z_norm_i = (r_i − median(r)) / MADn(r) (upper side only: an update unusually *large* for its size).
  The z-score alone is not enough: when the round's honest updates follow the size relation closely, MADn
  is small and an honest device 1.5x its predicted size scores z > 4 (measured on digits, Dirichlet α =
  0.1, no attacker: honest ratios up to 1.89, z up to 5.9).  So the update must also be at least
  ``min_norm_ratio`` times the size the relation predicts, exp(r_i − median(r)) (default 2): an effect
  size, not only a rarity.
* **direction**: c_i = cos(Δ_i, m), m the coordinate-wise median of the round's updates;
  z_dir_i = (median(c) − c_i) / MADn(c) (lower side only: pointing away from the round).  Only used
  when the round *has* a direction, median(c) > k · MADn(c): with strongly non-IID data the updates are
  nearly orthogonal (measured on digits, Dirichlet α = 0.1: median cosine 0.04, honest updates from
  −0.10 to +0.37), and a low cosine then says nothing about honesty.
* **history**: h_i = cos(Δ_i, the device's own past direction) when there is one; z_hist_i =
  (median(h) − h_i) / MADn(h) over the round's devices that have a history.

MADn = 1.4826 · median(|x − median(x)|) (a consistent estimate of the standard deviation for normal
data), floored so that a round of near-identical values does not make every tiny difference infinite.
An update is *anomalous* when (z_norm > k and its norm ratio >= ``min_norm_ratio``) or (the round has a
direction and) z_dir > k, or when z_hist > k **and** h_i < 0 (it opposes
the device's own past direction).  The thresholds are therefore median + k · MADn of each round's own
values: they move with the round.  At most ⌊(n − 1) / 2⌋ updates are flagged (the highest scores): the
statistics assume an honest majority, and a "majority of outliers" is a contradiction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MADN_SCALE", "UpdateScore", "robust_z", "score_round", "size_slope"]

MADN_SCALE = 1.4826
"""MAD to standard deviation for normally distributed data."""

_MIN_SPREAD = 1e-3
"""Floor of MADn (log-norm and cosine units): below it, differences are rounding, not behaviour."""


@dataclass(frozen=True)
class UpdateScore:
    """One update's scores in its round; ``anomalous`` with the ``why`` (``norm``, ``direction``, ``history``)."""

    norm: float
    norm_ratio: float
    """‖Δ_i‖ over the norm the round's size relation predicts for its example count: exp(r_i − median r)."""
    cosine: float
    history_cosine: float | None
    z_norm: float
    z_direction: float
    z_history: float | None
    anomalous: bool
    why: str | None

    @property
    def score(self) -> float:
        """The largest of the z-scores (how far outside the round the update is)."""
        return max(self.z_norm, self.z_direction, self.z_history if self.z_history is not None else -math.inf)


def robust_z(values: Sequence[float]) -> list[float]:
    """(x − median) / MADn of ``values`` (MADn floored at 1e-3)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    med = float(t.median())
    mad = MADN_SCALE * float((t - med).abs().median())
    spread = max(mad, _MIN_SPREAD)
    return [(float(v) - med) / spread for v in t]


def size_slope(log_norms: Sequence[float], log_sizes: Sequence[float]) -> float:
    """Siegel's repeated-median slope of log norm against log example count (for each point the median of
    its slopes to the others, then the median of those: robust to almost half the points being outliers),
    clamped to [0, 2]; 0 when all sizes are equal."""
    per_point: list[float] = []
    for i in range(len(log_sizes)):
        slopes = [
            (log_norms[j] - log_norms[i]) / (log_sizes[j] - log_sizes[i])
            for j in range(len(log_sizes))
            if abs(log_sizes[j] - log_sizes[i]) > 1e-9
        ]
        if slopes:
            per_point.append(float(torch.tensor(slopes, dtype=torch.float64).median()))
    if not per_point:
        return 0.0
    return min(max(float(torch.tensor(per_point, dtype=torch.float64).median()), 0.0), 2.0)


def score_round(
    deltas: Sequence[torch.Tensor],
    history: Sequence[torch.Tensor | None],
    examples: Sequence[int],
    *,
    k: float,
    min_norm_ratio: float = 2.0,
) -> list[UpdateScore]:
    """Score each of ``deltas`` (1-D float tensors of one size, at least 3) against the others;
    ``history[i]`` is update i's device's past direction (None: no history), ``examples[i]`` the example
    count it claimed (>= 1).  See the module docstring."""
    n = len(deltas)
    if n < 3 or len(history) != n or len(examples) != n:
        raise ValueError("score_round needs at least 3 updates and one history slot and example count per update")
    stacked = torch.stack([d.detach().to(torch.float32) for d in deltas])
    norms = stacked.norm(dim=1).to(torch.float64)
    tiny = torch.finfo(torch.float32).tiny
    log_norms = norms.clamp_min(tiny).log().tolist()
    log_sizes = [math.log(max(int(e), 1)) for e in examples]
    beta = size_slope(log_norms, log_sizes)
    median_direction = stacked.median(dim=0).values
    cosines = torch.nn.functional.cosine_similarity(stacked, median_direction.unsqueeze(0), dim=1).tolist()
    hist_cos: list[float | None] = []
    for d, h in zip(stacked, history, strict=True):
        hist_cos.append(None if h is None else float(torch.nn.functional.cosine_similarity(d, h, dim=0)))
    residuals = [ln - beta * ls for ln, ls in zip(log_norms, log_sizes, strict=True)]
    z_norm = robust_z(residuals)
    middle = float(torch.tensor(residuals, dtype=torch.float64).median())
    ratios = [math.exp(min(r - middle, 700.0)) for r in residuals]
    z_dir = [-z for z in robust_z(cosines)]
    cos_t = torch.tensor(cosines, dtype=torch.float64)
    cos_median = float(cos_t.median())
    directed = cos_median > k * max(MADN_SCALE * float((cos_t - cos_median).abs().median()), _MIN_SPREAD)
    known = [(i, c) for i, c in enumerate(hist_cos) if c is not None]
    z_hist: list[float | None] = [None] * n
    if len(known) >= 3:
        for (i, _), z in zip(known, robust_z([c for _, c in known]), strict=True):
            z_hist[i] = -z
    reasons: list[str | None] = []
    for i in range(n):
        hc, zh = hist_cos[i], z_hist[i]
        if z_norm[i] > k and ratios[i] >= min_norm_ratio:
            reasons.append("norm")
        elif directed and z_dir[i] > k:
            reasons.append("direction")
        elif zh is not None and hc is not None and zh > k and hc < 0:
            reasons.append("history")
        else:
            reasons.append(None)
    scores = [
        UpdateScore(float(norms[i]), ratios[i], cosines[i], hist_cos[i], z_norm[i], z_dir[i], z_hist[i], False, None)
        for i in range(n)
    ]
    flagged = sorted((i for i in range(n) if reasons[i] is not None), key=lambda i: -scores[i].score)
    for i in flagged[: (n - 1) // 2]:
        s = scores[i]
        scores[i] = dataclasses.replace(s, anomalous=True, why=reasons[i])
    return scores
