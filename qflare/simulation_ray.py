"""The simulation's devices in Ray actors: ``qflare simulate --backend ray``.

The coordinator stays in the driver (:class:`~qflare.simulation.CoordinatorSide`: the same Coordinator,
scratch database, rounds and ledger as the thread backend).  The devices live in a few long-lived Ray
actors, *device hosts*: host ``k`` owns devices ``i`` with ``i % hosts == k`` - each one a real
:class:`~qflare.protocol.Device` with its own ML-DSA identity and post-quantum session.

A round's work for device ``i``: its host fetches the task and the signed model (protocol); the
training then runs on whichever host has its training slot free first - its own host when that one is
free (the model stays there), another host otherwise (*stealing*: the driver sends the device's shard
and the model, identified by the SHA-256 the device verified, and gets the delta back); its own host
then signs the update and keeps it until the simulation submits, in selection order.  Each global
model's evaluation chunks go through the same slots, so the hosts do the training and evaluation and
the driver the coordinator's work.  The driver holds the training set and sends each training its
device's shard (uint8, as the thread backend slices it); the hosts hold the test set and compute in the
precision the driver resolved.  A training's seed and inputs do not depend on the host, so where it ran
does not change a bit (``ray_trained_elsewhere`` in the run's config counts the moves; it depends on
timing, the models do not).  (Without stealing, the busier host set a round's pace: with seed 0 on fmnist-dir05
one of two hosts held 6.2 of a round's 10 devices on average.)

How their bytes travel: a device's protocol code is synchronous (``transport.request(route, body)``
returns the coordinator's answer), so each operation (enroll and connect, fetch, submit)
runs on a thread inside the host, whose transport hands each request out of the actor and waits.  The
driver pumps: :meth:`DeviceHost.step` returns the requests the operations have reached, the driver
passes each to :meth:`Coordinator.handle` - exactly the call the in-process transport makes, with the
same bytes - and the next ``step`` carries the answers (or the coordinator's refusal, rebuilt as its
typed error on the device side) back in.  Requests are relayed in device index order at every step, so
devices enroll in index order and the coordinator's seeded selection draws the same devices as with
the thread backend: for one seed, the models are bit-identical to the thread backend's (one torch
thread per training, as the thread backend's pool uses).  Enrollment is pipelined: two lanes of steps
alternate, so the hosts run the devices' side of enrollment and handshake (key generation, proof of
possession, the client's handshake) while the driver relays the other lane's requests; the
coordinator still receives the enrollment requests in device index order.

Ray is optional (``pip install 'qflare[ray]'``); without it :func:`ray_federation` raises a
ConfigError naming the extra.  A local Ray is started on demand with a small footprint (``num_cpus``
as asked, no dashboard, a capped object store, two malloc arenas per process) and shut down at the
end; with ``address`` an existing cluster is joined (qflare must be importable on its nodes; the data
travels from the driver).  A host that dies or fails outside the protocol surfaces as a
``device_host_failed`` TrainingError.  The hosts' code is :mod:`qflare.simulation_ray_host`.

Not built: attacks (the attackers' training lives in the driver) and FLTrust's root data, GPU actors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .data import ArrayDataset, load_dataset
from .errors import ConfigError, QflareError, TrainingError, error_from_code
from .federation import FederationSpec
from .precision import resolve_precision
from .simulation import CoordinatorSide, FederationFactory, SimulationConfig
from .simulation_ray_host import DeviceHost, HostStats, Item, process_rss
from .training import TrainResult, client_seed
from .wire import ParamLayout

__all__ = ["DeviceHost", "HostStats", "RayFederation", "RayOptions", "ray_federation", "require_ray"]

_INSTALL = "pip install 'qflare[ray]'"
_INLINE = 256 * 1024 * 1024
"""Call arguments and results up to this size travel inline (a local Ray): no object-store copies (a model
under evaluation is the exception: put in the object store once for all its chunks)."""
_ENROLL_CHUNK = 16
"""Devices per host that start enrolling at each step of an enrollment lane (see ``_enroll_all``)."""
_LANES = 2
"""Enrollment steps in flight: the hosts run one lane's step while the driver relays the other's requests."""

_HOST_ENV = {"MALLOC_ARENA_MAX": "2"}
"""The hosts' environment.  Two malloc arenas from the process's start (Ray's own threads included): with
glibc's default of 8 per core, a host's resident size grew by ~250 MB over 4 fmnist-dir05 rounds; with 2
it stays flat."""


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


class _TrainingSlots:
    """One training slot per host; a device takes its own host's slot when it is free, any free one
    otherwise (when it may be trained elsewhere), and waits for one when none is."""

    def __init__(self, hosts: int) -> None:
        self._free = set(range(hosts))
        self._cond = threading.Condition()
        self.elsewhere = 0
        """Slots given to a device on another host than its own."""

    def acquire(self, own: int | None, *, anywhere: bool) -> int:
        """A free slot: ``own``'s when free, else (``anywhere``) the lowest free one; waits for one."""
        with self._cond:
            while True:
                if own in self._free:
                    self._free.remove(own)
                    return own
                if anywhere and self._free:
                    k = min(self._free)
                    self._free.remove(k)
                    self.elsewhere += own is not None
                    return k
                self._cond.wait()

    def release(self, k: int) -> None:
        with self._cond:
            self._free.add(k)
            self._cond.notify_all()


@dataclass
class _Prepared:
    """What ``work`` hands the driver for ``submit``: the signed update stays with its device in the host."""

    device: int
    submitted: bool = False


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
        self._env_inherited = False
        """True when this federation started a local Ray with the hosts' environment (``_HOST_ENV``)."""
        self._hosts: list[Any] = []
        self._seed = spec.seed
        self._train_set: ArrayDataset | None = None
        self._parts: list[np.ndarray] = []
        self._slots = _TrainingSlots(0)
        self._eval_lock = threading.Lock()
        self._eval_model: tuple[torch.Tensor, Any] | None = None
        """The model being evaluated and its copy in Ray's object store (one copy for all its chunks)."""
        self.spawn_stats: list[HostStats] = []
        self.driver_rss_spawned = 0
        """The driver's resident set once the hosts started, before any device enrolled."""
        self.ray_init_s = 0.0
        """Starting (or joining) Ray."""
        self.hosts_start_s = 0.0
        """Starting the device hosts until each answers (their processes import torch, get their data)."""
        self.enroll_s = 0.0
        """Enrolling and connecting every device: keys, enrollment, handshake (ML-DSA, ML-KEM)."""
        self.final_stats: list[HostStats] = []
        """The hosts' processes when the federation closed (their peak RSS covers the rounds)."""
        try:
            t0 = time.perf_counter()
            self._start(ray, options)
            t1 = time.perf_counter()
            self._spawn(ray, cfg, layout, options)
            self.spawn_stats = self.host_stats()  # started (the test set loaded), no device enrolled
            t2 = time.perf_counter()
            self.driver_rss_spawned = process_rss()
            self._enroll_all(spec)
            self.ray_init_s, self.hosts_start_s, self.enroll_s = t1 - t0, t2 - t1, time.perf_counter() - t2
        except BaseException:
            self._stop()
            self.discard()
            raise
        self.driver_threads = 2 * len(self._hosts)
        """Two devices queued per host: a host starts its next device while the driver relays the last one's."""
        self.backend_info: dict[str, Any] = {
            "backend": "ray",
            "ray_hosts": len(self._hosts),
            "ray_trained_elsewhere": 0,
        }
        """Recorded in the result's config; ``ray_trained_elsewhere``: trainings that ran on another host than
        their device's (updated as each round opens and at the end)."""

    def open_round(self) -> tuple[int, list[int]] | None:
        self.backend_info["ray_trained_elsewhere"] = self._slots.elsewhere  # no training in flight now
        return super().open_round()

    # ------------------------------------------------------------------ start-up
    def _start(self, ray: ModuleType, options: RayOptions) -> None:
        if ray.is_initialized():
            return
        try:
            if options.address is not None:
                ray.init(address=options.address, log_to_driver=False, configure_logging=False)
            else:
                cpus = options.hosts or (os.cpu_count() or 1)
                # The local Ray's processes inherit the hosts' environment: the hosts then need no runtime
                # environment of their own, and Ray starts them in the workers it has already started.
                with _environ(_HOST_ENV):
                    ray.init(
                        num_cpus=cpus,
                        include_dashboard=False,
                        object_store_memory=options.object_store_mb * 1024 * 1024,
                        log_to_driver=False,
                        configure_logging=False,
                        # Models, shards and deltas travel in the calls themselves, not through the
                        # shared-memory object store (whose pages every process that maps them counts as resident).
                        _system_config={
                            "max_direct_call_object_size": _INLINE,
                            "task_rpc_inlined_bytes_limit": _INLINE,
                        },
                    )
                self._env_inherited = True
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
        self._train_set = load_dataset(spec.dataset, "train", root=spec.data_root)
        self._parts = spec.partitions(self._train_set.labels.numpy())
        # A Ray this federation did not start (a cluster, or one already up) gets the hosts' environment as a
        # runtime environment: Ray then starts the hosts in workers of their own (slower to start).
        env = None if self._env_inherited else {"env_vars": _HOST_ENV}
        # Two concurrency groups of one thread each: the protocol's steps (default) and training ("train").
        groups = {"train": 1}
        actor = ray.remote(num_cpus=1, max_restarts=0, runtime_env=env, concurrency_groups=groups)(DeviceHost)
        raw = self.coordinator.public_key.raw
        test = load_dataset(spec.dataset, "test", root=spec.data_root)
        # Every host computes in the precision the driver resolves (one answer for "auto" on a mixed cluster).
        resolved = resolve_precision(spec.train.precision, "cpu").name
        host_spec = spec.replace(train=dataclasses.replace(spec.train, precision=resolved))
        self._hosts = [actor.remote(host_spec, layout, raw, test) for _ in range(hosts)]
        self._slots = _TrainingSlots(hosts)

    def _enroll_all(self, spec: FederationSpec) -> None:
        """Enroll and connect every device, pipelined: two lanes of steps alternate, so the hosts run one
        lane's client side (keys, proof of possession, handshakes) while the driver relays the other
        lane's requests to the coordinator.  Each lane step starts the next ``_ENROLL_CHUNK`` devices per
        host, and a lane's results are relayed in device index order before the other lane's; a device's
        enrollment request reaches the coordinator in the turn right after it started, so the
        coordinator sees the enrollments in device index order, as with the thread backend."""
        tokens = self.coordinator.create_tokens(spec.devices, ttl_s=3600, label="simulation")
        chunk = _ENROLL_CHUNK * len(self._hosts)
        started = 0
        ids: dict[int, Any] = {}
        in_flight: list[list[tuple[int, Any]]] = [[] for _ in range(_LANES)]
        while started < spec.devices or any(in_flight):
            for lane, calls in enumerate(in_flight):
                items = self._answer(self._collect(calls), ids) if calls else {}
                end = min(started + chunk, spec.devices)
                items.update({i: ("start", "enroll", tokens[i]) for i in range(started, end)})
                started = end
                in_flight[lane] = self._send(items)
        self.index.update({str(ids[i]): i for i in sorted(ids)})

    # ------------------------------------------------------------------ the pump, driver side
    def _drive(self, items: dict[int, Item]) -> dict[int, Any]:
        """Run each device's operation to its end: the hosts step in parallel; the driver relays the
        requests they reach to the coordinator in device index order; a refusal ends the run typed."""
        done: dict[int, Any] = {}
        while items:
            items = self._answer(self._collect(self._send(items)), done)
        return done

    def _send(self, items: dict[int, Item]) -> list[tuple[int, Any]]:
        """One ``step`` call per host that has items, each host's in device index order: (host, its call)."""
        mine: list[list[tuple[int, Item]]] = [[] for _ in self._hosts]
        for i in sorted(items):
            mine[i % len(self._hosts)].append((i, items[i]))
        return [(k, self._hosts[k].step.remote(share)) for k, share in enumerate(mine) if share]

    def _collect(self, calls: list[tuple[int, Any]]) -> dict[int, Item]:
        reached: dict[int, Item] = {}
        for k, ref in calls:
            reached.update(list(self._get(k, ref)))
        return reached

    def _answer(self, reached: dict[int, Item], done: dict[int, Any]) -> dict[int, Item]:
        """Relay the requests reached to the coordinator in device index order (their answers are the next
        items); keep what the finished operations returned in ``done``; a failed operation raises typed."""
        items: dict[int, Item] = {}
        for i in sorted(reached):
            msg = reached[i]
            if msg[0] == "request":
                items[i] = self._relay(msg)
            elif msg[0] == "done":
                done[i] = msg[1]
            else:
                raise error_from_code(str(msg[1]), f"device {i}: {msg[2]}")
        return items

    def _relay(self, msg: Item) -> Item:
        _, route, body, session_id = msg
        try:
            return ("reply", self.coordinator.handle(route, body, session_id=session_id, remote="ray"))
        except QflareError as exc:  # what the in-process transport would raise in the device
            return ("fail", str(exc.code), exc.message)

    def _put(self, value: Any) -> Any:
        ray = self._ray
        try:
            return ray.put(value)
        except ray.exceptions.RayError as exc:  # e.g. the object store full
            raise TrainingError(f"Ray's object store refused a model: {exc}", code="device_host_failed") from None

    def _get(self, k: int, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise TrainingError(f"device host {k} (a Ray actor) died: {exc}", code="device_host_failed") from None
        except ray.exceptions.RayError as exc:
            raise TrainingError(f"device host {k} (a Ray actor) failed: {exc}", code="device_host_failed") from None

    # ------------------------------------------------------------------ Federation protocol
    def work(self, i: int, train: Callable[[torch.Tensor, int], TrainResult]) -> tuple[Any, TrainResult]:
        rnd, sha = self._drive({i: ("start", "fetch")})[i]
        shard = self._shard(i)
        seed = client_seed(self._seed, rnd, i)
        own = i % len(self._hosts)
        current = self.coordinator.rounds.model
        flat = current.flat if current.sha256 == sha else None  # the model the device verified, or stay home
        k = self._slots.acquire(own, anywhere=flat is not None)
        try:
            if k == own:  # trained and signed in its own host, where the update stays until submitted
                result = self._outcome(
                    k, i, self._hosts[k].train_own.options(concurrency_group="train").remote(i, shard, seed)
                )
            else:  # trained elsewhere; its own host signs the delta and keeps the update
                remote = self._hosts[k].train_for.options(concurrency_group="train").remote(shard, flat, seed)
                result = self._outcome(k, i, remote)
        finally:
            self._slots.release(k)
        if k != own:
            self._outcome(own, i, self._hosts[own].prepare.remote(i, result))
        assert isinstance(result, TrainResult)
        result.delta = torch.empty(0)  # the device's update is in its host, signed
        return _Prepared(i), result

    def evaluate_chunk(self, flat: torch.Tensor, lo: int, hi: int) -> tuple[float, float]:
        """Evaluate ``flat`` on test examples ``lo:hi`` on the first host with a free slot."""
        with self._eval_lock:
            if self._eval_model is None or self._eval_model[0] is not flat:
                self._eval_model = (flat, self._put(flat))
            ref = self._eval_model[1]
        k = self._slots.acquire(None, anywhere=True)
        try:
            outcome = self._get(k, self._hosts[k].evaluate.options(concurrency_group="train").remote(ref, lo, hi))
        finally:
            self._slots.release(k)
        if outcome[0] != "done":
            raise error_from_code(str(outcome[1]), f"evaluating test examples {lo}:{hi}: {outcome[2]}")
        loss, acc = outcome[1]
        return float(loss), float(acc)

    def _outcome(self, k: int, i: int, ref: Any) -> Any:
        """What host ``k``'s call ``ref`` for device ``i`` returned, or its failure raised typed."""
        outcome = self._get(k, ref)
        if outcome[0] != "done":
            raise error_from_code(str(outcome[1]), f"device {i}: {outcome[2]}")
        return outcome[1]

    def _shard(self, i: int) -> ArrayDataset:
        """Device ``i``'s examples, as uint8 (the thread backend's slice of the same data set)."""
        assert self._train_set is not None
        idx = torch.from_numpy(self._parts[i])
        data = self._train_set
        return dataclasses.replace(data, images=data.images[idx].contiguous(), labels=data.labels[idx].contiguous())

    def submit(self, i: int, prepared: Any) -> None:
        assert isinstance(prepared, _Prepared) and prepared.device == i
        if prepared.submitted:
            raise TrainingError(f"device {i}'s update was submitted already", code="device_host_failed")
        prepared.submitted = True
        self._drive({i: ("start", "submit")})

    def host_stats(self) -> list[HostStats]:
        """Each device host's process, as it reports itself."""
        return [self._ray.get(host.stats.remote()) for host in self._hosts]

    def close(self) -> None:
        self.backend_info["ray_trained_elsewhere"] = self._slots.elsewhere
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


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block (what the processes it starts inherit)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_federation(options: RayOptions | None = None) -> FederationFactory:
    """A ``run_simulation(federation=...)`` factory for the Ray backend; checks that Ray is installed now."""
    require_ray()
    opts = options or RayOptions()

    def factory(cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor) -> RayFederation:
        return RayFederation(cfg, layout, initial, opts)

    return factory
