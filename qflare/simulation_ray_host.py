"""The Ray backend's device hosts: the actor body that runs some of a federation's devices.

:class:`DeviceHost` owns devices ``i`` with ``i % hosts == k`` - each a real
:class:`~qflare.protocol.Device` with its own ML-DSA identity and post-quantum session - their shards,
and one trainer for them all.  Each device operation (enroll and connect, a round's work, a submission)
runs on a thread whose transport hands each request out; :meth:`DeviceHost.step` returns the requests
the operations have reached and resumes them with the driver's answers (see
:mod:`qflare.simulation_ray`, which drives it).  This module imports only what a host needs: Ray starts
the hosts' processes by importing it.
"""

from __future__ import annotations

import os
import queue
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .crypto import SigningKey, VerifyKey
from .data import ArrayDataset
from .errors import ConfigError, ErrorCode, QflareError, TrainingError, error_from_code
from .federation import FederationSpec
from .memory import release_free_memory, tune_heap
from .models import create_model
from .plugins import load_plugins
from .protocol import Device
from .protocol.device import SignedUpdate
from .protocol.messages import Route
from .training import LocalTrainer, TrainResult, client_seed
from .wire import ParamLayout

__all__ = ["DeviceHost", "HostStats", "Item", "process_rss"]

# What crosses between driver and host.  Into an operation: ("start", op, *args), ("reply", bytes) or
# ("fail", code, message).  Out of it: ("request", route, body, session_id), ("done", value) or
# ("error", code, message).
Item = tuple[Any, ...]


@dataclass(frozen=True)
class HostStats:
    """A device host's process, as it reports itself."""

    devices: int
    rss_bytes: int
    """Resident set of the host's process now (Linux: from /proc/self/statm)."""
    max_rss_bytes: int
    malloc_arena_max: str | None = None
    """``MALLOC_ARENA_MAX`` in the host's environment (what glibc read as the process started)."""


def process_rss() -> int:
    """This process's resident set now, in bytes (Linux: /proc/self/statm; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class _Operation:
    """One device operation on its own thread; its transport exchanges items with :meth:`DeviceHost.step`."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.inbox: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True, name="qflare-device-op")

    def start(self) -> None:
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self.outbox.put(("done", target()))
        except QflareError as exc:
            self.outbox.put(("error", str(exc.code), exc.message))
        except Exception as exc:  # a bug or a torch failure: typed, with its cause, for the driver
            self.outbox.put(("error", ErrorCode.DEVICE_HOST_FAILED.value, f"{type(exc).__name__}: {exc}"))

    def request(self, route: Route, body: bytes, session_id: str | None) -> bytes:
        self.outbox.put(("request", route, body, session_id))
        answer = self.inbox.get()
        if answer[0] == "fail":
            raise error_from_code(str(answer[1]), str(answer[2]))
        return bytes(answer[1])


class _Relay:
    """A device's transport inside a host: the request goes to whichever operation the device runs now."""

    def __init__(self, ops: dict[int, _Operation], index: int) -> None:
        self._ops, self._index = ops, index

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        return self._ops[self._index].request(route, body, session_id)


class DeviceHost:
    """A Ray actor's body: some of the federation's devices, their shards, and one trainer for them all."""

    def __init__(
        self,
        spec: FederationSpec,
        layout: ParamLayout,
        server_key: bytes,
        train: ArrayDataset,
        shards: dict[int, np.ndarray],
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        tune_heap()  # free pages go back to the system after each operation (release_free_memory)
        load_plugins()  # the model may come from a plugin, as in the driver
        self._spec, self._layout, self._train, self._shards = spec, layout, train, shards
        self._server_key = VerifyKey.from_bytes(spec.suite.sig, server_key)
        self._trainer: LocalTrainer | None = None
        self._devices: dict[int, Device] = {}
        self._prepared: dict[int, SignedUpdate] = {}
        self._ops: dict[int, _Operation] = {}

    # ------------------------------------------------------------------ the pump
    def step(self, items: list[tuple[int, Item]]) -> list[tuple[int, Item]]:
        """Start or resume each device's operation and return where each one stopped next."""
        out: list[tuple[int, Item]] = []
        for i, item in items:
            if item[0] == "start":
                op = self._ops[i] = _Operation(self._target(i, str(item[1]), item[2:]))
                op.start()  # registered first: its transport finds it
            else:
                op = self._ops[i]
                op.inbox.put(item)
            msg = op.outbox.get()
            if msg[0] != "request":
                del self._ops[i]
                release_free_memory()
            out.append((i, msg))
        return out

    def stats(self) -> HostStats:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return HostStats(len(self._devices), process_rss(), peak, os.environ.get("MALLOC_ARENA_MAX"))

    # ------------------------------------------------------------------ the operations
    def _target(self, i: int, op: str, args: tuple[Any, ...]) -> Callable[[], Any]:
        if op == "enroll":
            return lambda: self._enroll(i, str(args[0]))
        if op == "work":
            return lambda: self._work(i)
        if op == "submit":
            return lambda: self._submit(i)
        raise ConfigError(f"unknown device operation {op!r}")

    def _enroll(self, i: int, token: str) -> str:
        dev = Device(
            transport=_Relay(self._ops, i),
            identity=SigningKey.generate(self._spec.suite.sig),
            server_key=self._server_key,
            layout=self._layout,
            suite=self._spec.suite,
        )
        dev.enroll(token)
        dev.connect()
        self._devices[i] = dev
        return dev.device_id

    def _work(self, i: int) -> TrainResult:
        dev = self._devices[i]
        task = dev.task()
        gm = dev.fetch_model(task)
        idx = torch.from_numpy(self._shards[i])
        x, y = self._train.normalized(idx), self._train.labels[idx]
        result = self._get_trainer().train(gm.flat, x, y, seed=client_seed(self._spec.seed, task.round, i))
        self._prepared[i] = dev.prepare_update(task, gm, result)
        result.delta = torch.empty(0)  # the driver needs the numbers, not the update (the device sends it)
        return result

    def _submit(self, i: int) -> str:
        prepared = self._prepared.pop(i)
        receipt = self._devices[i].submit(prepared)
        if receipt.update_hash != prepared.update_hash or receipt.round != prepared.round:
            raise TrainingError(f"device {i}'s receipt acknowledges another update", code="device_host_failed")
        return receipt.update_hash

    def _get_trainer(self) -> LocalTrainer:
        if self._trainer is None:
            model = create_model(self._spec.model, self._train.input_shape, self._train.num_classes)
            self._trainer = LocalTrainer(model, self._spec.train, self._layout)
        return self._trainer
