"""`qflare bench secagg`: one secure-aggregation round of the FedAvg CNN's size against plaintext FedAvg.

``n`` devices with random updates (normal, sd 0.01) of the FedAvg CNN's parameter count (1,663,370 for
28x28x1 inputs, counted from the model registry) and random weights in ``1..16`` run every phase of
:mod:`qflare.secagg` in this process against one :class:`~qflare.secagg.SecAggServer`; the parameters
``(k, t)`` are :func:`qflare.secagg.choose` for ``n``, the given dropout fraction and 10% corruption.
``round(dropout * n)`` devices, drawn at random, drop after sharing their keys and before sending their
masked input: the costliest point for the coordinator, which must then rebuild their pairwise keys and
remove every pair mask they share with a survivor.

Figures:
* ``exact_match``: the unmasked sum equals the sum of the survivors' quantised vectors, word for word.
* ``device_s`` (mean) / ``device_s_max``: compute of one device for all its phases (its set-up: graph and
  KEM keys; quantising, masking, KEM, signing; not the generation of its random update).
* ``coordinator_s``: compute of every coordinator call of the round (set-up: graph and running sum;
  checks, relaying, running sum, reconstruction and unmasking), wall-clock seconds inside the calls; ``coordinator_cpu_s``: the
  process's CPU seconds over the same calls (every thread: with ``coordinator_workers`` > 1 the mask
  removal runs on several threads, so this can exceed ``coordinator_s``; on a loaded machine it is
  lower, the calls waiting for a core).  ``plaintext_coordinator_s``: weighted FedAvg of the same survivors'
  float32 updates (numpy, accumulate then divide) plus the SHA-256 of each update's bytes, which the
  plaintext protocol checks against the signed UPDATE envelope; timed in the same run.
* ``bytes_ratio``: mean bytes a surviving device sends (advert, manifest, share entries, masked input and
  its vector, consistency signature, unmask response) over the bytes of its plaintext float32 update
  (``4 * d``), so the denominator leaves out any envelope the plaintext path adds: the ratio is an upper
  bound.  ``bytes_received_per_device`` counts what is relayed to it (adverts, share entries, the request
  and the consistency signatures); ``consistency_bytes_sent_per_device`` /
  ``consistency_bytes_received_per_device`` are the consistency round's part (one signature sent, every
  signature of the quorum or more received).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..crypto.identity import SigningKey
from ..crypto.suite import sha256
from ..errors import ConfigError, ErrorCode
from ..files import write_atomic
from ..secagg import QuantSpec, SecAggClient, SecAggConfig, SecAggServer, choose, quantize

__all__ = ["fedavg_cnn_size", "plot_secagg", "run_secagg_bench", "run_secagg_scaling", "write_secagg_scaling"]

TARGETS = {"bytes_ratio": 1.05, "coordinator_s_n100_dropout10": 2.0, "device_s": 0.5}


def fedavg_cnn_size() -> int:
    from ..models import create_model

    return sum(p.numel() for p in create_model("fedavg-cnn", (1, 28, 28), 10).parameters())


def run_secagg_bench(devices: int, dropout: float, *, seed: int = 0, length: int | None = None) -> dict[str, Any]:
    """One round with ``devices`` devices and ``dropout`` of them dropping before their masked input."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("dropout is a fraction in [0, 1)", code=ErrorCode.BAD_ARGUMENT)
    d = fedavg_cnn_size() if length is None else length
    params = choose(devices, dropout=dropout, corruption=0.1)
    rng = np.random.default_rng(seed)
    ids = {i: SigningKey.generate() for i in range(devices + 1)}
    config = SecAggConfig(
        round=1,
        params=params,
        graph_seed=os.urandom(32),
        quant=QuantSpec(clip=1.0, max_devices=max(devices, 1000), max_weight=16),
        length=d,
        roster={i: ids[i].public for i in range(1, devices + 1)},
        coordinator=ids[0].public,
    )
    drop = {int(i) + 1 for i in rng.choice(devices, round(dropout * devices), replace=False)}
    coord = coord_cpu = 0.0
    consistency_sent = 0
    dev_s = dict.fromkeys(range(1, devices + 1), 0.0)
    sent = dict.fromkeys(range(1, devices + 1), 0)
    received = dict.fromkeys(range(1, devices + 1), 0)

    def timed_dev(i: int, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        dev_s[i] += time.perf_counter() - t0
        return out

    def timed_coord(fn: Any, *args: Any) -> Any:
        nonlocal coord, coord_cpu
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        coord += time.perf_counter() - t0
        coord_cpu += time.process_time() - c0
        return out

    server = timed_coord(SecAggServer, config, ids[0])  # the graph and the running sum
    clients = {i: timed_dev(i, SecAggClient, config, i, ids[i]) for i in range(1, devices + 1)}  # graph, KEM keys
    for i, c in clients.items():
        raw = timed_dev(i, c.advertise)
        sent[i] += len(raw)
        timed_coord(server.receive_advert, raw)
    timed_coord(server.close_advertise)
    for i, c in clients.items():
        adverts = timed_coord(server.adverts_for, i)
        received[i] += sum(map(len, adverts))
        manifest, entries = timed_dev(i, c.share_keys, adverts)
        sent[i] += len(manifest) + sum(map(len, entries))
        timed_coord(server.receive_shares, manifest, entries)
    timed_coord(server.close_shares)
    reference = np.zeros(d + 1, dtype=np.uint32)
    plain_acc = np.zeros(d, dtype=np.float64)
    plain_s, weight_sum = 0.0, 0
    for i, c in clients.items():
        relayed = timed_coord(server.shares_for, i)
        received[i] += sum(len(m) + len(e) for m, e in relayed)
        if i in drop:
            continue
        x = rng.normal(0.0, 0.01, d).astype(np.float32)
        w = int(rng.integers(1, 17))
        reference += quantize(x, w, config.quant)
        t0 = time.perf_counter()
        sha256(x.tobytes())  # the plaintext path checks each update's hash too (UPDATE envelope)
        plain_acc += x * np.float32(w)
        weight_sum += w
        plain_s += time.perf_counter() - t0
        env, blob = timed_dev(i, c.masked_input, relayed, x, w)
        sent[i] += len(env) + len(blob)
        timed_coord(server.receive_masked, env, blob)
    request = timed_coord(server.close_masked)
    for i, c in clients.items():
        if i in drop:
            continue
        received[i] += len(request)
        signature = timed_dev(i, c.consistency, request)
        sent[i] += len(signature)
        consistency_sent = len(signature)
        timed_coord(server.receive_consistency, signature)
    proof = timed_coord(server.close_consistency)
    consistency_received = sum(map(len, proof))
    for i, c in clients.items():
        if i in drop:
            continue
        received[i] += consistency_received
        answer = timed_dev(i, c.unmask, request, proof)
        sent[i] += len(answer)
        timed_coord(server.receive_unmask, answer)
    result = timed_coord(server.finish)
    t0 = time.perf_counter()
    plain_mean = plain_acc / weight_sum
    plain_s += time.perf_counter() - t0
    survivors = [i for i in clients if i not in drop]
    plaintext_bytes = 4 * d
    device_times = [dev_s[i] for i in survivors]
    max_err = float(np.abs(result.mean - plain_mean).max())
    out: dict[str, Any] = {
        "devices": devices,
        "dropout": dropout,
        "dropped": len(drop),
        "parameters": d,
        "k": params.k,
        "t": params.t,
        "exact_match": bool(np.array_equal(result.total, reference)),
        "max_abs_error_vs_plaintext_mean": max_err,
        "error_bound": config.quant.error_bound,
        "bytes_ratio": float(np.mean([sent[i] for i in survivors]) / plaintext_bytes),
        "bytes_sent_per_device": float(np.mean([sent[i] for i in survivors])),
        "bytes_received_per_device": float(np.mean([received[i] for i in survivors])),
        "plaintext_bytes_per_device": plaintext_bytes,
        "consistency_bytes_sent_per_device": consistency_sent,
        "consistency_bytes_received_per_device": consistency_received,
        "quorum": params.quorum,
        "device_s": float(np.mean(device_times)),
        "device_s_max": float(np.max(device_times)),
        "coordinator_s": coord,
        "coordinator_cpu_s": coord_cpu,
        "coordinator_workers": server.workers,
        "plaintext_coordinator_s": plain_s,
    }
    out["meets_targets"] = {
        "bytes_ratio": out["bytes_ratio"] <= TARGETS["bytes_ratio"],
        "device_s": out["device_s"] <= TARGETS["device_s"],
        "coordinator_s": out["coordinator_s"] <= TARGETS["coordinator_s_n100_dropout10"]
        if (devices, dropout) == (100, 0.1)
        else None,
    }
    return out


def run_secagg_scaling(
    devices: list[int], dropouts: list[float], *, seed: int = 0, length: int | None = None
) -> dict[str, Any]:
    """:func:`run_secagg_bench` for every ``(n, dropout)``, one after the other."""
    runs = [run_secagg_bench(n, f, seed=seed, length=length) for f in dropouts for n in devices]
    return {"runs": runs, "targets": TARGETS}


def plot_secagg(result: dict[str, Any]) -> bytes:
    """A PNG: coordinator, plaintext-coordinator and device seconds against n (left), bytes ratio (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_t, ax_b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = ["o-", "s--", "^:", "d-."]
    for j, f in enumerate(sorted({r["dropout"] for r in result["runs"]})):
        runs = sorted((r for r in result["runs"] if r["dropout"] == f), key=lambda r: r["devices"])
        ns = [r["devices"] for r in runs]
        style = styles[j % len(styles)]
        for key, color in (
            ("coordinator_s", "tab:red"),
            ("plaintext_coordinator_s", "tab:gray"),
            ("device_s", "tab:blue"),
        ):
            ax_t.plot(ns, [r[key] for r in runs], style, color=color, label=f"{key}, dropout {f:.0%}")
        ax_b.plot(ns, [r["bytes_ratio"] for r in runs], style, color="tab:green", label=f"dropout {f:.0%}")
    ax_t.axhline(TARGETS["coordinator_s_n100_dropout10"], color="tab:red", linewidth=0.5, linestyle="--")
    ax_t.axhline(TARGETS["device_s"], color="tab:blue", linewidth=0.5, linestyle="--")
    ax_b.axhline(TARGETS["bytes_ratio"], color="tab:green", linewidth=0.5, linestyle="--", label="target")
    ax_t.set_xlabel("devices n")
    ax_t.set_ylabel("seconds (compute)")
    ax_t.legend(fontsize=6)
    ax_b.set_xlabel("devices n")
    ax_b.set_ylabel("bytes sent per device, secure / plaintext")
    ax_b.legend(fontsize=7)
    fig.suptitle("secure aggregation, FedAvg CNN (1,663,370 parameters)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_secagg_scaling(result: dict[str, Any], out: Path) -> list[Path]:
    """``secagg.json`` and ``secagg.png`` under ``out`` (each replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "secagg.json", out / "secagg.png"]
    write_atomic(paths[0], (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(paths[1], plot_secagg(result))
    return paths
