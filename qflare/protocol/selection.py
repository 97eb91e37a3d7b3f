"""Client selection: which of the active devices take part in a round.

A :class:`ClientSelector` has one method, ``select(round_number, candidates, k, seed)``, called by the
round state machine each time it opens a round (Flower does the same in ``configure_train``).  It
returns ``k`` distinct device ids taken from ``candidates`` (the active devices in enrollment order
that the coordinator has seen alive recently, see :meth:`~qflare.protocol.Coordinator.live_devices`);
anything else is refused with :class:`~qflare.errors.RoundError` code ``bad_selection`` and the round
does not open.  Selectors are registered by name with :func:`register_selector` (``"random"`` is
built in) and named in :attr:`~qflare.protocol.RoundConfig.selector`, which also takes a selector or a
factory of one directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, RoundError
from ..registry import RegisteredNames, Registry

__all__ = [
    "SELECTORS",
    "ClientSelector",
    "RandomSelector",
    "SelectorFactory",
    "build_selector",
    "check_selection",
    "register_selector",
]


@runtime_checkable
class ClientSelector(Protocol):
    """Chooses the devices of one round."""

    def select(self, round_number: int, candidates: Sequence[str], k: int, seed: int) -> Sequence[str]:
        """``k`` distinct ids from ``candidates`` for round ``round_number`` (1-based); ``seed`` is the
        federation's seed (:attr:`RoundConfig.seed`), for selectors that draw at random."""
        ...


SelectorFactory = Callable[[], ClientSelector]
"""Builds a fresh selector (one per coordinator: a selector may keep state across rounds)."""


class RandomSelector:
    """Uniform sampling without replacement from one seeded stream (the default, ``"random"``).

    Round 1 starts the stream ``numpy.random.default_rng(seed + 1)`` and every later round draws
    ``choice(len(candidates), k, replace=False)`` from it in turn, so that a run's selections are fixed by
    its seed (the simulation's direct mode and the network benchmark replay this stream).  When the
    first round this selector sees is n > 1 (a restarted coordinator), or rounds are skipped, the
    stream restarts as ``default_rng([seed + 1, n - 1])``: still a function of the seed and round.
    """

    def __init__(self) -> None:
        self._stream: np.random.Generator | None = None
        self._next_round = 1

    def select(self, round_number: int, candidates: Sequence[str], k: int, seed: int) -> list[str]:
        if self._stream is None or round_number != self._next_round:
            entropy: int | list[int] = seed + 1 if round_number == 1 else [seed + 1, round_number - 1]
            self._stream = np.random.default_rng(entropy)
        self._next_round = round_number + 1
        return [candidates[int(i)] for i in self._stream.choice(len(candidates), k, replace=False)]


_REGISTRY: Registry[SelectorFactory] = Registry("selector")
SELECTORS: Sequence[str] = RegisteredNames(_REGISTRY)
"""Every registered selector name; follows later registrations (plugins)."""


def register_selector(name: str, factory: SelectorFactory, *, replace: bool = False) -> None:
    """Register ``factory() -> ClientSelector`` (a selector class is one) under ``name``.

    A name that is taken raises :class:`ConfigError` unless ``replace=True``.
    """
    if not callable(factory):
        raise ConfigError(f"selector {name!r}: the factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, factory, replace=replace)


def build_selector(selector: str | ClientSelector | SelectorFactory) -> ClientSelector:
    """A selector from a registered name, a factory (or class) of selectors, or a selector itself."""
    if isinstance(selector, str):
        factory, label = _REGISTRY.get(selector), selector
    elif isinstance(selector, ClientSelector) and not isinstance(selector, type):
        return selector
    elif callable(selector):
        factory, label = selector, getattr(selector, "__name__", repr(selector))
    else:
        raise ConfigError(f"a selector is a registered name, a selector or a factory, got {type(selector).__name__}")
    built = factory()
    if not isinstance(built, ClientSelector):
        raise ConfigError(f"selector {label!r}: the factory returned a {type(built).__name__}, which has no select()")
    return built


def check_selection(chosen: object, candidates: Sequence[str], k: int, round_number: int) -> tuple[str, ...]:
    """``chosen`` as a tuple if it is ``k`` distinct ids from ``candidates``; else RoundError ``bad_selection``."""

    def refuse(why: str) -> RoundError:
        return RoundError(f"client selection for round {round_number} refused: {why}", code="bad_selection")

    if isinstance(chosen, str | bytes) or not isinstance(chosen, Sequence):
        raise refuse(f"the selector returned a {type(chosen).__name__}, not a sequence of device ids")
    ids = tuple(chosen)
    pool = set(candidates)
    strangers = [d for d in ids if not isinstance(d, str) or d not in pool]
    if strangers:
        raise refuse(f"{len(strangers)} id(s) are not active devices, e.g. {strangers[0]!r}")
    if len(set(ids)) != len(ids):
        raise refuse("it named a device more than once")
    if len(ids) != k:
        raise refuse(f"it chose {len(ids)} device(s), the round needs {k}")
    return ids


register_selector("random", RandomSelector)
