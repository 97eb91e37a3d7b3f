"""Per-device label statistics: counts, rich table, heatmap PNG, summary."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from qflare.data import label_counts, label_table, save_heatmap, shards, summary
from qflare.errors import DataError

LABELS = np.array([0, 0, 1, 2, 2, 2, 1, 0])
PARTS = [np.array([0, 1, 2]), np.array([3, 4, 5, 6]), np.array([7])]


def render(table: object) -> str:
    console = Console(record=True, width=200, color_system=None, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_label_counts_matches_hand_count() -> None:
    counts = label_counts(PARTS, LABELS, 4)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[2, 1, 0, 0], [0, 1, 3, 0], [1, 0, 0, 0]]


def test_label_counts_rows_sum_to_partition_sizes() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 500)
    parts = shards(labels, 7, 3, seed=1)
    counts = label_counts(parts, labels, 10)
    assert counts.sum(axis=1).tolist() == [len(p) for p in parts]
    assert np.array_equal(counts.sum(axis=0), np.bincount(labels, minlength=10))


def test_label_counts_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="outside"):
        label_counts(PARTS, LABELS, 2)
    with pytest.raises(DataError, match="index outside"):
        label_counts([np.array([8])], LABELS, 4)
    with pytest.raises(DataError):
        label_counts(PARTS, LABELS.astype(float), 4)


def test_label_table_columns_rows_and_truncation() -> None:
    counts = label_counts(PARTS, LABELS, 4)
    table = label_table(counts)
    assert [c.header for c in table.columns] == ["device", "total", "0", "1", "2", "3"]
    assert table.row_count == 3
    assert table.title == "Labels per device (3 devices, 8 examples)"
    text = render(table)
    lines = [[t for t in line.split() if t not in {"│", "┃"}] for line in text.splitlines()]
    assert any(row[:6] == ["1", "4", "0", "1", "3", "0"] for row in lines if len(row) >= 6)

    short = label_table(counts, max_rows=2, class_names=["a", "b", "c", "d"])
    assert short.row_count == 3 and short.caption == "showing 2 of 3 devices"
    assert [c.header for c in short.columns][2:] == ["a", "b", "c", "d"]
    with pytest.raises(DataError):
        label_table(counts, class_names=["a"])


def test_save_heatmap_writes_png(tmp_path: Path) -> None:
    counts = label_counts(shards(np.repeat(np.arange(10), 30), 20, 2, seed=0), np.repeat(np.arange(10), 30), 10)
    out = save_heatmap(counts, tmp_path / "nested" / "heat.png")
    data = out.read_bytes()
    assert out == tmp_path / "nested" / "heat.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 300


def test_summary_values() -> None:
    s = summary(label_counts(PARTS, LABELS, 4))
    assert s == {
        "devices": 3,
        "classes": 4,
        "examples": 8,
        "min_per_device": 1,
        "median_per_device": 3.0,
        "max_per_device": 4,
        "mean_classes_per_device": pytest.approx(5 / 3),
        "max_class_share": 1.0,
    }
    assert all(type(v) in (int, float) for v in s.values())


@pytest.mark.parametrize("bad", [np.zeros(3, dtype=int), -np.ones((2, 2), dtype=int), np.ones((2, 2)) * 0.5])
def test_stats_reject_malformed_counts(bad: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(DataError):
        summary(bad)
    with pytest.raises(DataError):
        label_table(bad)
    with pytest.raises(DataError):
        save_heatmap(bad, tmp_path / "x.png")
