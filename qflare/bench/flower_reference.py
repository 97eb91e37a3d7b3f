"""Flower (1.42, simulation engine on Ray) reference for the `fmnist-dir05` workload.

Runs in its own environment, never QFLARE's (``pip install 'flwr[simulation]==1.42.*' torch``): it imports
Flower, torch, numpy and the data, partition and model code of ``bare_reference.py`` next to it, nothing of
QFLARE.  The workload is the same as the bare loop's: 100 Dirichlet(0.5) clients, 10 a round, one epoch of
SGD (lr 0.05, batch 32), FedAvg weighted by examples, the global model evaluated centrally on the full test
set after every round; two Ray CPUs, one per client (Flower's default resources), no dashboard.  Flower
samples the round's clients with its own unseeded generator, so its accuracy curve is close to, not equal
to, QFLARE's.  What it has not: authentication, encryption, signatures, a database.

    python qflare/bench/flower_reference.py --rounds 30 [--data DIR] [--cpus 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bare_reference as bare

_DATA: dict[str, Any] = {}
_ARGS: dict[str, Any] = {"data": "/usr/share/datasets/fashion-mnist", "seed": 0}


def _data() -> dict[str, Any]:
    """The training set (uint8) and the partition: loaded once per process (each Ray actor)."""
    if not _DATA:
        d = Path(str(_ARGS["data"]))
        x = torch.from_numpy(bare.read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
        y = torch.from_numpy(bare.read_idx(d / "train-labels-idx1-ubyte.gz", 8).astype(np.int64))
        _DATA["x"] = x  # uint8: each client normalises its own examples (as QFLARE does), not the whole set
        _DATA["y"] = y
        _DATA["parts"] = bare.dirichlet_partition(y.numpy(), 100, 0.5, int(_ARGS["seed"]))
    return _DATA


def _set(model: nn.Module, arrays: list[np.ndarray]) -> None:
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})


def _get(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


class Client(NumPyClient):  # type: ignore[misc]
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        torch.set_num_threads(1)
        data = _data()
        idx = torch.from_numpy(data["parts"][self.pid])
        x, y = (data["x"][idx].float() / 255 - bare.MEAN) / bare.STD, data["y"][idx]
        model = bare.CNN()
        _set(model, parameters)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(bare.client_seed(int(_ARGS["seed"]), int(config["round"]), self.pid))
        order = torch.randperm(len(idx), generator=gen)
        for s in range(0, len(idx), 32):
            b = order[s : s + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()  # type: ignore[no-untyped-call]
            opt.step()
        return _get(model), len(idx), {}


def client_fn(context: Context):  # type: ignore[no-untyped-def]
    return Client(int(context.node_config["partition-id"])).to_client()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    _ARGS.update(data=args.data, seed=args.seed)
    d = Path(args.data)
    x_test = torch.from_numpy(bare.read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    y_test = torch.from_numpy(bare.read_idx(d / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    x_test = (x_test.float() / 255 - bare.MEAN) / bare.STD
    torch.manual_seed(args.seed)
    initial = _get(bare.CNN())
    history: list[dict[str, float]] = []
    marks = [time.perf_counter()]

    def evaluate(rnd: int, arrays, config):  # type: ignore[no-untyped-def]
        if rnd == 0:
            marks[0] = time.perf_counter()
            return None
        model = bare.CNN()
        _set(model, arrays)
        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for s in range(0, len(y_test), 1000):
                out = model(x_test[s : s + 1000])
                loss += float(nn.functional.cross_entropy(out, y_test[s : s + 1000], reduction="sum"))
                correct += int((out.argmax(1) == y_test[s : s + 1000]).sum())
        now = time.perf_counter()
        acc = correct / len(y_test)
        history.append({"round": rnd, "accuracy": acc, "loss": loss / len(y_test), "seconds": now - marks[-1]})
        marks.append(now)
        print(f"round {rnd:3d}  accuracy {acc:.4f}  {now - marks[-2]:.2f}s", flush=True)
        return loss / len(y_test), {"accuracy": acc}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=0.1,
            fraction_evaluate=0.0,
            min_fit_clients=10,
            min_evaluate_clients=0,
            min_available_clients=100,
            initial_parameters=ndarrays_to_parameters(initial),
            evaluate_fn=evaluate,
            on_fit_config_fn=lambda rnd: {"round": rnd},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=100,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.cpus, "include_dashboard": False},
        },
    )
    wall = time.perf_counter() - T0
    if args.json:
        print(json.dumps({"wall_s": wall, "startup_s": marks[0] - T0, "rounds": history}))


if __name__ == "__main__":
    main()
