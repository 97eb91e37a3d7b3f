"""A small federation (MLP on 8x8 inputs, SQLite store) for protocol tests."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qflare.crypto import SigningKey
from qflare.models import create_model
from qflare.protocol import Coordinator, CoordinatorConfig, Device, RoundConfig, Route
from qflare.storage import Database, Store
from qflare.strategy import fedavg
from qflare.training import TrainResult
from qflare.transport import InProcessTransport
from qflare.wire import ParamLayout


@dataclass
class RecordingTransport:
    """In-process transport that remembers every request and can tamper with responses."""

    inner: InProcessTransport
    sent: list[tuple[Route, bytes, str | None]] = field(default_factory=list)
    tamper_response: object = None  # callable(route, bytes) -> bytes

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        self.sent.append((Route(route), body, session_id))
        out = self.inner.request(route, body, session_id)
        if self.tamper_response is not None:
            out = self.tamper_response(Route(route), out)  # type: ignore[operator]
        return out


class FakeClock:
    """A ``time.time`` stand-in that only moves when told to (starts at the real time, so timestamps
    exchanged with devices on the real clock stay within their skew window)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Federation:
    def __init__(
        self,
        tmp: Path,
        n: int = 3,
        per_round: int = 2,
        rounds: int = 3,
        strategy=None,
        round_timeout_s: float = 600.0,
        blobs=None,
        selector="random",
        clock=None,
        min_participants: int | None = None,
        database: Database | None = None,
        identity: SigningKey | None = None,
        config: CoordinatorConfig | None = None,
    ) -> None:
        self.clock = time.time if clock is None else clock  # devices share it: their hellos are timestamped
        self.db = Database(f"sqlite:///{tmp}/coordinator.db") if database is None else database
        self.db.upgrade()
        if clock is None:
            self.store = Store(self.db)
        else:  # the store's clock follows the coordinator's (deadlines are checked against it)
            self.store = Store(self.db, clock=lambda: datetime.fromtimestamp(clock(), UTC))
        torch.manual_seed(0)
        model = create_model("mlp", (1, 8, 8), 10)
        self.layout = ParamLayout.from_module(model)
        self.identity = SigningKey.generate() if identity is None else identity
        self.coordinator = Coordinator(
            layout=self.layout,
            initial_flat=self.layout.module_to_flat(model),
            strategy=strategy or fedavg(),
            identity=self.identity,
            store=self.store,
            rounds=RoundConfig(
                rounds=rounds,
                per_round=per_round,
                seed=0,
                round_timeout_s=round_timeout_s,
                selector=selector,
                min_participants=min_participants,
            ),
            config=config,
            blobs=blobs,
            clock=time.time if clock is None else clock,
        )
        self.transport = RecordingTransport(InProcessTransport(self.coordinator))
        self.devices = [self.new_device() for _ in range(n)]
        for dev, token in zip(self.devices, self.coordinator.create_tokens(n, ttl_s=60)):
            dev.enroll(token)
            dev.connect()

    def new_device(self, identity: SigningKey | None = None) -> Device:
        return Device(
            transport=self.transport,
            identity=identity or SigningKey.generate(),
            server_key=self.coordinator.public_key,
            layout=self.layout,
            clock=self.clock,
        )

    def by_id(self, device_id: str) -> Device:
        return next(d for d in self.devices if d.device_id == device_id)

    def result(self, seed: int = 0, n: int = 5, scale: float = 0.01) -> TrainResult:
        g = torch.Generator().manual_seed(seed)
        delta = torch.randn(self.layout.numel, generator=g) * scale
        return TrainResult(delta=delta, num_examples=n, mean_loss=1.0, duration_s=0.01, steps=1)

    def selected(self) -> list[Device]:
        rnd = self.coordinator.rounds.current
        assert rnd is not None
        return [self.by_id(d) for d in rnd.selected]

    def unselected(self) -> list[Device]:
        rnd = self.coordinator.rounds.current
        assert rnd is not None
        return [d for d in self.devices if d.device_id not in rnd.selected]

    def prepare(self, dev: Device, seed: int = 0, n: int = 5):
        task = dev.task()
        model = dev.fetch_model(task)
        return dev.prepare_update(task, model, self.result(seed, n))

    def events(self) -> list[str]:
        return [e.reason for e in self.store.security_events(limit=1000)]

    def counts(self) -> tuple[int, int, int]:
        rnd = self.coordinator.rounds.current
        return (
            len(self.store.list_devices()),
            self.store.count_updates(rnd.number) if rnd else -1,
            self.coordinator.rounds.model.version,
        )
