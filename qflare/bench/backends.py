"""The simulation's backends side by side, and the Ray backend at scale.

:func:`run_backends`: fmnist-dir05 with ``qflare simulate --backend thread`` and then ``--backend ray``,
each as a measured child process (wall time, peak RSS summed over its process tree - for Ray that
includes its GCS, raylet and worker processes), with the load average around each run (the machine may
be shared) and whether the two runs published the same models round by round; optionally the Flower
reference (``flower_reference.py``, Flower 1.42's simulation engine on Ray, in its own environment),
measured the same way.

:func:`run_ray_scale`: many enrolled devices (each with its own ML-DSA identity and session in a Ray
actor), ``per_round`` of them a round, in this process: enrollment time, the device hosts' memory per
idle enrolled device (and the driver's: the coordinator's sessions, and its scratch database), and the
round times.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..federation import FederationSpec
from ..simulation import SimulationConfig, run_simulation
from ..wire import ParamLayout
from .fmnist import FMNIST_DIR05, _last_json, _simulate, _summary
from .procs import run_measured

__all__ = ["run_backends", "run_ray_scale"]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def flower_reference_path() -> Path:
    """The Flower reference runs as a script by path, in Flower's own environment (imports nothing of QFLARE)."""
    return Path(__file__).resolve().parent / "flower_reference.py"


def run_backends(
    rounds: int = 30,
    *,
    workers: int = 0,
    data_root: str | None = None,
    backends: tuple[str, ...] = ("thread", "ray"),
    flower_python: str | None = None,
) -> dict[str, Any]:
    """fmnist-dir05 on each backend, one after the other, on the same seed; with ``flower_python`` (a Python
    with ``flwr[simulation]==1.42.*`` and torch) also the Flower reference, with as many Ray CPUs."""
    spec = FMNIST_DIR05.replace(rounds=rounds, data_root=data_root)
    runs: dict[str, dict[str, Any]] = {}
    for name in backends:
        before = _load()
        m, res = _simulate(spec, workers, ["--backend", name])
        runs[name] = {
            **_summary(m, res),
            "load_avg_1m_before": before,
            "load_avg_1m_after": _load(),
            "model_sha256": [r["model_sha256"] for r in res["rounds"]],
        }
    if flower_python is not None:
        cmd = [flower_python, str(flower_reference_path()), "--rounds", str(rounds), "--json"]
        cmd += ["--cpus", str(workers or os.cpu_count() or 1)] + (["--data", data_root] if data_root else [])
        before = _load()
        m = run_measured(cmd)
        res = _last_json(m, "Flower reference")
        runs["flower"] = {**_summary(m, res), "load_avg_1m_before": before, "load_avg_1m_after": _load()}
    out: dict[str, Any] = {"workload": "fmnist-dir05", "rounds": rounds, "cpus": os.cpu_count()}
    for name, r in runs.items():
        out[f"{name}_wall_s"] = r["wall_s"]
        out[f"{name}_startup_s"] = r["startup_s"]
        out[f"{name}_mean_round_s"] = r["mean_round_s"]
        out[f"{name}_peak_rss_mb"] = r["peak_rss_mb"]
        out[f"{name}_final_accuracy"] = r["final_accuracy"]
    hashes = [r["model_sha256"] for r in runs.values() if "model_sha256" in r]
    if len(hashes) > 1:
        out["bit_identical"] = all(h == hashes[0] for h in hashes)
    out["runs"] = runs
    return out


def run_ray_scale(
    devices: int = 1000,
    *,
    per_round: int = 100,
    rounds: int = 2,
    hosts: int = 0,
    address: str | None = None,
    data_root: str | None = None,
    partition: str = "dirichlet",
) -> dict[str, Any]:
    """fmnist-dir05's data and model over ``devices`` devices in Ray actors, ``per_round`` a round; with
    ``partition`` another split of the data (fmnist-dir05's Dirichlet split needs 10 examples a device)."""
    from ..simulation_ray import RayFederation, RayOptions
    from ..simulation_ray_host import process_rss

    spec: FederationSpec = FMNIST_DIR05.replace(
        devices=devices, per_round=per_round, rounds=rounds, data_root=data_root, partition=partition
    )
    made: list[RayFederation] = []
    seen: dict[str, list[Any]] = {}

    def factory(cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor) -> RayFederation:
        fed = RayFederation(cfg, layout, initial, RayOptions(address=address, hosts=hosts))
        made.append(fed)
        seen["idle"] = fed.host_stats()  # every device enrolled, none trained yet
        seen["driver"] = [process_rss(), fed.database_bytes()]
        return fed

    load_before = _load()
    t0 = time.perf_counter()
    result = run_simulation(SimulationConfig(spec, workers=hosts), federation=factory)
    wall = time.perf_counter() - t0
    fed = made[0]
    spawned, idle = fed.spawn_stats, seen["idle"]
    per_device = sum(i.rss_bytes - s.rss_bytes for s, i in zip(spawned, idle, strict=True)) / devices
    driver_idle, db_bytes = seen["driver"]
    times = [r.seconds for r in result.rounds]
    return {
        "devices": devices,
        "partition": spec.partition,
        "per_round": per_round,
        "rounds": rounds,
        "hosts": len(spawned),
        "cpus": os.cpu_count(),
        "load_avg_1m_before": load_before,
        "load_avg_1m": _load(),
        "ray_init_s": round(fed.ray_init_s, 2),
        "hosts_start_s": round(fed.hosts_start_s, 2),
        "enroll_s": round(fed.enroll_s, 2),
        "enroll_ms_per_device": round(1000 * fed.enroll_s / devices, 2),
        "host_rss_mb_before_enroll": [round(s.rss_bytes / 2**20, 1) for s in spawned],
        "host_rss_mb_idle": [round(s.rss_bytes / 2**20, 1) for s in idle],
        "host_rss_mb_end": [round(s.rss_bytes / 2**20, 1) for s in fed.final_stats],
        "host_peak_rss_mb": [round(s.max_rss_bytes / 2**20, 1) for s in fed.final_stats],
        "kb_per_idle_device": round(per_device / 1024, 1),
        "driver_rss_mb_before_enroll": round(fed.driver_rss_spawned / 2**20, 1),
        "driver_rss_mb_idle": round(driver_idle / 2**20, 1),
        "driver_kb_per_idle_device": round((driver_idle - fed.driver_rss_spawned) / devices / 1024, 1),
        "coordinator_db_kb_per_device": round(db_bytes / devices / 1024, 1),
        "round_s": [round(t, 2) for t in times],
        "startup_s": round(result.startup_s, 2),
        "wall_s": round(wall, 2),
        "final_accuracy": result.rounds[-1].accuracy if result.rounds else None,
    }
