"""Server memory under concurrent uploads: N devices send their FedAvg-CNN update (6.65 MB) at once.

Starts ``qflare server`` (fashion-mnist, fedavg-cnn, one round of N devices) as a subprocess, enrolls
and connects N real protocol Devices over HTTP, has each fetch the global model and sign an update
(a small random delta: training is not what is measured), then submits all N updates concurrently while
sampling the server's RSS.  Prints the server's RSS before and at peak, the wall time of the uploads, the
most uploads the server had in flight, and whether every update was accepted.

    python benchmarks/server_uploads.py --devices 100 --max-uploads 8
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import torch

from qflare.crypto import SigningKey, VerifyKey
from qflare.errors import error_from_code
from qflare.models import create_model
from qflare.protocol import Device, Route
from qflare.training import TrainResult
from qflare.wire import ParamLayout


class _Http:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"} | ({"X-Qflare-Session": session_id} if session_id else {})
        resp = self.client.post(f"/v1/{Route(route).value}", content=body, headers=headers)
        if resp.status_code != 200:
            err = resp.json()
            raise error_from_code(err["code"], err["message"], resp.status_code)
        return resp.content


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--max-uploads", type=int, default=8)
    ap.add_argument("--dataset", default="fashion-mnist")
    args = ap.parse_args()
    n = args.devices
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(tempfile.mkdtemp(prefix="qflare-bench-"))
    admin = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if k != "QFLARE_DATABASE_URL"} | {"QFLARE_ADMIN_TOKEN": admin}
    argv = [sys.executable, "-m", "qflare", "server", "--port", str(port), "--data-dir", str(data), "--dataset", args.dataset,
            "--model", "fedavg-cnn", "--rounds", "1", "--per-round", str(n), "--min-devices", str(n), "--no-eval",
            "--max-uploads", str(args.max_uploads), "--rate", "100000", "--session-rate", "100000", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120.0, limits=httpx.Limits(max_connections=n + 8)) as api:
            while True:
                try:
                    if api.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            info = api.get("/v1/identity").json()
            key = VerifyKey.from_bytes(info["alg"], bytes.fromhex(info["public_key"]))
            tokens = api.post("/v1/admin/tokens", json={"count": n}, headers={"Authorization": f"Bearer {admin}"}).json()["tokens"]
            layout = ParamLayout.from_module(create_model("fedavg-cnn", (1, 28, 28), 10))
            devices = [Device(transport=_Http(api), identity=SigningKey.generate(), server_key=key, layout=layout) for _ in range(n)]
            for dev, token in zip(devices, tokens):
                dev.enroll(token)
                dev.connect()
            while api.get("/v1/status").json()["state"] != "open":
                time.sleep(0.1)
            sealed = []
            for i, dev in enumerate(devices):
                task = dev.task()
                model = dev.fetch_model(task)
                delta = torch.randn(layout.numel, generator=torch.Generator().manual_seed(i)) * 1e-3
                sealed.append(dev.prepare_update(task, model, TrainResult(delta, 100, 1.0, 0.0, 1)))
            size = len(sealed[0].payload)
            rss_before = proc.memory_info().rss
            peak, in_flight, stop = [rss_before], [0.0], threading.Event()

            def sample() -> None:
                with httpx.Client(base_url=url, timeout=10.0) as probe:
                    while not stop.is_set():
                        peak[0] = max(peak[0], proc.memory_info().rss)
                        in_flight[0] = max(in_flight[0], _gauge(probe.get("/metrics").text, "qflare_uploads_in_flight"))
                        time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=n) as pool:
                receipts = list(pool.map(lambda pair: pair[0].submit(pair[1]), zip(devices, sealed)))
            wall = time.perf_counter() - t0
            stop.set()
            sampler.join()
            status = api.get("/v1/status").json()
        print(f"devices {n}  update payload {size / 1e6:.2f} MB  max uploads {args.max_uploads}")
        print(f"server RSS before uploads {rss_before / 2**20:.0f} MiB, peak during uploads {peak[0] / 2**20:.0f} MiB")
        print(f"uploads wall {wall:.2f} s ({n * size / wall / 1e6:.0f} MB/s); most in flight (sampled) {in_flight[0]:.0f}")
        print(f"receipts {len(receipts)}; round state after: {status['state']}, model version {status['model_version']}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
