"""Attack simulation for evaluating defences: poisoning attackers that run the real protocol.

The defences themselves are aggregation rules in :mod:`qflare.strategy` (selected with ``--aggregator``,
:mod:`qflare.strategy.aggregators`); this package holds what attacks them.
"""

from __future__ import annotations

from .data_poison import add_trigger, backdoor_success, flip_labels, poison_backdoor
from .minmax import min_max_update
from .threat import ATTACKS, AttackConfig

__all__ = [
    "ATTACKS",
    "AttackConfig",
    "add_trigger",
    "backdoor_success",
    "flip_labels",
    "min_max_update",
    "poison_backdoor",
]
