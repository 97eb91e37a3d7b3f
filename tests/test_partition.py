"""Partitioners: invariants (hypothesis), exact agreement with the Dirichlet reference, skew behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qflare.data import PARTITIONERS, dirichlet, iid, label_counts, partition, quantity_skew, shards, summary
from qflare.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_dirichlet(labels, n_devices, alpha, seed, min_size=10, max_tries=1000):  # type: ignore[no-untyped-def]
    """Literal copy of the benchmark reference (do not 'improve')."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts = [[] for _ in range(n_devices)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(x) for x in parts) >= min_size:
            return [np.sort(np.asarray(x, dtype=np.int64)) for x in parts]
    raise DataError("min_size unreachable")


def check_partition(parts: list[np.ndarray], n: int, n_devices: int, min_size: int = 1) -> None:
    assert len(parts) == n_devices
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "sorted, no duplicates within a device"
        assert len(p) >= min_size
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "every example exactly once"
    assert np.array_equal(np.sort(allidx), np.arange(n))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@st.composite
def problems(draw: st.DrawFn, max_n: int = 300) -> tuple[np.ndarray, int, int]:
    n_classes = draw(st.integers(1, 10))
    labels = np.asarray(draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=max_n)))
    n_devices = draw(st.integers(1, min(len(labels), 25)))
    seed = draw(st.integers(0, 2**32 - 1))
    return labels, n_devices, seed


# ------------------------------------------------------------------------------------- invariants
@FAST
@given(problems())
def test_iid_invariants(problem: tuple[np.ndarray, int, int]) -> None:
    labels, n_devices, seed = problem
    parts = iid(labels, n_devices, seed)
    check_partition(parts, len(labels), n_devices)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same(parts, iid(labels, n_devices, seed))


@FAST
@given(problems(), st.floats(0.05, 50.0), st.integers(1, 5))
def test_dirichlet_matches_reference_byte_for_byte(
    problem: tuple[np.ndarray, int, int], alpha: float, min_size: int
) -> None:
    labels, n_devices, seed = problem
    try:
        expected = reference_dirichlet(labels, n_devices, alpha, seed, min_size=min_size, max_tries=20)
    except DataError:
        with pytest.raises(DataError):
            dirichlet(labels, n_devices, alpha, seed, min_size=min_size, max_tries=20)
        return
    got = dirichlet(labels, n_devices, alpha, seed, min_size=min_size, max_tries=20)
    assert same(got, expected)
    check_partition(got, len(labels), n_devices, min_size)
    assert same(got, dirichlet(labels, n_devices, alpha, seed, min_size=min_size, max_tries=20))


@FAST
@given(problems(), st.floats(0.1, 50.0), st.integers(1, 3))
def test_quantity_skew_invariants(problem: tuple[np.ndarray, int, int], alpha: float, min_size: int) -> None:
    labels, n_devices, seed = problem
    assume(min_size * n_devices <= len(labels))
    try:
        parts = quantity_skew(labels, n_devices, alpha, seed, min_size=min_size, max_tries=50)
    except DataError as exc:
        assert "no draw" in str(exc)
        return
    check_partition(parts, len(labels), n_devices, min_size)
    assert same(parts, quantity_skew(labels, n_devices, alpha, seed, min_size=min_size, max_tries=50))


@FAST
@given(problems(), st.integers(1, 4))
def test_shards_invariants(problem: tuple[np.ndarray, int, int], spd: int) -> None:
    labels, n_devices, seed = problem
    assume(n_devices * spd <= len(labels))
    parts = shards(labels, n_devices, spd, seed)
    check_partition(parts, len(labels), n_devices)
    sizes = [len(p) for p in parts]
    lo = len(labels) // (n_devices * spd)
    assert min(sizes) >= spd * lo and max(sizes) <= spd * (lo + 1)
    assert same(parts, shards(labels, n_devices, spd, seed))


@FAST
@given(st.integers(2, 10), st.integers(5, 40), st.integers(1, 3), st.data())
def test_shards_bound_classes_per_device(n_classes: int, per_class: int, spd: int, data: st.DataObject) -> None:
    n = n_classes * per_class
    n_devices = data.draw(st.integers(1, n // spd))
    assume(math.ceil(n / (n_devices * spd)) <= per_class)  # a shard is no longer than a class block
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(n_classes), per_class))
    parts = shards(labels, n_devices, spd, seed=data.draw(st.integers(0, 1000)))
    check_partition(parts, n, n_devices)
    for p in parts:
        assert len(np.unique(labels[p])) <= 2 * spd  # each contiguous shard spans at most 2 classes


def test_shards_aligned_shards_are_pure() -> None:
    labels = np.repeat(np.arange(10), 10)[::-1].copy()  # 100 examples -> 20 shards of 5, each one class
    parts = shards(labels, 10, 2, seed=3)
    for p in parts:
        assert len(p) == 10 and len(np.unique(labels[p])) <= 2
    assert summary(label_counts(parts, labels, 10))["mean_classes_per_device"] <= 2.0


# ---------------------------------------------------------------------------------- seeds & skew
LABELS_1K = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_different_seeds_differ_same_seed_repeats(scheme: str) -> None:
    a = partition(scheme, LABELS_1K, 10, seed=0)
    b = partition(scheme, LABELS_1K, 10, seed=1)
    check_partition(a, 1000, 10)
    assert not same(a, b)
    assert same(a, partition(scheme, LABELS_1K, 10, seed=0))


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = np.repeat(np.arange(10), 500)
    skewed = summary(label_counts(dirichlet(labels, 10, 0.1, seed=0), labels, 10))
    uniform = label_counts(dirichlet(labels, 10, 100.0, seed=0), labels, 10)
    assert skewed["max_class_share"] > 0.5 and skewed["mean_classes_per_device"] < 9
    assert np.abs(uniform / uniform.sum(1, keepdims=True) - 0.1).max() < 0.05


def test_quantity_skew_alpha_controls_sizes_not_labels() -> None:
    labels = np.repeat(np.arange(10), 500)
    small = sorted(len(p) for p in quantity_skew(labels, 10, 0.1, seed=0))
    big = quantity_skew(labels, 10, 1000.0, seed=0)
    assert small[-1] > 10 * small[0]
    assert max(len(p) for p in big) - min(len(p) for p in big) < 60
    counts = label_counts(big, labels, 10)
    assert np.abs(counts / counts.sum(1, keepdims=True) - 0.1).max() < 0.06  # contents stay IID


def test_partition_accepts_torch_labels_and_aliases() -> None:
    t = torch.from_numpy(LABELS_1K)
    assert same(partition("iid", t, 7, seed=5), iid(LABELS_1K, 7, 5))
    assert same(partition("quantity_skew", LABELS_1K, 4, seed=2, alpha=2.0), quantity_skew(LABELS_1K, 4, 2.0, 2))
    assert same(
        partition("dirichlet", LABELS_1K, 5, seed=9, alpha=0.3), reference_dirichlet(LABELS_1K, 5, 0.3, 9, min_size=10)
    )


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: iid(LABELS_1K, 0, 0), "n_devices"),
        (lambda: iid(LABELS_1K, -3, 0), "n_devices"),
        (lambda: iid(np.arange(5), 6, 0), "empty"),
        (lambda: dirichlet(LABELS_1K, 5, 0.0, 0), "alpha"),
        (lambda: dirichlet(LABELS_1K, 5, -1.0, 0), "alpha"),
        (lambda: dirichlet(LABELS_1K, 5, float("nan"), 0), "alpha"),
        (lambda: dirichlet(LABELS_1K, 200, 0.5, 0, min_size=10), "min_size"),
        (lambda: dirichlet(LABELS_1K, 50, 0.01, 0, min_size=15, max_tries=5), "larger alpha"),
        (lambda: quantity_skew(LABELS_1K, 5, 0.0, 0), "alpha"),
        (lambda: quantity_skew(LABELS_1K, 100, 0.01, 0, min_size=5, max_tries=5), "no draw"),
        (lambda: shards(LABELS_1K, 10, 0, 0), "shards_per_device"),
        (lambda: shards(np.arange(10), 6, 2, 0), "shards would be empty"),
        (lambda: partition("banana", LABELS_1K, 3, seed=0), "unknown partition"),
        (lambda: iid(LABELS_1K.reshape(10, 100), 3, 0), "1-D"),
        (lambda: iid(np.linspace(0, 1, 10), 3, 0), "integers"),
        (lambda: iid(LABELS_1K, 10, 0, min_size=101), "min_size"),
    ],
)
def test_invalid_arguments_raise_data_error(call, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match=needle):
        call()


# ------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_fashion_mnist_dirichlet_100_devices() -> None:
    from qflare.data import read_idx

    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64)
    parts = dirichlet(labels, 100, alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    print(
        f"fashion-mnist dirichlet(0.5) x100: min={sizes.min()} median={np.median(sizes)} "
        f"max={sizes.max()} sizes={sizes.tolist()}"
    )
    assert sizes.min() >= 10 and sizes.sum() == 60000
    check_partition(parts, 60000, 100, 10)
    stats = summary(label_counts(parts, labels, 10))
    assert stats["mean_classes_per_device"] < 10  # label skew is real
