"""``qflare bench defenses``: final accuracy of each attack × defence on fmnist-dir05.

Every cell is a full simulation (:func:`~qflare.simulation.run_simulation`, the real protocol) of the
fmnist-dir05 workload with ``malicious`` of the devices attacking, and one run per defence without
attackers (its clean accuracy: what the defence costs when nobody attacks).  Detection precision and
recall come from the rounds' ledger ``left_out`` scored against the known attackers; the backdoor's
success rate is measured on the final model (:func:`~qflare.defense.backdoor_success`).

Each defence tolerates f = ⌈0.2 × 10⌉ = 2 Byzantine updates per round of 10 unless its requirement
forbids it at that round size (Bulyan: n >= 4f + 3, so f = 1 at n = 10); the f used is in the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..defense import ATTACKS, AttackConfig
from ..errors import ConfigError, ErrorCode
from ..federation import FederationSpec
from .fmnist import FMNIST_DIR05

__all__ = ["DEFAULT_DEFENCES", "defences_table_png", "run_defences"]

DEFAULT_DEFENCES: tuple[str, ...] = (
    "none",
    "median",
    "trimmed-mean",
    "multi-krum",
    "bulyan",
    "fltrust",
    "norm-bound",
    "reputation",
)


def _spec_for(base: FederationSpec, aggregator: str) -> FederationSpec:
    """``base`` with ``aggregator`` at the largest f <= the default that its requirement allows."""
    f = base.replace(aggregator=aggregator).f
    while True:
        spec = base.replace(aggregator=aggregator, byzantine=f)
        try:
            spec.build_strategy()
            return spec
        except ConfigError as exc:
            if exc.code != ErrorCode.TOO_FEW_UPDATES or f == 0:
                raise
            f -= 1


def run_defences(
    rounds: int = 30,
    *,
    attacks: Sequence[str] = ATTACKS,
    aggregators: Sequence[str] = DEFAULT_DEFENCES,
    malicious: float = 0.2,
    workers: int = 0,
    data_root: str | None = None,
    base: FederationSpec | None = None,
    on_cell: Callable[[str, str, float], None] | None = None,
) -> dict[str, Any]:
    """The table as one JSON-able object (see the module docstring); ``base`` replaces fmnist-dir05
    (tests use a small workload)."""
    from ..simulation import SimulationConfig, run_simulation

    for a in attacks:
        AttackConfig(a, malicious=malicious)  # refuse unknown attacks before the first run
    spec0 = (base or FMNIST_DIR05).replace(rounds=rounds, data_root=data_root or (base.data_root if base else None))
    specs = {agg: _spec_for(spec0, agg) for agg in aggregators}
    t0 = time.perf_counter()
    clean: dict[str, float] = {}
    clean_flags: dict[str, dict[str, int]] = {}
    accuracy: dict[str, dict[str, float]] = {a: {} for a in attacks}
    detection: dict[str, dict[str, dict[str, float | None]]] = {a: {} for a in attacks}
    backdoor: dict[str, float] = {}
    for agg, spec in specs.items():
        for attack in (None, *attacks):
            threat = None if attack is None else AttackConfig(attack, malicious=malicious, seed=spec.seed)
            result = run_simulation(SimulationConfig(spec, workers=workers, attack=threat))
            acc = result.rounds[-1].accuracy
            if on_cell is not None:
                on_cell(attack or "clean", agg, acc)
            if attack is None:
                clean[agg] = acc
                assert result.defence is not None  # every flag of a clean run is a false positive
                fp = result.defence.summary()
                clean_flags[agg] = {"false_positives": fp["false_positives"], "quarantined": fp["quarantined_honest"]}
                continue
            accuracy[attack][agg] = acc
            assert result.defence is not None
            summary = result.defence.summary()
            detection[attack][agg] = {
                "precision": summary["precision"],
                "recall": summary["recall"],
                "quarantined_attackers": summary["quarantined_attackers"],
                "quarantined_honest": summary["quarantined_honest"],
            }
            if "backdoor_success" in result.defence.extra:
                backdoor[agg] = result.defence.extra["backdoor_success"]
    reference = clean.get("none", max(clean.values()))
    best = {}
    for attack, row in accuracy.items():
        name = max(row, key=lambda k: row[k])
        best[attack] = {"aggregator": name, "accuracy": row[name], "points_below_clean": 100 * (reference - row[name])}
    return {
        "workload": "fmnist-dir05" if base is None else "custom",
        "rounds": rounds,
        "malicious": malicious,
        "attacks": list(attacks),
        "aggregators": list(aggregators),
        "byzantine": {agg: (None if agg == "none" else spec.f) for agg, spec in specs.items()},
        "clean_reference": {"aggregator": "none" if "none" in clean else "best", "accuracy": reference},
        "clean_accuracy": clean,
        "clean_flags": clean_flags,
        "accuracy": accuracy,
        "detection": detection,
        "backdoor_success": backdoor,
        "best": best,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def defences_table_png(result: dict[str, Any]) -> bytes:
    """The accuracy table (rows: no attack + each attack; columns: defences) as a PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    aggs = result["aggregators"]
    rows = [("no attack", [result["clean_accuracy"].get(a) for a in aggs])]
    rows += [(attack, [result["accuracy"][attack].get(a) for a in aggs]) for attack in result["attacks"]]
    if result["backdoor_success"]:
        rows.append(("backdoor success", [result["backdoor_success"].get(a) for a in aggs]))
    cells = [[("" if v is None else f"{100 * v:.1f}") for v in values] for _, values in rows]
    fig = Figure(figsize=(1.6 + 1.25 * len(aggs), 0.9 + 0.35 * len(rows)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(
        f"{result['workload']}, {result['rounds']} rounds, {100 * result['malicious']:.0f}% attackers: final accuracy %"
        + (" (last row: backdoor success %)" if result["backdoor_success"] else ""),
        fontsize=9,
    )
    table = ax.table(cellText=cells, rowLabels=[r[0] for r in rows], colLabels=aggs, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def write_png(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(defences_table_png(result))
    return path
