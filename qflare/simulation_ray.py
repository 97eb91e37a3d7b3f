"""The simulation's devices in Ray actors: ``qflare simulate --backend ray``.

The coordinator stays in the driver (:class:`~qflare.simulation.CoordinatorSide`: the same Coordinator,
scratch database, rounds and ledger as the thread backend).  The devices live in a few long-lived Ray
actors, *device hosts*: host ``k`` owns devices ``i`` with ``i % hosts == k`` - each one a real
:class:`~qflare.protocol.Device` with its own ML-DSA identity and post-quantum session - and trains them
itself, on its own model instance, with the seeds and shards the thread backend uses.

How their bytes travel: a device's protocol code is synchronous (``transport.request(route, body)``
returns the coordinator's answer), so each operation (enroll and connect, a round's work, a submission)
runs on a thread inside the host, whose transport hands each request out of the actor and waits.  The
driver pumps: :meth:`DeviceHost.step` returns the requests the operations have reached, the driver
passes each to :meth:`Coordinator.handle` - exactly the call the in-process transport makes, with the
same bytes - and the next ``step`` carries the answers (or the coordinator's refusal, rebuilt as its
typed error on the device side) back in.  Requests are relayed in device index order at every step, so
devices enroll in index order and the coordinator's seeded selection draws the same devices as with
the thread backend: for one seed, the models are bit-identical to the thread backend's (one torch
thread per training, as the thread backend's pool uses).

Ray is optional (``pip install 'qflare[ray]'``); without it :func:`ray_federation` raises a
ConfigError naming the extra.  A local Ray is started on demand with a small footprint (``num_cpus``
as asked, no dashboard, a capped object store) and shut down at the end; with ``address`` an existing
cluster is joined (qflare and the data set must be importable and loadable on its nodes).  A host that
dies or fails outside the protocol surfaces as a ``device_host_failed`` TrainingError.

Not built: attacks (the attackers' training lives in the driver) and FLTrust's root data, GPU actors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .crypto import SigningKey, VerifyKey
from .data import ArrayDataset, load_dataset
from .errors import ConfigError, ErrorCode, QflareError, TrainingError, error_from_code
from .federation import FederationSpec
from .memory import release_free_memory, tune_heap
from .models import create_model
from .plugins import load_plugins
from .protocol import Device
from .protocol.device import SignedUpdate
from .protocol.messages import Route
from .simulation import CoordinatorSide, FederationFactory, SimulationConfig
from .training import LocalTrainer, TrainResult, client_seed
from .wire import ParamLayout

__all__ = ["DeviceHost", "HostStats", "RayFederation", "RayOptions", "ray_federation", "require_ray"]

_INSTALL = "pip install 'qflare[ray]'"
_INLINE = 256 * 1024 * 1024
"""Call arguments and results up to this size travel inline (a local Ray): no object-store copies."""
_ENROLL_WAVE = 64
"""Devices per host whose enrollments run in one pump (their threads wait in the host meanwhile)."""

# What crosses between driver and host.  Into an operation: ("start", op, *args), ("reply", bytes) or
# ("fail", code, message).  Out of it: ("request", route, body, session_id), ("done", value) or
# ("error", code, message).
Item = tuple[Any, ...]


def require_ray() -> ModuleType:
    """The ``ray`` module, or a ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--backend ray needs Ray, which is not installed: {_INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where the device hosts run and how many there are."""

    address: str | None = None
    """An existing Ray cluster (``ray://host:10001`` or ``host:6379``); None starts a local Ray."""
    hosts: int = 0
    """Device-host actors; 0 = one per CPU Ray offers (one CPU each)."""
    object_store_mb: int = 128
    """The local Ray's object store (models and updates in flight); ignored with ``address``."""

    def __post_init__(self) -> None:
        if self.hosts < 0:
            raise ConfigError(f"the Ray backend's hosts must be >= 0, got {self.hosts}")
        if self.object_store_mb < 80:
            raise ConfigError(f"the Ray object store needs at least 80 MB, got {self.object_store_mb}")


@dataclass(frozen=True)
class HostStats:
    """A device host's process, as it reports itself."""

    devices: int
    rss_bytes: int
    """Resident set of the host's process now (Linux: from /proc/self/statm)."""
    max_rss_bytes: int


def _rss() -> int:
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
        return HostStats(len(self._devices), _rss(), peak)

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


@dataclass(frozen=True)
class _Prepared:
    """What ``work`` hands the driver for ``submit``: the update stays with its device in the host."""

    device: int


class RayFederation(CoordinatorSide):
    """``run_simulation``'s backend with the devices in Ray actors (see the module docstring)."""

    def __init__(self, cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor, options: RayOptions) -> None:
        ray = self._ray = require_ray()
        spec = cfg.federation
        if cfg.attack is not None:
            raise ConfigError("--backend ray cannot simulate attacks (--attack): use --backend thread")
        if not cfg.protocol:
            raise ConfigError("--backend ray always runs the protocol: --no-protocol needs --backend thread")
        if spec.train.device != "cpu":
            raise ConfigError(f"--backend ray trains on CPU only, got --device {spec.train.device}")
        if spec.secure_aggregation:
            raise ConfigError("--backend ray does not run secure aggregation yet: use --backend thread")
        super().__init__(cfg, layout, initial)  # no root data: FLTrust is refused with no_root_data
        self._started = False
        self._hosts: list[Any] = []
        self.spawn_stats: list[HostStats] = []
        self.enroll_s = 0.0
        self.final_stats: list[HostStats] = []
        """The hosts' processes when the federation closed (their peak RSS covers the rounds)."""
        try:
            self._start(ray, options)
            self._spawn(ray, cfg, layout, options)
            self.spawn_stats = self.host_stats()  # started (data set and shards loaded), no device enrolled
            t0 = time.perf_counter()
            self._enroll_all(spec)
            self.enroll_s = time.perf_counter() - t0
            """Enrolling and connecting every device: keys, enrollment, handshake (ML-DSA, ML-KEM)."""
        except BaseException:
            self._stop()
            self.discard()
            raise
        self.driver_threads = 2 * len(self._hosts)
        """Two devices queued per host: a host starts its next device while the driver relays the last one's."""
        self.backend_info: dict[str, Any] = {"backend": "ray", "ray_hosts": len(self._hosts)}

    # ------------------------------------------------------------------ start-up
    def _start(self, ray: ModuleType, options: RayOptions) -> None:
        if ray.is_initialized():
            return
        try:
            if options.address is not None:
                ray.init(address=options.address, log_to_driver=False, configure_logging=False)
            else:
                cpus = options.hosts or (os.cpu_count() or 1)
                ray.init(
                    num_cpus=cpus,
                    include_dashboard=False,
                    object_store_memory=options.object_store_mb * 1024 * 1024,
                    log_to_driver=False,
                    configure_logging=False,
                    # Models and a host's share of the data travel in the calls themselves, not through the
                    # shared-memory object store (whose pages every process that maps them counts as resident).
                    _system_config={"max_direct_call_object_size": _INLINE, "task_rpc_inlined_bytes_limit": _INLINE},
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = options.address or "a local Ray"
            raise ConfigError(f"--backend ray could not start or reach {where}: {exc}") from None
        self._started = True

    def _spawn(self, ray: ModuleType, cfg: SimulationConfig, layout: ParamLayout, options: RayOptions) -> None:
        spec = cfg.federation
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if options.hosts > cpus or cpus < 1:  # each host takes one CPU: the rest would wait for one forever
            need = max(options.hosts, 1)
            raise ConfigError(f"{need} device host(s) (--workers) need as many CPUs; the Ray cluster has {cpus}")
        hosts = min(spec.devices, options.hosts or max(1, cpus))
        train = load_dataset(spec.dataset, "train", root=spec.data_root)
        parts = spec.partitions(train.labels.numpy())
        # Two malloc arenas from the process's start (Ray's own threads included): with glibc's default of
        # 8 per core, a host's resident size grew by ~250 MB over 4 fmnist-dir05 rounds; with 2 it stays flat.
        actor = ray.remote(num_cpus=1, max_restarts=0, runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2"}})(DeviceHost)
        raw = self.coordinator.public_key.raw
        for k in range(hosts):
            data, shards = _host_share(train, {i: parts[i] for i in range(k, spec.devices, hosts)})
            self._hosts.append(actor.remote(spec, layout, raw, data, shards))

    def _enroll_all(self, spec: FederationSpec) -> None:
        tokens = self.coordinator.create_tokens(spec.devices, ttl_s=3600, label="simulation")
        wave = _ENROLL_WAVE * len(self._hosts)
        for lo in range(0, spec.devices, wave):
            ids = self._drive({i: ("start", "enroll", tokens[i]) for i in range(lo, min(lo + wave, spec.devices))})
            self.index.update({str(ids[i]): i for i in sorted(ids)})

    # ------------------------------------------------------------------ the pump, driver side
    def _drive(self, items: dict[int, Item]) -> dict[int, Any]:
        """Run each device's operation to its end: the hosts step in parallel; the driver relays the
        requests they reach to the coordinator in device index order; a refusal ends the run typed."""
        done: dict[int, Any] = {}
        while items:
            calls = []
            for k, host in enumerate(self._hosts):
                mine = [(i, item) for i, item in sorted(items.items()) if i % len(self._hosts) == k]
                if mine:
                    calls.append((k, host.step.remote(mine)))
            reached: dict[int, Item] = {}
            for k, ref in calls:
                reached.update(self._get(k, ref))
            items = {}
            for i in sorted(reached):
                msg = reached[i]
                if msg[0] == "request":
                    items[i] = self._relay(msg)
                elif msg[0] == "done":
                    done[i] = msg[1]
                else:
                    raise error_from_code(str(msg[1]), f"device {i}: {msg[2]}")
        return done

    def _relay(self, msg: Item) -> Item:
        _, route, body, session_id = msg
        try:
            return ("reply", self.coordinator.handle(route, body, session_id=session_id, remote="ray"))
        except QflareError as exc:  # what the in-process transport would raise in the device
            return ("fail", str(exc.code), exc.message)

    def _get(self, k: int, ref: Any) -> list[tuple[int, Item]]:
        ray = self._ray
        try:
            return list(ray.get(ref))
        except ray.exceptions.RayActorError as exc:
            raise TrainingError(f"device host {k} (a Ray actor) died: {exc}", code="device_host_failed") from None
        except ray.exceptions.RayError as exc:
            raise TrainingError(f"device host {k} (a Ray actor) failed: {exc}", code="device_host_failed") from None

    # ------------------------------------------------------------------ Federation protocol
    def work(self, i: int, train: Callable[[torch.Tensor, int], TrainResult]) -> tuple[Any, TrainResult]:
        result = self._drive({i: ("start", "work")})[i]
        assert isinstance(result, TrainResult)
        return _Prepared(i), result

    def submit(self, i: int, prepared: Any) -> None:
        assert isinstance(prepared, _Prepared) and prepared.device == i
        self._drive({i: ("start", "submit")})

    def host_stats(self) -> list[HostStats]:
        """Each device host's process, as it reports itself."""
        return [self._ray.get(host.stats.remote()) for host in self._hosts]

    def close(self) -> None:
        try:
            super().close()
            with contextlib.suppress(self._ray.exceptions.RayError):  # a dead host has no figures
                self.final_stats = self.host_stats()
        finally:
            self._stop()

    def _stop(self) -> None:
        for host in self._hosts:
            self._ray.kill(host)
        self._hosts = []
        if self._started:
            self._ray.shutdown()
            self._started = False


def _host_share(train: ArrayDataset, parts: dict[int, np.ndarray]) -> tuple[ArrayDataset, dict[int, np.ndarray]]:
    """Only the examples of a host's devices, and each device's shard as positions into them (the same
    examples in the same order: the same normalised inputs as in the driver)."""
    order = sorted(parts)
    cat = torch.from_numpy(np.concatenate([parts[i] for i in order]) if order else np.zeros(0, dtype=np.int64))
    share = dataclasses.replace(train, images=train.images[cat].contiguous(), labels=train.labels[cat].contiguous())
    bounds = np.cumsum([0, *(len(parts[i]) for i in order)])
    return share, {i: np.arange(bounds[n], bounds[n + 1]) for n, i in enumerate(order)}


def ray_federation(options: RayOptions | None = None) -> FederationFactory:
    """A ``run_simulation(federation=...)`` factory for the Ray backend; checks that Ray is installed now."""
    require_ray()
    opts = options or RayOptions()

    def factory(cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor) -> RayFederation:
        return RayFederation(cfg, layout, initial, opts)

    return factory
