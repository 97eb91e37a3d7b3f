"""A global budget for the coordinator's expensive public-key work, with enrolled devices served first.

A handshake costs the coordinator an ML-KEM (+ X25519) encapsulation and an ML-DSA signature; an
enrollment costs a signature verification and a signature.  Per-address rate limits cannot bound that
work (one host has many addresses), so :class:`CryptoBudget` bounds it for the whole coordinator: a
token bucket that refills at ``rate_per_s`` operations a second up to ``burst``.

Two classes of work share the bucket, and handshakes (of enrolled, active devices: the cheap checks
run first) come first: a handshake may take the bucket down to empty, an enrollment only down to
``reserve`` (a fraction of ``burst``).  So an enrollment flood can spend at most what handshakes leave
above the reserve, while handshakes keep at least the reserve and the whole refill below it.  A refusal
is :class:`~qflare.errors.CoordinatorBusyError` (``coordinator_busy``, 503) with ``retry_after_s``: when
the bucket will next hold enough for the refused class.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable

from ..errors import ConfigError, CoordinatorBusyError

__all__ = ["CryptoBudget", "Work"]


class Work(enum.Enum):
    """The classes of expensive work, highest priority first."""

    HANDSHAKE = "handshake"
    ENROLLMENT = "enrollment"


class CryptoBudget:
    """Token bucket of expensive operations (see the module docstring).  Thread-safe."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        enrollment_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ConfigError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ConfigError(f"burst must be >= 1, got {burst!r}")
        if not 0.0 <= enrollment_share <= 1.0:
            raise ConfigError(f"enrollment_share must be within 0..1, got {enrollment_share!r}")
        self.rate, self.burst = float(rate_per_s), float(burst)
        self.reserve = self.burst * (1.0 - enrollment_share)
        """The level below which only handshakes may draw."""
        self._clock = clock
        self._level = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> float:
        now = self._clock()
        elapsed = max(0.0, now - self._at)  # a clock stepped backwards refills nothing
        self._at = now
        self._level = min(self.burst, self._level + elapsed * self.rate)
        return self._level

    @property
    def level(self) -> float:
        with self._lock:
            return self._refill()

    def take(self, work: Work, cost: float = 1.0) -> None:
        """Spend ``cost`` operations of class ``work``, or raise ``coordinator_busy`` spending nothing."""
        floor = 0.0 if work is Work.HANDSHAKE else self.reserve
        with self._lock:
            level = self._refill()
            if level - cost >= floor:
                self._level = level - cost
                return
            wait = (floor + cost - level) / self.rate
        if floor + cost > self.burst:  # can never be served: a configuration without enrollment room
            raise CoordinatorBusyError(f"this coordinator accepts no {work.value} work", retry_after_s=60.0)
        raise CoordinatorBusyError(
            f"the coordinator is busy ({work.value} budget spent); retry in {wait:.2f} s", retry_after_s=wait
        )
