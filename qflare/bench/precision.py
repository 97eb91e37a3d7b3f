"""One local training step and one evaluation pass of the FedAvg CNN, per precision, in this process.

    python qflare/bench/precision.py [threads]

Times :class:`~qflare.training.LocalTrainer` (the code a device runs: channels-last, SGD, batch 32) on
random 28x28 inputs after a warm-up call, and :func:`~qflare.training.evaluate` on the same 640 images, under
each precision; ``qflare bench fmnist-dir05 --precision bf16`` reports the same figures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from qflare.models import FedAvgCNN
from qflare.precision import resolve_precision
from qflare.training import LocalTrainer, TrainConfig, evaluate

__all__ = ["step_timings"]


def _one(precision: str, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = FedAvgCNN()
    trainer = LocalTrainer(model, TrainConfig(batch_size=32, lr=0.05, precision=precision))
    flat = trainer.layout.module_to_flat(trainer.model)
    trainer.train(flat, x, y, seed=0)  # warm-up: oneDNN primitives, allocator
    best = min(trainer.train(flat, x, y, seed=r).duration_s for r in range(repeats))
    steps = -(-len(y) // 32)
    evaluate(trainer.model, x, y, precision=trainer.precision)
    t = time.perf_counter()
    evaluate(trainer.model, x, y, precision=trainer.precision)
    eval_s = time.perf_counter() - t
    return {
        "precision": trainer.precision.describe(),
        "train_step_ms": round(1000 * best / steps, 2),
        "eval_ms_per_1k": round(1000 * eval_s / (len(y) / 1000), 1),
    }


def step_timings(
    precisions: Sequence[str] = ("fp32", "bf16"), *, examples: int = 640, repeats: int = 2
) -> dict[str, dict[str, Any]]:
    """Per precision: the best-of-``repeats`` mean time of a batch-32 training step over ``examples`` random
    images and the evaluation time per 1,000 images, on torch's current thread count."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (examples,), generator=gen)
    return {p: _one(p, x, y, repeats) for p in precisions}


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"native bf16 on this cpu: {resolve_precision('auto').native}; {torch.get_num_threads()} thread(s)")
    for name, row in step_timings().items():
        print(name, row)


if __name__ == "__main__":
    main()
