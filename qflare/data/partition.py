"""Split a labelled dataset across simulated devices.

Every partitioner is deterministic for a seed, returns ``n_devices`` sorted int64 index arrays, puts each
example on exactly one device, and never leaves a device empty (it resamples, or refuses with
:class:`~qflare.errors.DataError`).

References:
  * McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 -- IID split and the pathological non-IID "shards" split.
  * Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", arXiv:1909.06335, 2019 -- label skew via per-class Dirichlet(alpha).
  * Li, Diao, Chen & He, "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022 --
    the Dirichlet resample-until-min-size procedure and quantity skew.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from qflare.errors import DataError

__all__ = ["PARTITIONERS", "dirichlet", "iid", "partition", "quantity_skew", "shards"]

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity")

Labels = ArrayLike  # anything np.asarray turns into a 1-D integer array (lists, ndarrays, CPU tensors)


def _check(labels: Labels, n_devices: int, min_size: int = 1) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be integers, got {arr.dtype}")
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise DataError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices > len(arr):
        raise DataError(f"cannot split {len(arr)} examples across {n_devices} devices: some would be empty")
    if min_size < 1:
        raise DataError(f"min_size must be >= 1 (no device may be empty), got {min_size}")
    if min_size * n_devices > len(arr):
        raise DataError(
            f"min_size={min_size} x {n_devices} devices needs {min_size * n_devices} examples, only {len(arr)} exist"
        )
    return arr


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")


def _finish(parts: list[np.ndarray], min_size: int, scheme: str) -> list[np.ndarray]:
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    smallest = min(len(p) for p in out)
    if smallest < min_size:
        raise DataError(f"{scheme}: smallest device gets {smallest} examples < min_size={min_size}; use fewer devices")
    return out


def iid(labels: Labels, n_devices: int, seed: int, *, min_size: int = 1) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts (sizes differ by at most one)."""
    arr = _check(labels, n_devices, min_size)
    perm = np.random.default_rng(seed).permutation(len(arr))
    return _finish(np.array_split(perm, n_devices), min_size, "iid")


def dirichlet(
    labels: Labels, n_devices: int, alpha: float, seed: int, min_size: int = 10, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label skew: each class is split across devices in proportions drawn from Dirichlet(alpha).

    Whole draws are repeated until every device holds at least ``min_size`` examples.  The RNG call
    sequence (per class: shuffle, then one Dirichlet draw; cut points ``int(cumsum(p) * n_c)``) matches
    the reference implementation exactly, so the output is identical for any input and seed.
    """
    arr = _check(labels, n_devices, min_size)
    _check_alpha(alpha)
    if max_tries < 1:
        raise DataError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    class_idx = [np.flatnonzero(arr == c) for c in np.unique(arr)]
    concentration = np.full(n_devices, alpha)
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for members in class_idx:
            idx = members.copy()
            rng.shuffle(idx)
            p = rng.dirichlet(concentration)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                chunks[d].append(chunk)
        sizes = [sum(len(c) for c in device) for device in chunks]
        if min(sizes) >= min_size:
            return [np.sort(np.concatenate(device).astype(np.int64, copy=False)) for device in chunks]
    raise DataError(
        f"dirichlet: no draw in {max_tries} tries gave every device >= {min_size} examples "
        f"(alpha={alpha}, {n_devices} devices, {len(arr)} examples); min_size is unreachable "
        f"in practice: use a larger alpha, fewer devices or a smaller min_size"
    )


def shards(
    labels: Labels, n_devices: int, shards_per_device: int = 2, seed: int = 0, *, min_size: int = 1
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Examples are sorted by label (stable, so ties keep index order), cut into
    ``n_devices * shards_per_device`` contiguous shards whose sizes differ by at most one (the remainder
    goes one extra example to the first shards, so every example lands somewhere), and each device gets
    ``shards_per_device`` shards chosen by a random permutation.
    """
    if (
        isinstance(shards_per_device, bool)
        or not isinstance(shards_per_device, (int, np.integer))
        or shards_per_device < 1
    ):
        raise DataError(f"shards_per_device must be a positive integer, got {shards_per_device!r}")
    arr = _check(labels, n_devices, min_size)
    n_shards = n_devices * shards_per_device
    if n_shards > len(arr):
        raise DataError(
            f"{n_devices} devices x {shards_per_device} shards = {n_shards} shards, "
            f"but only {len(arr)} examples: shards would be empty"
        )
    order = np.argsort(arr, kind="stable")
    pieces = np.array_split(order, n_shards)
    assignment = np.random.default_rng(seed).permutation(n_shards).reshape(n_devices, shards_per_device)
    parts = [np.concatenate([pieces[s] for s in row]) for row in assignment]
    return _finish(parts, min_size, "shards")


def quantity_skew(
    labels: Labels, n_devices: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Quantity skew: device sizes ~ Dirichlet(alpha) over devices, contents IID.

    One random permutation of all examples is cut at ``int(cumsum(p) * N)``; ``p`` is redrawn until every
    device gets ``min_size`` examples, else :class:`DataError`.
    """
    arr = _check(labels, n_devices, min_size)
    _check_alpha(alpha)
    if max_tries < 1:
        raise DataError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(arr))
    concentration = np.full(n_devices, alpha)
    for _ in range(max_tries):
        p = rng.dirichlet(concentration)
        cuts = (np.cumsum(p) * len(arr)).astype(int)[:-1]
        if np.diff(np.concatenate(([0], cuts, [len(arr)]))).min() >= min_size:
            return _finish(np.split(perm, cuts), min_size, "quantity")
    raise DataError(
        f"quantity: no draw in {max_tries} tries gave every device >= {min_size} examples "
        f"(alpha={alpha}, {n_devices} devices); use a larger alpha or fewer devices"
    )


def partition(
    scheme: str,
    labels: Labels,
    n_devices: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_device: int = 2,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Dispatch by name to one of :data:`PARTITIONERS`.

    ``min_size=None`` means the partitioner's default (10 for ``dirichlet``, 1 otherwise); ``alpha`` is
    used by ``dirichlet`` and ``quantity``, ``shards_per_device`` by ``shards``.
    """
    key = scheme.lower().replace("_", "-")
    if key == "iid":
        return iid(labels, n_devices, seed, min_size=1 if min_size is None else min_size)
    if key == "dirichlet":
        return dirichlet(labels, n_devices, alpha, seed, min_size=10 if min_size is None else min_size)
    if key == "shards":
        return shards(labels, n_devices, shards_per_device, seed, min_size=1 if min_size is None else min_size)
    if key in ("quantity", "quantity-skew"):
        return quantity_skew(labels, n_devices, alpha, seed, min_size=1 if min_size is None else min_size)
    raise DataError(f"unknown partition scheme {scheme!r}; choose from {', '.join(PARTITIONERS)}")
