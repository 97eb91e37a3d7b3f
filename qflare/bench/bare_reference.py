"""Bare-PyTorch reference for the `fmnist-dir05` workload: what a researcher would write.

One file, no framework: one process, torch's default threads, the sampled clients trained one after
another, FedAvg weighted by example counts, the global model evaluated on the full test set after every
round.  It follows the exact same seeds as `qflare simulate` (partition, client sampling, per-client
shuffles, model initialisation), so the two runs should reach near-identical accuracy curves.

    python qflare/bench/bare_reference.py --rounds 30 [--data DIR] [--json]

Prints one line per round and, with --json, a final JSON object on the last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

T0 = time.perf_counter()

import numpy as np
import torch
from torch import nn

MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


def dirichlet_partition(labels: np.ndarray, n: int, alpha: float, seed: int, min_size: int = 10) -> list:
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(x) for x in parts) >= min_size:
            return [np.sort(np.asarray(x, dtype=np.int64)) for x in parts]


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def client_seed(seed: int, rnd: int, device: int) -> int:
    return ((seed * 1_000_003 + rnd) * 1_000_003 + device) % (2**63)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d = Path(args.data)
    x_train = torch.from_numpy(read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    y_train = torch.from_numpy(read_idx(d / "train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    x_test = torch.from_numpy(read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    y_test = torch.from_numpy(read_idx(d / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    x_train = (x_train.float() / 255 - MEAN) / STD
    x_test = (x_test.float() / 255 - MEAN) / STD
    parts = dirichlet_partition(y_train.numpy(), 100, 0.5, args.seed)
    torch.manual_seed(args.seed)
    model = CNN()
    local = CNN()
    select_rng = np.random.default_rng(args.seed + 1)
    startup = time.perf_counter() - T0
    history = []
    for rnd in range(1, args.rounds + 1):
        t = time.perf_counter()
        chosen = select_rng.choice(100, 10, replace=False)
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        acc_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
        total = 0
        for dev in chosen:
            idx = torch.from_numpy(parts[dev])
            x, y = x_train[idx], y_train[idx]
            local.load_state_dict(global_state)
            local.train()
            opt = torch.optim.SGD(local.parameters(), lr=0.05)
            gen = torch.Generator().manual_seed(client_seed(args.seed, rnd, int(dev)))
            order = torch.randperm(len(idx), generator=gen)
            for s in range(0, len(idx), 32):
                b = order[s : s + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(local(x[b]), y[b]).backward()  # type: ignore[no-untyped-call]
                opt.step()
            for k, v in local.state_dict().items():
                acc_state[k] += v * len(idx)
            total += len(idx)
        model.load_state_dict({k: v / total for k, v in acc_state.items()})
        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for s in range(0, len(y_test), 1000):
                out = model(x_test[s : s + 1000])
                loss += float(nn.functional.cross_entropy(out, y_test[s : s + 1000], reduction="sum"))
                correct += int((out.argmax(1) == y_test[s : s + 1000]).sum())
        acc = correct / len(y_test)
        sec = time.perf_counter() - t
        history.append({"round": rnd, "accuracy": acc, "loss": loss / len(y_test), "seconds": sec})
        print(f"round {rnd:3d}  accuracy {acc:.4f}  loss {loss / len(y_test):.4f}  {sec:.2f}s", flush=True)
    wall = time.perf_counter() - T0
    if args.json:
        print(
            json.dumps(
                {"wall_s": wall, "startup_s": startup, "rounds": history, "torch_threads": torch.get_num_threads()}
            )
        )


if __name__ == "__main__":
    main()
