"""A run's per-round history on disk: ``history.json``, ``history.csv`` and ``history.png``.

Written by ``qflare simulate --out`` after every evaluated round and by ``qflare demo --out`` as rounds
are reported (the plot at the end, or when the run is stopped), each file replaced atomically (:func:`qflare.files.write_atomic`), so an interrupted run
leaves the rounds finished so far, never a torn file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import write_atomic

__all__ = ["HISTORY_FILES", "plot_history", "write_history"]

HISTORY_FILES = ("history.json", "history.csv", "history.png")


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names or ["round"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(dict(row))
    return buf.getvalue()


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def plot_history(rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """A PNG: test accuracy (left axis), test loss and mean device training loss (right axis) per round.

    Rounds are integer ticks; a series whose values are absent (e.g. no training loss reported) is left
    out rather than drawn as zeros.  A bare Agg ``Figure``: no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax2 = ax.twinx()
    lines = []
    xs, ys = _series(rows, "accuracy")
    lines += ax.plot(xs, ys, "o-", color="tab:blue", label="test accuracy")
    for key, style, colour, label in (
        ("loss", "s--", "tab:red", "test loss"),
        ("train_loss", "^:", "tab:orange", "train loss (mean over devices)"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            lines += ax2.plot(xs, ys, style, color=colour, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax2.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_history(
    out: Path, document: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], title: str, *, plot: bool = True
) -> list[Path]:
    """``out/history.json`` (``document``, which holds the rows), ``history.csv`` (the rows) and, with
    ``plot``, ``history.png`` (:func:`plot_history`), each replaced atomically; returns their paths.

    Rendering the plot costs about a second on a busy 2-core machine (measured), so runs write it at
    their end (or when stopped), and the JSON and CSV after every round."""
    paths = [out / name for name in HISTORY_FILES[: 3 if plot else 2]]
    write_atomic(paths[0], json.dumps(document, indent=2))
    write_atomic(paths[1], _csv(rows))
    if plot:
        write_atomic(paths[2], plot_history(rows, title))
    return paths
