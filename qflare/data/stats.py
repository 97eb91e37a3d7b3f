"""What each device holds: a per-device label count matrix, a rich table, a heatmap PNG and a summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from rich.table import Table

from qflare.errors import DataError

__all__ = ["label_counts", "label_table", "save_heatmap", "summary"]


def _as_counts(counts: ArrayLike) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"counts must be a non-empty [n_devices, num_classes] matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise DataError("counts must be non-negative integers")
    return arr.astype(np.int64, copy=False)


def label_counts(parts: Sequence[ArrayLike], labels: ArrayLike, num_classes: int) -> np.ndarray:
    """``[n_devices, num_classes]`` int64 matrix: how many examples of each class each device holds."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
        raise DataError(f"labels must be a 1-D integer array, got {lab.dtype} {lab.shape}")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise DataError(f"labels outside 0..{num_classes - 1}")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for d, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(lab)):
            raise DataError(f"device {d}: index outside 0..{len(lab) - 1}")
        out[d] = np.bincount(lab[idx], minlength=num_classes)
    return out


def label_table(
    counts: ArrayLike,
    max_rows: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Table:
    """A rich table: one row per device (device, total, one column per class).

    With ``max_rows`` and more devices than that, the first ``max_rows`` devices are shown, then one
    ellipsis row, and the caption says how many were left out.
    """
    arr = _as_counts(counts)
    n_devices, n_classes = arr.shape
    if class_names is not None and len(class_names) != n_classes:
        raise DataError(f"{len(class_names)} class names for {n_classes} classes")
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be >= 1, got {max_rows}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    table = Table(title=title or f"Labels per device ({n_devices} devices, {int(arr.sum())} examples)")
    table.add_column("device", justify="right")
    table.add_column("total", justify="right", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    shown = n_devices if max_rows is None else min(max_rows, n_devices)
    for d in range(shown):
        table.add_row(str(d), str(int(arr[d].sum())), *(str(int(v)) for v in arr[d]))
    if shown < n_devices:
        table.add_row("…", "…", *("…" for _ in names))
        table.caption = f"showing {shown} of {n_devices} devices"
    return table


def save_heatmap(counts: ArrayLike, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG heatmap (rows: devices, columns: classes, colour: examples) and return its path.

    Uses a bare :class:`~matplotlib.figure.Figure` on the Agg canvas, so it never touches pyplot's global
    state or the process-wide backend.
    """
    arr = _as_counts(counts)
    n_devices, n_classes = arr.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = min(3.0 + 0.12 * n_devices, 24.0)
    width = min(4.0 + 0.5 * n_classes, 24.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("device")
    ax.set_xticks(range(n_classes))
    if n_devices <= 40:
        ax.set_yticks(range(n_devices))
    ax.set_title(title or f"Label distribution: {n_devices} devices, {int(arr.sum())} examples")
    fig.colorbar(image, ax=ax, label="examples")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def summary(counts: ArrayLike) -> dict[str, int | float]:
    """Plain-Python numbers: devices, classes, examples, min/median/max examples per device, the mean
    number of distinct classes per device, and the largest single-class share on any device."""
    arr = _as_counts(counts)
    sizes = arr.sum(axis=1)
    nonempty = sizes > 0
    shares = np.zeros(len(sizes))
    shares[nonempty] = arr[nonempty].max(axis=1) / sizes[nonempty]
    return {
        "devices": int(arr.shape[0]),
        "classes": int(arr.shape[1]),
        "examples": int(sizes.sum()),
        "min_per_device": int(sizes.min()),
        "median_per_device": float(np.median(sizes)),
        "max_per_device": int(sizes.max()),
        "mean_classes_per_device": float((arr > 0).sum(axis=1).mean()),
        "max_class_share": float(shares.max()),
    }
