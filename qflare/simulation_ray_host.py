"""The Ray backend's device hosts: the actor body that runs some of a federation's devices.

:class:`DeviceHost` owns devices ``i`` with ``i % hosts == k`` - each a real
:class:`~qflare.protocol.Device` with its own ML-DSA identity and post-quantum session - and has one
trainer.  Each device operation that talks to the coordinator (enroll and connect, fetch the round's
model, submit the update) runs on a thread whose transport hands each request out;
:meth:`DeviceHost.step` returns the requests the operations have reached and resumes them with the
driver's answers (see :mod:`qflare.simulation_ray`, which drives it).  Training and evaluation are apart
from the protocol, in the actor's ``train`` concurrency group (one thread, beside the default group's
``step``): :meth:`DeviceHost.train_own` trains one of the host's own devices on the model it fetched and
signs the update, :meth:`DeviceHost.train_for` trains any device of the federation on a model the driver
sends (its own host then signs the delta: :meth:`DeviceHost.prepare`), :meth:`DeviceHost.evaluate`
evaluates a global model on a chunk of the test set; the driver balances a round's trainings and
evaluation over the hosts.  A host keeps the test set, not the training set: each training call carries
the device's shard.  This module imports only what a host needs: Ray starts the hosts' processes by
importing it.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .crypto import SigningKey, VerifyKey
from .data import ArrayDataset
from .errors import ConfigError, ErrorCode, QflareError, TrainingError, error_from_code
from .federation import FederationSpec
from .memory import release_free_memory, tune_heap
from .models import create_model
from .plugins import load_plugins
from .precision import resolve_precision
from .protocol import Device
from .protocol.device import GlobalModel, SignedUpdate
from .protocol.messages import Route, TaskInfo
from .training import LocalTrainer, TrainResult, evaluate
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


def _outcome(target: Callable[[], Any]) -> Item:
    """("done", what ``target`` returned) or ("error", code, message): how a host reports every outcome."""
    try:
        return ("done", target())
    except QflareError as exc:
        return ("error", str(exc.code), exc.message)
    except Exception as exc:  # a bug or a torch failure: typed, with its cause, for the driver
        return ("error", ErrorCode.DEVICE_HOST_FAILED.value, f"{type(exc).__name__}: {exc}")


class _Operation:
    """One device operation on its own thread; its transport exchanges items with :meth:`DeviceHost.step`."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.inbox: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True, name="qflare-device-op")

    def start(self) -> None:
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        self.outbox.put(_outcome(target))

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
    """A Ray actor's body: some of the federation's devices and one trainer (see the module docstring)."""

    def __init__(
        self, spec: FederationSpec, layout: ParamLayout, server_key: bytes, test: ArrayDataset, threads: int = 1
    ) -> None:
        torch.set_num_threads(threads)
        tune_heap()  # free pages go back to the system after each operation (release_free_memory)
        load_plugins()  # the model may come from a plugin, as in the driver
        self._spec, self._layout, self._test = spec, layout, test
        self._precision = resolve_precision(spec.train.precision, "cpu")
        self._server_key = VerifyKey.from_bytes(spec.suite.sig, server_key)
        self._trainer: LocalTrainer | None = None
        self._eval_model: torch.nn.Module | None = None
        self._devices: dict[int, Device] = {}
        self._fetched: dict[int, tuple[TaskInfo, GlobalModel]] = {}
        self._prepared: dict[int, SignedUpdate] = {}
        self._ops: dict[int, _Operation] = {}

    # ------------------------------------------------------------------ the pump (default group)
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

    # ------------------------------------------------------------------ training ("train" group)
    def train_own(self, i: int, shard: ArrayDataset, seed: int) -> Item:
        """Train device ``i`` of this host on the model it fetched and sign the update, which stays here
        until it is submitted: ("done", the result without its delta) or ("error", code, message)."""

        def own() -> TrainResult:
            result = self._train(self._fetched[i][1].flat, shard, seed)
            self._prepare(i, result)
            return dataclasses.replace(result, delta=torch.empty(0))

        return _outcome(own)

    def train_for(self, shard: ArrayDataset, flat: torch.Tensor, seed: int) -> Item:
        """Train another host's device: its shard, the model it fetched (sent by the driver), its seed:
        ("done", the result with its delta) or ("error", code, message)."""
        return _outcome(lambda: self._train(flat, shard, seed))

    def evaluate(self, flat: torch.Tensor, lo: int, hi: int) -> Item:
        """The model ``flat`` on test examples ``lo:hi``: ("done", (mean loss, accuracy)) or ("error", ...);
        the numbers the driver's own evaluation gives (same inputs, kernels and precision)."""

        def run() -> tuple[float, float]:
            test = self._test
            if self._eval_model is None:
                self._eval_model = create_model(self._spec.model, test.input_shape, test.num_classes)
            self._layout.load_into(self._eval_model, flat)
            x, y = test.normalized(slice(lo, hi)), test.labels[lo:hi]
            return evaluate(
                self._eval_model, x, y, channels_last=self._spec.train.channels_last, precision=self._precision
            )

        return _outcome(run)

    def _train(self, flat: torch.Tensor, shard: ArrayDataset, seed: int) -> TrainResult:
        if self._trainer is None:
            model = create_model(self._spec.model, shard.input_shape, shard.num_classes)
            self._trainer = LocalTrainer(model, self._spec.train, self._layout)
        try:
            return self._trainer.train(flat, shard.normalized(), shard.labels, seed=seed)
        finally:
            release_free_memory()

    def prepare(self, i: int, result: TrainResult) -> Item:
        """Sign the update of device ``i`` that another host trained (``train_for``); it stays here until it
        is submitted: ("done", None) or ("error", code, message)."""
        return _outcome(lambda: self._prepare(i, result))

    # ------------------------------------------------------------------ the operations
    def _target(self, i: int, op: str, args: tuple[Any, ...]) -> Callable[[], Any]:
        if op == "enroll":
            return lambda: self._enroll(i, str(args[0]))
        if op == "fetch":
            return lambda: self._fetch(i)
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

    def _fetch(self, i: int) -> tuple[int, str]:
        """The device asks for its task and fetches (and verifies) the model it names: (round, model hash)."""
        dev = self._devices[i]
        task = dev.task()
        gm = dev.fetch_model(task)
        self._fetched[i] = (task, gm)
        return task.round, gm.sha256

    def _prepare(self, i: int, result: TrainResult) -> None:
        """Serialise and sign the update of the training ``result`` on the model device ``i`` fetched."""
        task, gm = self._fetched.pop(i)
        self._prepared[i] = self._devices[i].prepare_update(task, gm, result)

    def _submit(self, i: int) -> str:
        """Submit the signed update; the receipt must acknowledge it."""
        prepared = self._prepared.pop(i)
        receipt = self._devices[i].submit(prepared)
        if receipt.update_hash != prepared.update_hash or receipt.round != prepared.round:
            raise TrainingError(f"device {i}'s receipt acknowledges another update", code="device_host_failed")
        return receipt.update_hash
