"""Helpers for the server tests: a small runtime (digits + MLP) and devices that talk to the app over HTTP."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi.testclient import TestClient

from qflare.crypto import SigningKey
from qflare.data import load_dataset
from qflare.device import pin_server_key
from qflare.errors import error_from_code
from qflare.federation import FederationSpec
from qflare.models import create_model
from qflare.protocol import Device, Route
from qflare.server import HttpLimits, ServerConfig, ServerRuntime
from qflare.training import LocalTrainer, TrainConfig
from qflare.wire import ParamLayout

__all__ = [
    "SPEC",
    "AppTransport",
    "Counts",
    "admin",
    "counts",
    "make_runtime",
    "new_device",
    "train_and_submit",
    "wait_for",
]

GENEROUS = HttpLimits(
    ip_rate=10_000.0,
    ip_burst=10_000.0,
    session_rate=10_000.0,
    session_burst=10_000.0,
    ops_rate=10_000.0,
    ops_burst=10_000.0,
    keys_rate=10_000.0,
    keys_burst=10_000.0,
    event_burst=10_000,
)


SPEC = FederationSpec(dataset="digits", model="mlp", devices=3, rounds=2, per_round=3, round_timeout_s=120.0)
_WORKLOAD = {f.name for f in fields(FederationSpec)}


def make_runtime(data_dir: Path, **overrides: Any) -> ServerRuntime:
    """A runtime on ``data_dir``: digits + MLP, 3 devices a round, no background round loop by default.

    ``overrides`` name FederationSpec fields (the workload) or ServerConfig fields (the server's own)."""
    workload = {k: v for k, v in overrides.items() if k in _WORKLOAD}
    opts: dict[str, Any] = dict(min_devices=3, round_loop=False, http=GENEROUS)
    opts.update({k: v for k, v in overrides.items() if k not in _WORKLOAD})
    return ServerRuntime(ServerConfig(data_dir=data_dir, federation=SPEC.replace(**workload), **opts), environ={})


class AppTransport:
    """The protocol's Transport over HTTP API v1 (the real client transport lives in qflare.transport.http)."""

    def __init__(self, client: TestClient | httpx.Client) -> None:
        self.client = client

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"}
        if session_id is not None:
            headers["X-Qflare-Session"] = session_id
        resp = self.client.post(f"/v1/{Route(route).value}", content=body, headers=headers)
        if resp.status_code != 200:
            err = resp.json()
            raise error_from_code(err["code"], err["message"], resp.status_code)
        return resp.content


def new_device(client: TestClient, identity: SigningKey | None = None) -> Device:
    """A device that fetched the coordinator key from /v1/identity and checked it against its key id."""
    info = client.get("/v1/identity").json()
    key, _ = pin_server_key(info, info["key_id"])
    layout = ParamLayout.from_module(create_model("mlp", (1, 8, 8), 10))
    return Device(
        transport=AppTransport(client), identity=identity or SigningKey.generate(), server_key=key, layout=layout
    )


_TRAIN = None


def train_and_submit(device: Device, index: int, n_devices: int) -> int:
    """One device's turn in the open round: task, model, local training on its shard, update. Returns the round."""
    global _TRAIN
    if _TRAIN is None:
        _TRAIN = load_dataset("digits", "train")
    task = device.task()
    assert task.state == "open" and task.selected, task
    model = device.fetch_model(task)
    idx = torch.arange(index, len(_TRAIN), n_devices)
    trainer = LocalTrainer(create_model("mlp", (1, 8, 8), 10), TrainConfig(lr=0.1, channels_last=False))
    result = trainer.train(model.flat, _TRAIN.normalized(idx), _TRAIN.labels[idx], seed=index)
    receipt = device.submit(device.prepare_update(task, model, result))
    assert receipt.round == task.round and not receipt.duplicate
    return task.round


def admin(runtime: ServerRuntime) -> dict[str, str]:
    return {"Authorization": f"Bearer {runtime.admin.value}"}


@dataclass(frozen=True)
class Counts:
    devices: int
    active: int
    rounds: tuple[tuple[int, str], ...]
    updates: int
    models: int
    round_status: tuple[Any, ...]


def counts(runtime: ServerRuntime) -> Counts:
    """The state a refused request must not change."""
    store = runtime.store
    st = runtime.coordinator.rounds.status()
    return Counts(
        devices=len(store.list_devices()),
        active=len(store.list_devices(status="active")),
        rounds=tuple((r.round_number, r.state) for r in store.list_rounds()),
        updates=store.count_updates(),
        models=len(store.list_models()),
        round_status=(st["round"], st["state"], st["accepted"], st["model_version"]),
    )


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` in real time: for conditions a real thread (the runtime's round loop) brings about."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
