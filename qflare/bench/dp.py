"""``qflare bench dp``: test accuracy against the privacy budget ε of DP-FedAvg on fmnist-dir05.

For each ε the noise multiplier is calibrated so that the planned rounds spend exactly the budget
(``dp-fedavg`` with ``epsilon`` alone, δ fixed), the run is ``qflare simulate --federation`` as a child
process, and the final test accuracy is recorded with the ε the accountant reports as spent.  A
non-private FedAvg run of the same workload is the reference.  Each row has ``noise_to_signal``, the
expected norm of the noise on a round's mean in clip norms (z_Δ · √parameters / per_round): far above 1
the model is a random walk and local training eventually diverges on it.  A run that fails that way (a
device's loss or update becomes non-finite, which stops ``qflare simulate``) is recorded with its error,
the round it failed in and the accuracies of the rounds it finished, and marked on the plot.  Writes
``dp.json`` and ``dp.png``.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, QflareError
from ..federation import FederationSpec
from ..files import write_atomic
from .fmnist import FMNIST_DIR05, _last_json, _simulate
from .procs import run_measured

__all__ = ["plot_dp", "run_dp_bench", "write_dp_bench"]


def _row(label: str, res: dict[str, Any], wall_s: float) -> dict[str, Any]:
    hist = res["rounds"]
    last = hist[-1] if hist else {}
    return {
        "run": label,
        "rounds_run": len(hist),
        "final_accuracy": last.get("accuracy"),
        "best_accuracy": max((r["accuracy"] for r in hist), default=None),
        "epsilon_spent": last.get("epsilon"),
        "epsilon_unsampled": last.get("epsilon_unsampled"),
        "delta": last.get("delta"),
        "accuracy": [round(r["accuracy"], 4) for r in hist],
        "stop_reason": res.get("stop_reason"),
        "noise_to_signal": res.get("config", {}).get("dp_noise_to_signal"),
        "wall_s": round(wall_s, 1),
    }


def _simulate_private(spec: FederationSpec, workers: int) -> dict[str, Any]:
    """``qflare simulate --federation`` on ``spec`` as a measured subprocess: its row, also when it fails
    (then with the rounds it finished, read from the history it wrote after each round, and the error)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = spec.save(Path(tmp) / "federation.json")
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "qflare", "simulate", "--federation", str(path)]
        m = run_measured([*cmd, "--workers", str(workers), "--json", "--out", str(out)])
        try:
            return _row("", _last_json(m, "qflare simulate"), m.wall_s)
        except QflareError as exc:
            history = out / "history.json"
            done = json.loads(history.read_text()) if history.exists() else {"rounds": []}
            row = _row("", done, m.wall_s)
            row.update(final_accuracy=None, failed_in_round=len(done["rounds"]) + 1)
            text = str(exc)
            text = text[text.rfind("error [") :] if "error [" in text else text.strip().splitlines()[-1]
            row["error"] = " ".join(text.split())[:600]  # the CLI's error line, unwrapped
            return row


def run_dp_bench(
    epsilons: Sequence[float],
    *,
    rounds: int = 30,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    per_round: int = 10,
    workers: int = 0,
    data_root: str | None = None,
    baseline: bool = True,
) -> dict[str, Any]:
    """One calibrated DP-FedAvg run per ε (and a FedAvg baseline) on fmnist-dir05; the figures."""
    if not epsilons or any(not (math.isfinite(e) and e > 0) for e in epsilons):
        raise ConfigError(f"epsilons must be positive finite numbers, got {list(epsilons)}")
    base = FMNIST_DIR05.replace(rounds=rounds, per_round=per_round, data_root=data_root)
    runs: list[dict[str, Any]] = []
    if baseline:
        m, res = _simulate(base, workers, [])
        runs.append(_row("fedavg (no DP)", res, m.wall_s))
    for eps in sorted(epsilons):
        spec = base.replace(
            strategy="dp-fedavg", strategy_args={"epsilon": float(eps), "delta": delta, "clip_norm": clip_norm}
        )
        mechanism = spec.build_strategy().combine
        row = _simulate_private(spec, workers)
        row.update(
            run=f"dp-fedavg epsilon={eps:g}",
            epsilon_budget=float(eps),
            noise_multiplier=round(float(getattr(mechanism, "noise_multiplier", float("nan"))), 4),
        )
        runs.append(row)
    return {
        "workload": "fmnist-dir05",
        "devices": base.devices,
        "per_round": per_round,
        "sampling_rate": per_round / base.devices,
        "rounds": rounds,
        "delta": delta,
        "initial_clip_norm": clip_norm,
        "runs": runs,
    }


def plot_dp(result: dict[str, Any]) -> bytes:
    """A PNG: final test accuracy against the ε spent (log scale), the FedAvg baseline as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    private = [
        r
        for r in result["runs"]
        if r.get("epsilon_budget") is not None
        and r.get("epsilon_spent") is not None
        and r.get("final_accuracy") is not None
    ]
    xs = [r["epsilon_spent"] for r in private]
    ys = [r["final_accuracy"] for r in private]
    ax.plot(xs, ys, "o-", color="tab:blue", label="DP-FedAvg (adaptive clipping)")
    for r in private:
        ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon_spent"], r["final_accuracy"]), fontsize=7)
    for r in result["runs"]:
        if r.get("epsilon_budget") is None and r["final_accuracy"] is not None:
            ax.axhline(r["final_accuracy"], color="tab:gray", linestyle="--", label=r["run"])
    failed = [r for r in result["runs"] if r.get("error")]
    if failed:  # a failed run has no point: say so on the figure rather than leave it out silently
        text = "failed: " + "; ".join(f"{r['run']} ({r['error'][:60]})" for r in failed)
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=6, color="tab:red", wrap=True)
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon spent (delta={result['delta']:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title(
        f"{result['workload']}: {result['rounds']} rounds, {result['per_round']}/{result['devices']} devices a round",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_dp_bench(result: dict[str, Any], out: Path) -> list[Path]:
    """``dp.json`` and ``dp.png`` under ``out`` (each replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "dp.json", out / "dp.png"]
    write_atomic(paths[0], (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(paths[1], plot_dp(result))
    return paths
