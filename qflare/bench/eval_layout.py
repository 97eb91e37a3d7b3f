"""Evaluation speed of the FedAvg CNN on 10k images by batch size and memory layout (NCHW vs NHWC).

    python qflare/bench/eval_layout.py [threads]

Prints seconds per 10k-image pass for each (layout, batch size); the fast path QFLARE uses
(channels-last, batch 128) came from this.
"""

from __future__ import annotations

import sys
import time

import torch

from qflare.models import FedAvgCNN


def run(model: torch.nn.Module, x: torch.Tensor, bs: int) -> None:
    with torch.inference_mode():
        for s in range(0, len(x), bs):
            model(x[s : s + bs])


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    model = FedAvgCNN().eval()
    x = torch.randn(10000, 1, 28, 28)
    for name, m, xx in (
        ("nchw", model, x),
        (
            "nhwc",
            FedAvgCNN().eval().to(memory_format=torch.channels_last),  # type: ignore[call-overload]  # real API; missing from the stubs
            x.contiguous(memory_format=torch.channels_last),
        ),
    ):
        for bs in (32, 64, 128, 250, 500, 1000):
            run(m, xx, bs)  # warm-up
            t = time.perf_counter()
            run(m, xx, bs)
            print(
                f"{name} batch {bs:5d}: {time.perf_counter() - t:.3f} s / 10k images ({torch.get_num_threads()} threads)"
            )


if __name__ == "__main__":
    main()
