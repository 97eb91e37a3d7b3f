"""`qflare bench crypto`: the protocol's cryptography against one device's local training.

Crypto figures come from :func:`qflare.bench.crypto_ops.bench_crypto` (handshake; seal+sign and open+verify
of one 6,653,480-byte update — the FedAvg CNN's 1,663,370 float32 values — for the default and the high
suite).  The reference is one device's epoch of local training on `fmnist-dir05` (the same partition,
model and optimiser as the workload; one torch thread, as each simulation worker uses), measured in the
same run on the devices the workload samples in its first round.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from ..crypto import DEFAULT_SUITE, HIGH_SUITE
from ..data import load_dataset, partition
from ..models import create_model
from ..training import LocalTrainer, TrainConfig
from ..wire import ParamLayout
from .crypto_ops import bench_crypto

__all__ = ["local_training_ms", "run_crypto_bench"]


def local_training_ms(devices: int = 10, data_root: str | None = None) -> dict[str, float]:
    """Median/min/max milliseconds of one local epoch for the first round's sampled devices."""
    train = load_dataset("fashion-mnist", "train", root=data_root)
    parts = partition("dirichlet", train.labels.numpy(), 100, seed=0, alpha=0.5)
    chosen = np.random.default_rng(1).choice(100, devices, replace=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("fedavg-cnn", train.input_shape, train.num_classes)
        layout = ParamLayout.from_module(model)
        trainer = LocalTrainer(model, TrainConfig(), layout)
        flat = layout.module_to_flat(model)
        idx0 = torch.from_numpy(parts[chosen[0]])
        trainer.train(flat, train.normalized(idx0), train.labels[idx0], seed=0)  # warm-up
        times, sizes = [], []
        for i in chosen:
            idx = torch.from_numpy(parts[i])
            t0 = time.perf_counter()
            trainer.train(flat, train.normalized(idx), train.labels[idx], seed=int(i))
            times.append((time.perf_counter() - t0) * 1e3)
            sizes.append(len(idx))
    finally:
        torch.set_num_threads(threads)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "median_examples": float(statistics.median(sizes)),
    }


def run_crypto_bench(repeats: int = 30, data_root: str | None = None) -> dict[str, Any]:
    default = bench_crypto(DEFAULT_SUITE, repeats=repeats)
    high = bench_crypto(HIGH_SUITE, repeats=repeats)
    train = local_training_ms(data_root=data_root)
    out: dict[str, Any] = {
        "suite": default["suite"],
        "high_suite": high["suite"],
        "payload_bytes": default["payload_bytes"],
    }
    for prefix, res in (("", default), ("high_", high)):
        for key, name in (("handshake_ms", "handshake"), ("seal_sign_ms", "seal"), ("open_verify_ms", "open")):
            out[f"{prefix}{name}_ms_median"] = round(res[key]["median"], 3)
            out[f"{prefix}{name}_ms_p99"] = round(res[key]["p99"], 3)
    out["local_train_ms_median"] = round(train["median"], 1)
    out["local_train_examples_median"] = train["median_examples"]
    per_update = out["seal_ms_median"] + out["open_ms_median"]
    out["crypto_per_update_ms"] = round(per_update, 3)
    out["crypto_fraction_of_training"] = round(per_update / train["median"], 4)
    out["bytes"] = default["bytes"]
    return out
