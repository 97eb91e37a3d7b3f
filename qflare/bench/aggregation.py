"""Throughput of streaming FedAvg aggregation against this machine's memory-copy bandwidth.

Run as ``python -m qflare.bench.aggregation [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qflare.strategy.combine import WeightedMean

__all__ = ["copy_bandwidth", "fedavg_bandwidth"]


def fedavg_bandwidth(n_updates: int = 100, dim: int = 1_663_370, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Aggregate ``n_updates`` distinct pre-generated deltas with :class:`WeightedMean`.

    GB/s counts the bytes of updates read (``n_updates * dim * 4``) per second; median of ``repeats``.
    """
    if n_updates < 1 or dim < 1 or repeats < 1:
        raise ValueError("n_updates, dim and repeats must be positive")
    generator = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n_updates, dim, generator=generator)  # distinct rows: no cache reuse across updates
    weights = torch.randint(1, 1000, (n_updates,), generator=generator).tolist()
    combine = WeightedMean()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        acc = combine.start(dim)
        for row, weight in zip(deltas, weights, strict=False):
            acc.add(row, weight)
        acc.result()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    nbytes = n_updates * dim * 4
    return {
        "n_updates": float(n_updates),
        "dim": float(dim),
        "seconds": seconds,
        "bytes": float(nbytes),
        "gb_per_s": nbytes / seconds / 1e9,
        "threads": float(torch.get_num_threads()),
    }


def copy_bandwidth(nbytes: int = 256 * 1024 * 1024, repeats: int = 5) -> dict[str, float]:
    """``dst.copy_(src)`` on a float32 tensor of ``nbytes``; GB/s counts bytes copied; median of ``repeats``."""
    if nbytes < 4 or repeats < 1:
        raise ValueError("nbytes must be >= 4 and repeats positive")
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    dst.copy_(src)  # touch both so page faults are not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    copied = (nbytes // 4) * 4
    return {
        "bytes": float(copied),
        "seconds": seconds,
        "gb_per_s": copied / seconds / 1e9,
        "threads": float(torch.get_num_threads()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_663_370)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    fedavg = fedavg_bandwidth(args.updates, args.dim, args.repeats)
    copy = copy_bandwidth(repeats=args.repeats)
    print(json.dumps({"fedavg": fedavg, "copy": copy, "ratio": fedavg["gb_per_s"] / copy["gb_per_s"]}, indent=2))


if __name__ == "__main__":
    main()
