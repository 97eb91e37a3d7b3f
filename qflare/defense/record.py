"""Per-round record of what the defence did, and how well it matched the (known) attackers.

A simulation knows who attacks, so it can score the coordinator's decisions: an update that was
refused or left out of the combination (the round's ledger ``left_out``, reason other than
``no_update``) is *flagged*; a flagged attacker is a true positive, a flagged honest device a false
positive, an attacker whose update was combined a false negative.  Rules that combine every update
(mean, median, trimmed mean, norm bounding) flag nothing: their precision is undefined (None) and their
recall 0.  With threat detection (``--aggregator reputation``) each round also names the devices its
verdict quarantined, and the totals the round each device was quarantined in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DefenceLog", "RoundDefence"]


@dataclass(frozen=True)
class RoundDefence:
    round: int
    attackers: list[int]
    """The round's selected devices that attack."""
    left_out: dict[str, str]
    """Device index -> why its update was refused or not combined (an error code or ``not_combined``)."""
    true_positives: int
    false_positives: int
    false_negatives: int
    quarantined: list[int] = field(default_factory=list)
    """Devices this round's detection verdict quarantined (threat detection only)."""


@dataclass
class DefenceLog:
    """The rounds' :class:`RoundDefence` records and their totals."""

    attackers: frozenset[int] = frozenset()
    rounds: list[RoundDefence] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Run-level figures (e.g. ``backdoor_success``)."""

    def record(
        self, number: int, selected: Iterable[int], left_out: Mapping[int, str], quarantined: Iterable[int] = ()
    ) -> RoundDefence:
        chosen = set(selected)
        bad = sorted(chosen & self.attackers)
        flagged = set(left_out)
        rec = RoundDefence(
            round=number,
            attackers=bad,
            left_out={str(i): left_out[i] for i in sorted(left_out)},
            true_positives=len(flagged & set(bad)),
            false_positives=len(flagged - set(bad)),
            false_negatives=len(set(bad) - flagged),
            quarantined=sorted(set(quarantined)),
        )
        self.rounds.append(rec)
        return rec

    def summary(self) -> dict[str, Any]:
        tp = sum(r.true_positives for r in self.rounds)
        fp = sum(r.false_positives for r in self.rounds)
        fn = sum(r.false_negatives for r in self.rounds)
        quarantined = {str(d): r.round for r in self.rounds for d in r.quarantined}
        return {
            "true_positives": tp,
            "false_positives": fp,
            "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "quarantined": quarantined,
            "quarantined_attackers": sum(int(d) in self.attackers for d in quarantined),
            "quarantined_honest": sum(int(d) not in self.attackers for d in quarantined),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "attackers": sorted(self.attackers),
            "rounds": [asdict(r) for r in self.rounds],
            "detection": self.summary(),
            **self.extra,
        }
