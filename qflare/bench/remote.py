"""A federation backend whose coordinator is a running ``qflare server``, reached over HTTP.

:class:`RemoteFederation` plugs into :func:`qflare.simulation.run_simulation` in place of the in-process
coordinator: the same driver trains the same simulated devices on the same shards with the same seeds,
but every device is a real :class:`~qflare.protocol.Device` over :class:`~qflare.transport.HttpTransport`
- enrolled with a one-time token from the admin API, pinned to the coordinator's key id, with its own
post-quantum session - and the rounds are opened, closed and aggregated by the server's round loop.

Which devices a round selected: the server tells each device whether it is selected (``task``), not
in which order it drew them, and the order fixes FedAvg's summation order.  The server draws with
``numpy.random.default_rng(seed + 1)`` over its active devices in enrollment order, exactly like the
in-process coordinator, so this backend enrolls the devices in index order, replays that stream to get
the order, and has the server confirm the set (the drawn devices' tasks must say "selected", and
``/v1/status`` must count that many).  When the server disagrees, every device is asked, the selection
is taken in index order, and the round is counted in :attr:`RemoteStats.selection_mismatches`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import torch

from ..crypto import SigningKey, Suite, VerifyKey
from ..device import pin_server_key
from ..errors import ConfigError, RoundError
from ..protocol import Device, TaskInfo
from ..protocol.device import SignedUpdate, Transport
from ..training import TrainResult
from ..transport import HttpTransport, RetryPolicy
from ..wire import ParamLayout

__all__ = ["RemoteFederation", "RemoteStats", "enroll_devices"]

if TYPE_CHECKING:
    from ..simulation import SimulationConfig


def enroll_devices(
    transports: Sequence[Transport], tokens: Sequence[str], server_key: VerifyKey, layout: ParamLayout, suite: Suite
) -> list[Device]:
    """One Device per transport, enrolled with its token and connected, one after the other (in order)."""
    devices: list[Device] = []
    for transport, token in zip(transports, tokens, strict=True):
        dev = Device(
            transport=transport,
            identity=SigningKey.generate(suite.sig),
            server_key=server_key,
            layout=layout,
            suite=suite,
        )
        dev.enroll(token)
        dev.connect()
        devices.append(dev)
    return devices


@dataclass
class RemoteStats:
    """What the network path cost, beyond the rounds' own times."""

    open_wait_s: list[float] = field(default_factory=list)
    """Per round: from asking for the next round to knowing its selection (the server's loop tick included)."""
    selection_mismatches: int = 0
    """Rounds whose selection the server's seeded stream did not predict (see the module docstring)."""
    enroll_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RemoteFederation:
    """``run_simulation``'s backend over HTTP (see the module docstring).  Starts no server."""

    def __init__(
        self,
        cfg: SimulationConfig,
        layout: ParamLayout,
        initial: torch.Tensor,
        *,
        url: str,
        tokens: Sequence[str],
        key_id: str,
        poll_s: float = 0.02,
        round_wait_s: float = 600.0,
        pool_connections: int = 32,
    ) -> None:
        spec = self._spec = cfg.federation
        self._poll_s, self._round_wait_s = poll_s, round_wait_s
        retry = RetryPolicy(attempts=5, initial_s=0.1, max_wait_s=2.0)
        self._api = HttpTransport(url, timeout=60.0, retry=retry)
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(300.0, connect=10.0),
            headers={"user-agent": "qflare-device/1"},
            limits=httpx.Limits(max_connections=pool_connections, max_keepalive_connections=pool_connections),
        )
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="qflare-remote")
        self.stats = RemoteStats()
        try:
            key, suite = pin_server_key(self._api.get_json("/v1/identity"), key_id)
            if suite != spec.suite:
                raise ConfigError(f"the server uses suite {suite.name}, this run {spec.suite.name}")
            t0 = time.perf_counter()
            transports = [HttpTransport(url, client=self._client, retry=retry) for _ in range(spec.devices)]
            self.devices = enroll_devices(transports, tokens, key, layout, suite)
            self.stats.enroll_s = time.perf_counter() - t0
            task = self.devices[0].task()
            if task.model_version == 0 and not torch.equal(
                self.devices[0].fetch_model(task).flat, initial.to(torch.float32)
            ):
                raise ConfigError("the server's initial model is not this run's (another model or seed?)")
        except BaseException:
            self.close()
            raise
        self._rng = np.random.default_rng(spec.seed + 1)  # the server's selection stream (RoundManager)
        self._number = 0
        self._tasks: dict[int, TaskInfo] = {}

    # ------------------------------------------------------------------ Federation protocol
    def open_round(self) -> tuple[int, list[int]] | None:
        t0 = time.perf_counter()
        expected = self._number + 1
        while True:
            st = self._api.get_json("/v1/status")
            if st["state"] == "finished" or (st["round"] is None and st["model_version"] >= self._spec.rounds):
                return None
            if st["state"] == "open" and st["round"] >= expected:
                break
            if time.perf_counter() - t0 > self._round_wait_s:
                raise RoundError(f"the server opened no round {expected} in {self._round_wait_s:.0f} s (status {st})")
            time.sleep(self._poll_s)
        number = int(st["round"])
        k = min(self._spec.per_round, self._spec.devices)
        guess: list[int] = []
        for _ in range(number - self._number):  # failed rounds drew a selection too
            guess = [int(i) for i in self._rng.choice(self._spec.devices, k, replace=False)]
        tasks = dict(zip(guess, self._pool.map(lambda i: self.devices[i].task(), guess), strict=False))
        if st["selected"] == k and all(t.selected and t.round == number for t in tasks.values()):
            chosen = guess
        else:
            self.stats.selection_mismatches += 1
            tasks = dict(enumerate(self._pool.map(lambda d: d.task(), self.devices)))
            chosen = [i for i, t in tasks.items() if t.selected and t.round == number]
        self._number, self._tasks = number, {i: tasks[i] for i in chosen}
        self.stats.open_wait_s.append(time.perf_counter() - t0)
        return number, chosen

    def work(self, i: int, train: Callable[[torch.Tensor, int], TrainResult]) -> tuple[Any, TrainResult]:
        dev = self.devices[i]
        task = self._tasks.get(i) or dev.task()
        if not task.selected:
            raise RoundError(f"device {i} is not selected for round {task.round}", code="not_selected")
        gm = dev.fetch_model(task)
        result = train(gm.flat, task.round)
        return dev.prepare_update(task, gm, result), result

    def submit(self, i: int, prepared: Any) -> None:
        assert isinstance(prepared, SignedUpdate)
        receipt = self.devices[i].submit(prepared)
        if receipt.update_hash != prepared.update_hash or receipt.round != prepared.round:
            raise RoundError(f"device {i}'s receipt acknowledges another update", code="bad_receipt")

    def published(self, number: int) -> bool:
        return True  # model() raises when the round published nothing

    def model(self) -> tuple[torch.Tensor, str]:
        """The global model after this round, fetched (and verified) through device 0."""
        dev = self.devices[0]
        task = dev.task()
        if task.model_version != self._number:
            raise RoundError(f"round {self._number} did not publish a model (server at v{task.model_version})")
        gm = dev.fetch_model(task)
        return gm.flat, gm.sha256

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
        self._api.close()
