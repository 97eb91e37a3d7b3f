"""``qflare bench ingest``: N devices upload their sealed FedAvg-CNN update (6.65 MB) to one server at once.

A ``qflare server`` subprocess (fashion-mnist, fedavg-cnn, one round of all N devices, ``--no-eval``) on
loopback; N real :class:`~qflare.protocol.Device` s over :class:`~qflare.transport.HttpTransport` (one
HTTP client, so one connection, each), enrolled with admin-API tokens, pinned to the server's key id,
each with its own post-quantum session.  Before the timed phase every device fetches the global model
and signs its update (a small random delta: training is not what is measured).  Then all N submit at
once (one thread each, released together), while the server's RSS and its ``qflare_uploads_in_flight``
gauge are sampled.

Figures: accepted updates, updates/s and MB/s (payload bytes of accepted updates over the wall time of
the upload phase), per-upload latency p50/p99, the server's RSS before and at peak.  Afterwards the
server is stopped cleanly and its database is checked against the receipts: ``lost`` counts updates
acknowledged to a device but absent from the ``updates`` table (or whose blob is missing); ``duplicated``
counts rows beyond one per (round, device), receipts that newly acknowledged an already counted update
(equal running counts; one server only), and updates counted in the published model beyond the rows.

With ``--workers N`` the server is N processes (their RSS summed, supervisor included) and the round is
closed afterwards by the leader, which reads every update back from the blob store: the benchmark waits
for that close (``close_after_upload_s``) before it stops the server.  A receipt's running count is the
answering worker's view of the round, so equal counts from two workers are not duplicates and are not
counted; ``max_in_flight_sampled`` is one worker's gauge (whichever answered the sample).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from ..data import load_dataset
from ..device import pin_server_key
from ..errors import QflareError
from ..federation import FederationSpec
from ..models import create_model
from ..protocol import Device, Receipt
from ..protocol.device import SignedUpdate
from ..storage import BlobBackend, Database, Store, blob_store_from_env
from ..storage.testing import temporary_postgres_database
from ..training import TrainResult
from ..transport import HttpTransport, RetryPolicy
from ..wire import ParamLayout
from .procs import PeakRss
from .remote import enroll_devices
from .server_proc import ServerSpec

__all__ = ["TARGETS", "IngestCheck", "check_database", "run_ingest_bench"]

TARGETS: dict[str, str] = {"lost": "0", "duplicated": "0", "mb_per_s": ">= 500", "server_peak_rss_mb": "< 1024"}
_TARGET_MB_PER_S = 500.0


@dataclass(frozen=True)
class IngestCheck:
    rows: int
    lost: int
    duplicated: int
    model_updates: int | None


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _prepare(devices: list[Device], layout: ParamLayout) -> list[SignedUpdate]:
    """Each device fetches the round's model and signs an update (a seeded random delta).  With several
    workers, one that has not followed the round's opening yet (it does at its next step) answers
    ``waiting``: asked again until 30 s have passed."""
    sealed: list[SignedUpdate] = []
    for i, dev in enumerate(devices):
        deadline = time.monotonic() + 30.0
        while not ((task := dev.task()).state == "open" and task.selected) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not (task.state == "open" and task.selected):
            raise QflareError(f"device {i} is not selected for an open round ({task})")
        model = dev.fetch_model(task)
        delta = torch.randn(layout.numel, generator=torch.Generator().manual_seed(i)) * 1e-3
        sealed.append(dev.prepare_update(task, model, TrainResult(delta, 100 + i, 1.0, 0.0, 1)))
    return sealed


def _upload(
    devices: list[Device], sealed: list[SignedUpdate]
) -> tuple[float, list[Receipt | None], list[float], list[str]]:
    """All devices submit at once; (wall time, receipts, latencies in s, errors)."""
    n = len(devices)
    start = threading.Barrier(n + 1)
    receipts: list[Receipt | None] = [None] * n
    latency = [0.0] * n
    errors: list[str] = []

    def one(i: int) -> float:
        start.wait()
        t = time.perf_counter()
        try:
            receipts[i] = devices[i].submit(sealed[i])
        except QflareError as exc:
            errors.append(f"{type(exc).__name__}:{exc.code}")
        latency[i] = time.perf_counter() - t
        return time.perf_counter()

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="qflare-upload") as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        start.wait()
        t0 = time.perf_counter()
        ends = [f.result() for f in futures]
    return max(ends) - t0, receipts, latency, errors


def _sample_in_flight(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as probe:
        while not stop.wait(0.05):
            with contextlib.suppress(httpx.HTTPError):
                out[0] = max(out[0], _gauge(probe.get("/metrics").text, "qflare_uploads_in_flight"))


def check_database(
    database_url: str,
    blobs: BlobBackend,
    receipts: Sequence[tuple[str, Receipt]],
    *,
    unique_counts: bool = True,
) -> IngestCheck:
    """(device id, receipt) pairs against the server's ``updates`` table, blobs and published model (see the
    module docstring).  Open the database only once the server has stopped, or read-only while it runs.
    ``unique_counts``: the receipts' running counts come from one process, so two equal ones are a
    duplicate (not so for several workers, each of which counts what it has seen of the round)."""
    db = Database(database_url)
    try:
        store = Store(db)
        acked = {(r.round, device_id): r.update_hash for device_id, r in receipts}
        rounds = sorted({rnd for rnd, _ in acked})
        rows = [u for rnd in rounds for u in store.updates_for_round(rnd)]
        by_round = {m.round_number: m for m in store.list_models()}  # versions count publications, not rounds
        models = [by_round.get(rnd) for rnd in rounds]
    finally:
        db.dispose()
    stored = {(u.round_number, u.device_id): u.update_hash for u in rows}
    lost = sum(1 for key, h in acked.items() if stored.get(key) != h or not blobs.exists(h))
    extra_rows = len(rows) - len(stored)
    fresh = [r.updates_in_round for _, r in receipts if not r.duplicate]
    counted_twice = len(fresh) - len(set(fresh)) if unique_counts else 0
    model_updates = sum(int(m.metrics.get("updates", 0)) for m in models if m is not None) if models else None
    over_counted = max(0, (model_updates or 0) - len(stored))
    return IngestCheck(len(rows), lost, extra_rows + counted_twice + over_counted, model_updates)


def run_ingest_bench(
    devices: int = 100,
    *,
    max_uploads: int = 8,
    data_root: str | None = None,
    workers: int = 1,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return its figures.  ``workers`` > 1 runs
    ``qflare server --workers N`` on ``database_url`` (PostgreSQL; a temporary database when None)."""
    if workers > 1 and database_url is None:
        with temporary_postgres_database(prefix="qflare_bench_") as url:
            return run_ingest_bench(
                devices, max_uploads=max_uploads, data_root=data_root, workers=workers, database_url=url
            )
    fed = FederationSpec(
        dataset="fashion-mnist",
        model="fedavg-cnn",
        devices=devices,
        rounds=1,
        per_round=devices,
        round_timeout_s=3600.0,
        data_root=data_root,
    )
    test = load_dataset(fed.dataset, "test", root=data_root)
    torch.manual_seed(fed.seed)
    layout = ParamLayout.from_module(create_model(fed.model, test.input_shape, test.num_classes))
    retry = RetryPolicy(attempts=3, initial_s=0.2, max_wait_s=2.0)
    spec = ServerSpec(fed, max_uploads=max_uploads, workers=workers, database_url=database_url)
    with spec.process() as server:
        server.wait_ready()
        transports = [HttpTransport(server.url, timeout=600.0, retry=retry) for _ in range(devices)]
        try:
            key, suite = pin_server_key(server.api.get_json("/v1/identity"), server.key_id())
            devs = enroll_devices(transports, server.tokens(devices, label="bench"), key, layout, suite)
            deadline = time.monotonic() + 60.0
            while server.status()["state"] != "open":
                if time.monotonic() > deadline:
                    raise QflareError(
                        f"the server opened no round with {devices} devices enrolled:\n{server.log_tail()}"
                    )
                time.sleep(0.05)
            sealed = _prepare(devs, layout)
            with PeakRss(server.pid, interval=0.05) as idle:
                time.sleep(0.5)
            rss_before = idle.peak_bytes
            in_flight, stop = [0.0], threading.Event()
            sampler = threading.Thread(target=_sample_in_flight, args=(server.url, stop, in_flight), daemon=True)
            with PeakRss(server.pid, interval=0.02) as rss:
                sampler.start()
                wall, receipts, latency, errors = _upload(devs, sealed)
                stop.set()
                sampler.join()
            closed_at = time.perf_counter()
            status = server.status()
            deadline = time.monotonic() + 600.0
            while status.get("state") != "finished" and not errors and time.monotonic() < deadline:
                time.sleep(0.05)  # several workers: the leader closes the round at its next step
                status = server.status()
            close_s = time.perf_counter() - closed_at
            exit_code = server.stop()
            acked = [(devs[i].device_id, r) for i, r in enumerate(receipts) if r is not None]
            # the server process inherits this one's environment, so $QFLARE_BLOB_STORE names its store too
            blobs = blob_store_from_env(server.data_dir)
            check = check_database(server.database_url, blobs, acked, unique_counts=workers == 1)
        finally:
            for t in transports:
                t.close()
    accepted = [i for i, r in enumerate(receipts) if r is not None]
    payload = sum(len(sealed[i].payload) for i in accepted)
    lat_ms = np.array([latency[i] for i in accepted]) * 1000 if accepted else np.array([float("nan")])
    out: dict[str, Any] = {
        "devices": devices,
        "accepted": len(accepted),
        "failed": len(errors),
        "errors": dict(Counter(errors)),
        "retried_receipts": sum(1 for r in receipts if r is not None and r.duplicate),
        "lost": check.lost,
        "duplicated": check.duplicated,
        "rows": check.rows,
        "model_updates": check.model_updates,
        "payload_mb": round(len(sealed[0].payload) / 1e6, 3),
        "upload_wall_s": round(wall, 3),
        "mb_per_s": round(payload / 1e6 / wall, 1),
        "updates_per_s": round(len(accepted) / wall, 2),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1),
        "server_rss_before_mb": round(rss_before / 2**20, 1),
        "server_peak_rss_mb": round(max(rss.peak_bytes, rss_before) / 2**20, 1),
        "max_uploads": max_uploads,
        "workers": workers,
        "database": "postgresql" if database_url else "sqlite",
        "max_in_flight_sampled": int(in_flight[0]),
        "server_state_after": status.get("state"),
        "close_after_upload_s": round(close_s, 3),
        "server_exit": exit_code,
        "targets": TARGETS,
    }
    out["meets_targets"] = (
        out["lost"] == 0
        and out["duplicated"] == 0
        and out["mb_per_s"] >= _TARGET_MB_PER_S
        and out["server_peak_rss_mb"] < 1024
    )
    return out
