"""Privacy accounting for DP-FedAvg with Google's ``dp-accounting`` library (RDP or PLD).

Each noised round is one sampled Gaussian mechanism: a device's (clipped) update enters the sum with
probability ``q`` (the round's sampling rate) and the sum receives Gaussian noise of ``z`` times the
clipping bound, so the round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` and the run is their
composition (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"; the same
event TensorFlow Federated accounts).  The built-in ``random`` selector draws a fixed-size sample of k
of the N candidates; like the paper, we account it as Poisson sampling with q = k / N.  With ``q = 1``
(no amplification by sampling) a round is a plain Gaussian mechanism.

The unit of privacy is a device (user-level DP); the neighbouring relation is adding or removing one
device.  :class:`PrivacyAccountant` keeps the rounds as runs of equal sampling rates, so the per-round
cost of a query is one composition per distinct rate, not per round.

``dp_accounting`` is imported on first use: it takes over a second to import and only a coordinator
running DP-FedAvg needs it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qflare.errors import ConfigError

__all__ = ["ACCOUNTANTS", "PrivacyAccountant", "calibrate_noise_multiplier", "round_event"]

ACCOUNTANTS = ("rdp", "pld")
"""``rdp``: Rényi DP (Mironov 2017) with the library's default orders; ``pld``: privacy loss
distributions (tighter, slower)."""


class _DropNonConvergedOrders(logging.Filter):
    """The RDP accountant logs one warning per fractional order it could not evaluate for small noise
    (and then leaves that order out, which keeps the bound valid); one line per round per order is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_FILTERED = False


def _lib() -> Any:
    global _FILTERED
    import dp_accounting

    if not _FILTERED:
        logging.getLogger("absl").addFilter(_DropNonConvergedOrders())
        _FILTERED = True
    return dp_accounting


def _check_rate(q: float) -> None:
    if isinstance(q, bool) or not isinstance(q, int | float) or not (0 < q <= 1):
        raise ConfigError(f"a sampling rate is in (0, 1], got {q!r}")


def round_event(noise_multiplier: float, sampling_rate: float) -> Any:
    """The ``dp_accounting`` event of one noised round (sampled Gaussian; plain Gaussian for q = 1)."""
    _check_rate(sampling_rate)
    lib = _lib()
    gaussian = lib.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1 else lib.PoissonSampledDpEvent(sampling_rate, gaussian)


def _fresh(kind: str) -> Any:
    lib = _lib()
    if kind == "rdp":
        return lib.rdp.RdpAccountant()
    if kind == "pld":
        return lib.pld.PLDAccountant()
    raise ConfigError(f"unknown privacy accountant {kind!r}; one of: {', '.join(ACCOUNTANTS)}")


def _check(noise_multiplier: float, delta: float, kind: str) -> None:
    z = noise_multiplier
    if isinstance(z, bool) or not isinstance(z, int | float) or not (math.isfinite(z) and z > 0):
        raise ConfigError(f"the noise multiplier must be a positive finite number, got {z!r}")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if kind not in ACCOUNTANTS:
        raise ConfigError(f"unknown privacy accountant {kind!r}; one of: {', '.join(ACCOUNTANTS)}")


@dataclass
class PrivacyAccountant:
    """The (ε, δ) spent by the rounds noised so far, at a fixed δ and noise multiplier.

    ``runs`` holds ``[sampling rate, rounds]`` pairs in order (consecutive equal rates merged)."""

    noise_multiplier: float
    delta: float
    kind: str = "rdp"
    runs: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.noise_multiplier, self.delta, self.kind)

    @property
    def rounds(self) -> int:
        return int(sum(n for _, n in self.runs))

    def record(self, sampling_rate: float) -> None:
        """Account one more noised round sampled at ``sampling_rate``."""
        _check_rate(sampling_rate)
        if self.runs and self.runs[-1][0] == sampling_rate:
            self.runs[-1][1] += 1
        else:
            self.runs.append([float(sampling_rate), 1])

    def epsilon(self, *, then: Sequence[float] = (), unsampled: bool = False) -> float:
        """ε after the recorded rounds and, hypothetically, rounds at the rates in ``then``.

        ``unsampled=True`` gives the ε that holds when sampling amplifies nothing (q = 1 every round):
        what an observer who knows which devices took part in which round is bounded by."""
        runs = [(q, int(n)) for q, n in self.runs] + [(float(q), 1) for q in then]
        if unsampled:
            total = sum(n for _, n in runs)
            runs = [(1.0, total)] if total else []
        merged: list[tuple[float, int]] = []
        for q, n in runs:
            if merged and merged[-1][0] == q:
                merged[-1] = (q, merged[-1][1] + n)
            else:
                merged.append((q, n))
        return _epsilon(self.kind, float(self.noise_multiplier), float(self.delta), tuple(merged))

    def state(self) -> list[list[float]]:
        return [[float(q), int(n)] for q, n in self.runs]

    def load(self, runs: object) -> None:
        """Restore :meth:`state` output (ValueError when it is not a list of [rate, rounds] pairs)."""
        if not isinstance(runs, list):
            raise ValueError("accountant runs must be a list")
        loaded: list[list[float]] = []
        for item in runs:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError("an accountant run is a [rate, rounds] pair")
            q, n = item
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError("an accountant run counts at least one round")
            try:
                _check_rate(q)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            loaded.append([float(q), n])
        self.runs = loaded


@functools.lru_cache(maxsize=256)
def _epsilon(kind: str, z: float, delta: float, runs: tuple[tuple[float, int], ...]) -> float:
    """ε of ``runs`` (cached: a status page asks again and again for the same rounds)."""
    if not runs:
        return 0.0
    accountant = _fresh(kind)
    lib = _lib()
    for q, n in runs:
        accountant.compose(lib.SelfComposedDpEvent(round_event(z, q), n))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    epsilon: float, delta: float, rounds: int, sampling_rate: float, *, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier (to the library's tolerance) for which ``rounds`` rounds sampled at
    ``sampling_rate`` spend at most ``epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``)."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not (math.isfinite(epsilon) and epsilon > 0)
    ):
        raise ConfigError(f"the privacy budget epsilon must be a positive finite number, got {epsilon!r}")
    _check(1.0, delta, kind)
    _check_rate(sampling_rate)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    lib = _lib()
    try:
        z = lib.calibrate_dp_mechanism(
            lambda: _fresh(kind),
            lambda z: lib.SelfComposedDpEvent(round_event(z, sampling_rate), rounds),
            float(epsilon),
            float(delta),
            lib.LowerEndpointAndGuess(1e-2, 1.0),
        )
    except Exception as exc:  # the library raises ValueError/RuntimeError when no bracket is found
        raise ConfigError(
            f"no noise multiplier reaches epsilon {epsilon} at delta {delta} over {rounds} rounds: {exc}"
        ) from None
    return float(z)
