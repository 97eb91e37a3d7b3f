"""The threshold ``t`` and neighbour degree ``k`` of a secure-aggregation round, chosen from ``n``.

Each device shares its secrets among its ``k`` neighbours (``k = n - 1``: the complete graph of Bonawitz
et al. 2017; smaller ``k``: the sparse graph of Bell et al. 2020).  With a graph drawn from a seed the
adversary does not control, a device's neighbourhood is a uniform ``k``-subset of the other ``n - 1``
devices, so the number of corrupted (``C``) and of dropped (``D``) neighbours are hypergeometric.  We take
``C_max`` and ``D_max`` as tail bounds holding for *every* device at once (union bound over ``n``):

* ``n * P[C > C_max] <= 2^-sigma``   (security, ``sigma = 40`` by default)
* ``n * P[D > D_max] <= eta``         (correctness, ``eta = 2^-20``: a failure only aborts a round)

and require

* security: ``2t > k + C_max``.  An honest device answers one kind of share per peer, a corrupted one
  both; to get both the self-mask seed and the pairwise key of a device the coordinator needs ``t`` of
  each, i.e. ``2t <= (k - C) + 2C``.  Also implies ``t > C_max``: the corrupted alone never reach ``t``.
  This holds only when every honest device answers for **one and the same** survivor set: against a
  malicious coordinator that is what the consistency round gives (a device answers only a request naming
  the survivor set signed by more than ``(n + corrupt) / 2`` devices, :attr:`SecAggParams.quorum`; any
  two such sets share an honest signer, and an honest device signs one set).  Without that round a
  coordinator that sends each device its own survivor set recovers single inputs
  (docs/secure-aggregation.md, section 6).
* correctness: ``t <= k - D_max``.  Enough neighbours remain to answer at the unmask phase.

* connectivity (sparse graphs only): the server learns the sum of each connected component of the
  honest surviving devices, so that subgraph must stay connected.  In a Harary graph (ring, ``k/2``
  neighbours each side) a subset stays connected unless ``k/2`` ring-consecutive devices are all
  corrupted or dropped; over a random ring order with ``B = floor((gamma + delta) n)`` such devices,
  ``n * prod_{i < k/2} (B - i) / (n - i) <= 2^-sigma`` bounds that (union over the ``n`` starting
  positions).  Dropouts are assumed independent of the graph here.

``choose`` returns the smallest even ``k`` (Harary graphs have even degree) that admits such a ``t``,
with ``t = floor((k + C_max) / 2) + 1``, falling back to the complete graph, and refuses
(``ConfigError``) when even that cannot satisfy both, or when the devices left after ``floor(delta n)``
dropouts cannot reach the consistency quorum.  It records ``corrupt = floor(gamma * n)``, the number of
corrupted devices the round tolerates, which sets that quorum.  For the complete graph the bounds are exact
counts (``C = floor(gamma * n)``, ``D = floor(delta * n)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from qflare.errors import ConfigError, ErrorCode

__all__ = ["DEFAULT_ETA_LOG2", "DEFAULT_SIGMA", "SecAggParams", "choose"]

DEFAULT_SIGMA = 40
DEFAULT_ETA_LOG2 = 20
MAX_DEVICES = 10_000


@dataclass(frozen=True)
class SecAggParams:
    """``n`` devices, each sharing ``t``-of-``k`` among its ``k`` neighbours; at most ``corrupt`` of them
    colluding with the coordinator (``choose`` sets it; built by hand it defaults to 0: no colluding
    devices, and the consistency quorum is then a plain majority)."""

    n: int
    k: int
    t: int
    corrupt: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.n <= MAX_DEVICES:
            raise ConfigError(f"n must be in 2..{MAX_DEVICES}", code=ErrorCode.BAD_ARGUMENT)
        if not 1 <= self.k <= self.n - 1 or (self.k != self.n - 1 and self.k % 2):
            raise ConfigError("k must be even and in 2..n-2, or n-1", code=ErrorCode.BAD_ARGUMENT)
        if not 1 <= self.t <= self.k:
            raise ConfigError(f"t must be in 1..k={self.k}", code=ErrorCode.BAD_ARGUMENT)
        if isinstance(self.corrupt, bool) or not isinstance(self.corrupt, int) or not 0 <= self.corrupt < self.n:
            raise ConfigError(f"corrupt must be in 0..{self.n - 1}", code=ErrorCode.BAD_ARGUMENT)

    @property
    def complete(self) -> bool:
        return self.k == self.n - 1

    @property
    def quorum(self) -> int:
        """Signatures on one survivor set a device needs before it unmasks: more than ``(n + corrupt) / 2``,
        so any two sets with a quorum share more than ``corrupt`` signers, at least one of them honest."""
        return (self.n + self.corrupt) // 2 + 1


@lru_cache(maxsize=4096)
def _tail_bound(population: int, marked: int, draws: int, log2_budget: float) -> int:
    """Smallest ``c`` with ``P[X > c] <= 2^log2_budget`` for X ~ Hypergeometric(population, marked, draws)."""
    top = min(marked, draws)
    log2_budget_count = math.log2(math.comb(population, draws)) + log2_budget
    tail = 0
    for c in range(top, -1, -1):  # tail = P[X > c] * C(population, draws), grown from the top
        if tail and math.log2(tail) > log2_budget_count:
            return c + 1
        tail += math.comb(marked, c) * math.comb(population - marked, draws - c)
    return 0


def _bounds(n: int, k: int, dropout: float, corruption: float, sigma: int, eta_log2: int) -> tuple[int, int]:
    corrupt, dropped = math.floor(corruption * n), math.floor(dropout * n)
    if k == n - 1:
        return min(corrupt, k), min(dropped, k)
    log2_n = math.log2(n)
    return (
        _tail_bound(n - 1, corrupt, k, -sigma - log2_n),
        _tail_bound(n - 1, dropped, k, -eta_log2 - log2_n),
    )


def _log2_gap_probability(n: int, k: int, bad_fraction: float) -> float:
    """log2 of the union bound on ``k/2`` ring-consecutive corrupted-or-dropped devices (see module docs)."""
    bad = math.floor(bad_fraction * n)
    half = k // 2
    if bad < half:
        return -math.inf
    return math.log2(n) + sum(math.log2((bad - i) / (n - i)) for i in range(half))


def choose(
    n: int,
    *,
    dropout: float = 0.1,
    corruption: float = 0.1,
    sigma: int = DEFAULT_SIGMA,
    eta_log2: int = DEFAULT_ETA_LOG2,
) -> SecAggParams:
    """The smallest neighbourhood that meets both conditions for ``n`` devices (see the module docs)."""
    if not 2 <= n <= MAX_DEVICES:
        raise ConfigError(f"n must be in 2..{MAX_DEVICES}", code=ErrorCode.BAD_ARGUMENT)
    if not (0.0 <= dropout < 1.0 and 0.0 <= corruption < 1.0):
        raise ConfigError("dropout and corruption are fractions in [0, 1)", code=ErrorCode.BAD_ARGUMENT)
    if not 1 <= sigma <= 256 or not 1 <= eta_log2 <= 256:
        raise ConfigError("sigma and eta_log2 must be in 1..256", code=ErrorCode.BAD_ARGUMENT)
    corrupt = math.floor(corruption * n)
    if n - math.floor(dropout * n) < (n + corrupt) // 2 + 1:
        raise ConfigError(
            f"with {dropout:.0%} dropout too few of {n} devices remain to sign the survivor set "
            f"(more than (n + {corrupt}) / 2 must)",
            code=ErrorCode.BAD_ARGUMENT,
        )
    candidates = [*range(2, n - 1, 2), n - 1]
    for k in candidates:
        c_max, d_max = _bounds(n, k, dropout, corruption, sigma, eta_log2)
        t = (k + c_max) // 2 + 1
        if t <= k - d_max and (k == n - 1 or _log2_gap_probability(n, k, dropout + corruption) <= -sigma):
            return SecAggParams(n, k, t, corrupt=corrupt)
    raise ConfigError(
        f"no threshold tolerates {dropout:.0%} dropout and {corruption:.0%} corruption with {n} devices "
        "(need 2t > k + C and t <= k - D)",
        code=ErrorCode.BAD_ARGUMENT,
    )
