"""``qflare bench network``: fmnist-dir05 over HTTP (server + devices) against the in-process simulation.

Both runs are child processes of this runner, one after the other, on the same seeds, so each one's
wall time and peak RSS cover its own process tree:

* in-process: ``qflare simulate`` (coordinator and 100 devices in one process);
* network: ``python -m qflare.bench.network`` - a driver that starts a coordinator server
  (:mod:`~qflare.bench.server_proc`, ``--no-eval``, same seed, model and strategy) as its own child and
  runs the same simulation driver with :class:`~qflare.bench.remote.RemoteFederation`: 100 real devices
  over HTTP, rounds opened and aggregated by the server.  The driver evaluates each global model
  locally, as the in-process run does.

A round's time in the network run adds the wait for the server to open it (its round loop ticks every
0.2 s) to the driver's own round time (train, submit, fetch the new model); the in-process run opens a
round in a function call.  Per-round overhead compares the means over rounds 2..R.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import MALLOC_ENV
from ..federation import FederationSpec
from ..simulation import SimulationConfig, run_simulation
from ..wire import ParamLayout
from .fmnist import FMNIST_DIR05, _last_json, _simulate, rounds_to
from .procs import Measured, run_measured
from .remote import RemoteFederation
from .server_proc import ServerSpec

__all__ = ["drive", "run_network_bench"]

TARGET_OVERHEAD_PCT = 5.0


def drive(cfg: SimulationConfig, *, max_uploads: int = 8) -> dict[str, Any]:
    """The network run, in this process: a server child plus ``run_simulation`` over HTTP."""
    feds: list[RemoteFederation] = []
    with ServerSpec(cfg.federation, max_uploads=max_uploads).process() as server:
        t0 = time.perf_counter()

        def factory(c: SimulationConfig, layout: ParamLayout, initial: torch.Tensor) -> RemoteFederation:
            server.wait_ready()  # the server started while this process loaded its data
            tokens = server.tokens(c.federation.devices, label="bench")
            feds.append(RemoteFederation(c, layout, initial, url=server.url, tokens=tokens, key_id=server.key_id()))
            return feds[-1]

        result = run_simulation(cfg, federation=factory)
        final = server.status()
        wall = time.perf_counter() - t0
        exit_code = server.stop()
    out = result.to_json()
    out["network"] = {
        **feds[0].stats.to_json(),
        "server_exit": exit_code,
        "server_state": final.get("state"),
        "server_model_version": final.get("model_version"),
        "driver_wall_s": wall,
    }
    return out


def _summary(m: Measured, res: dict[str, Any], open_wait: Sequence[float] | None = None) -> dict[str, Any]:
    hist = res["rounds"]
    per_round = [r["seconds"] + (open_wait[k] if open_wait else 0.0) for k, r in enumerate(hist)]
    later = per_round[1:] or per_round
    return {
        "wall_s": round(m.wall_s, 2),
        "startup_s": round(res["startup_s"], 2),
        "mean_round_s": round(sum(later) / len(later), 3),
        "final_accuracy": hist[-1]["accuracy"],
        "rounds_to_80": rounds_to(hist, 0.80),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "accuracy": [round(r["accuracy"], 4) for r in hist],
    }


def run_network_bench(
    rounds: int = 30,
    *,
    dataset: str = "fashion-mnist",
    model: str = "fedavg-cnn",
    devices: int = 100,
    per_round: int = 10,
    workers: int = 0,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Both runs (see the module docstring) and their comparison."""
    spec = FMNIST_DIR05.replace(
        dataset=dataset, model=model, devices=devices, per_round=per_round, rounds=rounds, data_root=data_root
    )
    env = dict(MALLOC_ENV)
    in_m, in_res = _simulate(spec, workers, [], env=env)
    with tempfile.TemporaryDirectory() as tmp:
        path = spec.save(Path(tmp) / "federation.json")
        cmd = [sys.executable, "-m", "qflare.bench.network", "--federation", str(path), "--workers", str(workers)]
        net_m = run_measured(cmd, env=env)
    net_res = _last_json(net_m, "network benchmark driver")
    extra = net_res["network"]
    ins, net = _summary(in_m, in_res), _summary(net_m, net_res, extra["open_wait_s"])
    waits = extra["open_wait_s"][1:] or extra["open_wait_s"]
    return {
        "workload": "fmnist-dir05" if (dataset, model) == ("fashion-mnist", "fedavg-cnn") else f"{dataset}/{model}",
        "rounds": rounds,
        "devices": devices,
        "per_round": per_round,
        "inprocess_wall_s": ins["wall_s"],
        "network_wall_s": net["wall_s"],
        "inprocess_startup_s": ins["startup_s"],
        "network_startup_s": net["startup_s"],
        "inprocess_mean_round_s": ins["mean_round_s"],
        "network_mean_round_s": net["mean_round_s"],
        "round_overhead_pct": round(100 * (net["mean_round_s"] / ins["mean_round_s"] - 1), 2),
        "target_round_overhead_pct": f"< {TARGET_OVERHEAD_PCT:g}",
        "network_mean_open_wait_s": round(sum(waits) / len(waits), 3),
        "inprocess_final_accuracy": ins["final_accuracy"],
        "network_final_accuracy": net["final_accuracy"],
        "same_accuracy_curve": ins["accuracy"] == net["accuracy"],
        "selection_mismatches": extra["selection_mismatches"],
        "inprocess_peak_rss_mb": ins["peak_rss_mb"],
        "network_peak_rss_mb": net["peak_rss_mb"],
        "network_enroll_s": round(extra["enroll_s"], 2),
        "server_final_state": extra["server_state"],
        "inprocess": ins,
        "network": net,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m qflare.bench.network", description="The network run of `qflare bench network`."
    )
    ap.add_argument("--federation", required=True, help="The federation spec file (JSON) both runs share.")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--max-uploads", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = SimulationConfig(FederationSpec.load(args.federation), workers=args.workers)
    print(json.dumps(drive(cfg, max_uploads=args.max_uploads)))


if __name__ == "__main__":
    main()
