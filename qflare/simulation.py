"""Runs a federation of N devices against one coordinator, in this process.

The simulation drives the real protocol objects — :class:`~qflare.protocol.Device` and
:class:`~qflare.protocol.Coordinator` talking through the in-process transport — so enrollment, the
post-quantum handshake, signed models, sealed and signed updates, the round state machine and the
database all run exactly as in a deployment, and their cost is part of every measurement.

Parallelism: the selected devices' local training (and the evaluation of the previous global model, unless
the federation evaluates it itself: ``evaluate_chunk``) runs on a pool of ``workers`` threads, each with its own model instance and one torch intra-op thread.
PyTorch releases the GIL inside its kernels, so the threads use the cores in parallel while sharing one
copy of the data set and of torch itself (one process: no second ~0.3 GB interpreter, no data copies).
Updates are submitted in the coordinator's selection order, so results are identical run to run for
one seed and worker count.

With ``batched_devices`` the round's selected devices are trained together on the driver thread
(:class:`~qflare.training_batched.BatchedTrainer`, one vectorised SGD loop for all of them — the fast
path on a GPU), from the global model the round opened with; each device then runs its own protocol
step on the pool (fetch and verify the signed model, seal and sign its update) with its precomputed
result, which is only handed over when the model the device fetched is the one it was trained from.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .crypto import SigningKey, require_primitives
from .data import load_dataset
from .defense import AttackConfig, backdoor_success
from .defense.record import DefenceLog
from .defense.root import TrainedRoot, root_indices
from .errors import ConfigError, TrainingError, ValidationError
from .federation import FederationSpec
from .history import write_history
from .ledger.canonical import decode
from .memory import release_free_memory, tune_heap
from .model_file import MODEL_FILE_NAME, write_model_file
from .models import create_model
from .precision import Precision, resolve_precision
from .protocol import Coordinator, CoordinatorConfig, Device, RoundConfig
from .protocol.provenance import NO_UPDATE, NOT_COMBINED, export_ledger
from .protocol.rounds import OpenRound
from .protocol.secure_device import SecureParticipant
from .protocol.selection import build_selector, check_selection
from .storage import Database, Store
from .strategy import ClientUpdate, DPFedAvg, Pipeline, PrivacySpent, RoundAggregation, privacy_of
from .training import LocalTrainer, TrainConfig, TrainResult, client_seed, evaluate, resolve_device
from .training_batched import BatchedTrainer, DeviceJob
from .transport import InProcessTransport
from .wire import ParamLayout

__all__ = [
    "CoordinatorSide",
    "Federation",
    "FederationFactory",
    "FinalModel",
    "RoundProgress",
    "RoundRecord",
    "SimulationConfig",
    "SimulationResult",
    "run_simulation",
]


@dataclass(frozen=True)
class SimulationConfig:
    """A federation (:class:`~qflare.federation.FederationSpec`) and how this process simulates it."""

    federation: FederationSpec = field(default_factory=FederationSpec)
    workers: int = 0
    """Training threads; 0 = one per CPU core. 1 = train devices one after another with torch's
    default intra-op threads (what a bare PyTorch loop does)."""
    eval_chunks: int = 10
    protocol: bool = True
    """False skips the device/coordinator protocol (no crypto, no database): training results are
    aggregated directly.  Only for measuring what the protocol costs; the devices, partitions, seeds,
    selection and aggregation are the same."""
    ledger_out: Path | None = None
    """Write the coordinator's provenance ledger export (``qflare ledger verify`` checks it) here when the
    run ends; the simulation's database is scratch, so this is the only copy.  Needs ``protocol``."""
    batched_devices: bool = False
    """Train each round's selected devices together (:class:`~qflare.training_batched.BatchedTrainer`)
    instead of one per pool thread; the same updates to float32 rounding.  Meant for a GPU."""
    attack: AttackConfig | None = None
    """Attacker devices (:mod:`qflare.defense.threat`); the history's ``defence`` section scores the
    aggregator's detections against them."""

    def __post_init__(self) -> None:
        if self.ledger_out is not None and not self.protocol:
            raise ConfigError("ledger_out needs the protocol: --no-protocol writes no ledger")
        if getattr(self.federation, "secure_aggregation", False) and not self.protocol:
            raise ConfigError("secure aggregation runs over the protocol: it cannot be combined with --no-protocol")
        if not isinstance(self.federation, FederationSpec):
            raise ConfigError(f"federation must be a FederationSpec, got {type(self.federation).__name__}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.eval_chunks < 1:
            raise ConfigError(f"eval_chunks must be >= 1, got {self.eval_chunks}")
        spec = self.federation
        if spec.per_round > spec.devices:
            raise ConfigError(
                f"per_round ({spec.per_round}) cannot exceed devices ({spec.devices}): a round selects distinct devices"
            )
        spec.build_strategy()  # refuse now a strategy that cannot aggregate per_round updates
        if not self.protocol and spec.detection_config() is not None:
            raise ConfigError(
                "threat detection (--aggregator reputation) runs in the coordinator's round manager; "
                "--no-protocol has none"
            )
        if self.attack is not None:
            if not isinstance(self.attack, AttackConfig):
                raise ConfigError(f"attack must be an AttackConfig, got {type(self.attack).__name__}")
            self.attack.attackers(spec.devices)  # refuse a share that makes no attacker (or no honest device)


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    seconds: float
    train_loss: float
    updates: int
    examples: int
    model_sha256: str
    published: bool = True
    """False when the round failed (its aggregate was refused): the global model stayed as it was."""
    epsilon: float | None = None
    """DP-FedAvg: the ε spent after this round (amplified by sampling); None without DP."""
    epsilon_unsampled: float | None = None
    """DP-FedAvg: the ε spent without amplification by sampling (who took part is known)."""
    delta: float | None = None


@dataclass(frozen=True)
class RoundProgress:
    """Progress within a round: ``stage`` is ``train`` (devices done training), ``submit`` (updates
    received by the coordinator), ``aggregated`` (the round's model is published; done = total = 1) or
    ``eval`` (test-set chunks of that round's model evaluated)."""

    round: int
    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class FinalModel:
    """The global model after the last evaluated round, and what it takes to rebuild its module."""

    layout: ParamLayout
    flat: torch.Tensor
    round: int
    sha256: str
    """The content hash the coordinator signed ('' without the protocol)."""
    input_shape: tuple[int, int, int]
    num_classes: int


@dataclass
class SimulationResult:
    config: dict[str, Any]
    rounds: list[RoundRecord]
    wall_s: float
    startup_s: float
    model: FinalModel | None = None
    interrupted: bool = False
    """True when the run was stopped (``stop`` set) before its last round."""
    stop_reason: str | None = None
    """Why the federation ended before its planned rounds (DP-FedAvg's privacy budget), or None."""
    defence: DefenceLog | None = None
    """Per round: the updates refused or left out, the attackers selected, detection true/false positives."""

    def to_json(self) -> dict[str, Any]:
        out = {
            "config": self.config,
            "rounds": [asdict(r) for r in self.rounds],
            "wall_s": self.wall_s,
            "startup_s": self.startup_s,
            "interrupted": self.interrupted,
            "stop_reason": self.stop_reason,
        }
        if self.defence is not None:
            out["defence"] = self.defence.to_json()
        return out

    def title(self) -> str:
        c = self.config
        return (
            f"QFLARE simulation · {c.get('dataset')} · {c.get('strategy')} · "
            f"{c.get('devices')} devices, {c.get('per_round')}/round"
        )

    def write(self, out: Path, *, plot: bool = True) -> list[Path]:
        """history.json, history.csv, history.png (with ``plot``) and (when a round finished and the model
        is a registered name) model.safetensors under ``out``, each replaced atomically."""
        out.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        m, name = self.model, self.config.get("model")
        if m is not None and isinstance(name, str):  # first: a history.json on disk implies its model is there
            provenance = {"source": "qflare simulate", "round": str(m.round), "dataset": str(self.config["dataset"])}
            if m.sha256:
                provenance["model_sha256"] = m.sha256
            paths.append(
                write_model_file(
                    out / MODEL_FILE_NAME,
                    m.layout,
                    m.flat,
                    model=name,
                    input_shape=m.input_shape,
                    num_classes=m.num_classes,
                    provenance=provenance,
                )
            )
        rows = [asdict(r) for r in self.rounds]
        return write_history(out, self.to_json(), rows, self.title(), plot=plot) + paths


class _Workers:
    """Thread pool whose threads each own a trainer and an evaluation model."""

    def __init__(self, n: int, make_model: Callable[[], torch.nn.Module], train_cfg: TrainConfig, layout: ParamLayout):
        self.n = n
        self._local = threading.local()
        self._make, self._cfg, self._layout = make_model, train_cfg, layout
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="qflare-worker")

    def trainer(self) -> LocalTrainer:
        t = getattr(self._local, "trainer", None)
        if t is None:
            t = self._local.trainer = LocalTrainer(self._make(), self._cfg, self._layout)
        return t

    def eval_model(self) -> torch.nn.Module:
        m = getattr(self._local, "eval_model", None)
        if m is None:
            m = self._local.eval_model = self._make().to(self.trainer().device)
        return m


_NO_DEADLINE_S = 365 * 24 * 3600.0


class Federation(Protocol):
    """What the simulation driver needs from a federation backend (one object per run)."""

    def open_round(self) -> tuple[int, list[int]] | None:
        """Open the next round: (round number, selected device indices), or None when finished."""

    def work(self, i: int, train: Callable[[torch.Tensor, int], TrainResult]) -> tuple[Any, TrainResult]:
        """Device ``i``'s part of the round, run on a worker thread: get the model, ``train(flat, round)``,
        and return what :meth:`submit` sends, with the training result.  A backend that trains elsewhere
        (:mod:`qflare.simulation_ray`: on its Ray actors) trains with the same seeds and data, and does not
        call ``train``."""

    def submit(self, i: int, prepared: Any) -> None:
        """Send device ``i``'s prepared update (called in selection order on the driver thread)."""

    def published(self, number: int) -> bool:
        """Whether round ``number`` published a new global model (False: it failed, the model stayed)."""

    def model(self) -> tuple[torch.Tensor, str]:
        """The current global model (flat vector, content hash) after the round's last submission."""

    def close(self) -> None: ...

    # Optional (looked up with getattr; the remote federation of the benchmarks has none of them):
    # ``privacy() -> PrivacySpent | None`` after a round, ``stop_reason: str | None`` once finished,
    # ``left_out(round) -> {device: reason}`` and ``quarantined(round) -> [device]`` for the defence log,
    # ``driver_threads: int``: the worker threads its ``work`` calls need to keep it busy (the pool
    # gets at least that many), ``backend_info: dict[str, Any]``: recorded in the result's config,
    # ``evaluate_chunk(flat, lo, hi) -> (loss, accuracy)``: evaluates the model on test examples
    # ``lo:hi`` where the federation computes (the same numbers as this process would).


FederationFactory = Callable[["SimulationConfig", ParamLayout, torch.Tensor], Federation]
RootFactory = Callable[[], TrainedRoot]
"""Builds the coordinator's FLTrust root-update source (called only when the strategy needs one)."""


def _with_root(pipeline: Pipeline, root: RootFactory | None) -> Pipeline:
    if not pipeline.needs_root:
        return pipeline
    if root is None:
        raise ConfigError(
            "this aggregator needs the coordinator's root data, which this backend lacks", code="no_root_data"
        )
    return pipeline.with_root(root())


class CoordinatorSide:
    """The coordinator half of a protocol federation, in this process: a :class:`Coordinator` over a scratch
    SQLite database, with the :class:`Federation` methods that only need it.  The backends that enroll
    real :class:`Device` objects (here over the in-process transport; in :mod:`qflare.simulation_ray` in
    Ray actors) add the devices and register each one's index in :attr:`index`, in enrollment order."""

    def __init__(
        self, cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor, root: RootFactory | None = None
    ) -> None:
        spec = cfg.federation
        # The coordinator's database: SQLite in a scratch folder (RAM-backed where /dev/shm exists).
        self._scratch = tempfile.TemporaryDirectory(
            prefix="qflare-sim-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self._db = Database(f"sqlite:///{self._scratch.name}/coordinator.db")
        try:
            self._db.upgrade()
            self.coordinator = Coordinator(
                layout=layout,
                initial_flat=initial,
                strategy=_with_root(spec.build_strategy(), root),
                identity=SigningKey.generate(spec.suite.sig),
                store=Store(self._db),
                # No deadline in a simulation: every selected device answers (a round may take long).
                rounds=RoundConfig(
                    rounds=spec.rounds,
                    per_round=spec.per_round,
                    min_participants=spec.min_participants,
                    seed=spec.seed,
                    round_timeout_s=_NO_DEADLINE_S,
                    selector=spec.selector,
                    detection=spec.detection_config(),
                ),
                # Simulated devices are all present, and only the selected ones talk during a round: no budget
                # for public-key work and no liveness narrowing of the selection (the seed alone decides it).
                config=CoordinatorConfig(suite=spec.suite, crypto_ops_per_s=None, liveness_window_s=None),
            )
        except BaseException:
            self._db.dispose()
            self._scratch.cleanup()
            raise
        self.index: dict[str, int] = {}
        """Device id -> device index."""
        self._ledger_out = cfg.ledger_out

    def open_round(self) -> tuple[int, list[int]] | None:
        rnd = self.coordinator.rounds.open_next()
        if rnd is None:
            return None
        chosen = [self.index[d] for d in rnd.selected]
        self._round_opened(rnd, chosen)
        return rnd.number, chosen

    def _round_opened(self, rnd: OpenRound, chosen: list[int]) -> None:
        """What the devices do as a round opens, before anyone trains (here: nothing; the in-process
        backend runs secure aggregation's key phases)."""
        if rnd.secure is not None:
            raise ConfigError("this simulation backend does not run secure aggregation (use the thread backend)")

    def published(self, number: int) -> bool:
        return self.coordinator.rounds.model.round_number == number

    def model(self) -> tuple[torch.Tensor, str]:
        m = self.coordinator.rounds.model
        return m.flat, m.sha256

    @property
    def mechanism(self) -> DPFedAvg | None:
        return privacy_of(self.coordinator.rounds.strategy)

    def privacy(self) -> PrivacySpent | None:
        mechanism = privacy_of(self.coordinator.rounds.strategy)
        return None if mechanism is None else mechanism.spent()

    @property
    def stop_reason(self) -> str | None:
        return self.coordinator.rounds.stop_reason

    def left_out(self, number: int) -> dict[int, str]:
        """Device index -> reason, for the updates round ``number`` refused or did not combine (its
        ledger entry's ``left_out``; devices that sent nothing are not included)."""
        row = Store(self._db).ledger_entry_for_round(number)
        if row is None:
            return {}
        body = decode(row.body)
        out: dict[int, str] = {}
        for device, _, reason in body.get("left_out", []):
            if reason != NO_UPDATE and device in self.index:
                out[self.index[device]] = str(reason)
        return out

    def quarantined(self, number: int) -> list[int]:
        """Device indices that round ``number``'s detection verdict quarantined (none without detection)."""
        verdict = self.coordinator.rounds.verdicts.get(number)
        return [] if verdict is None else [self.index[d] for d in verdict.quarantined if d in self.index]

    def close(self) -> None:
        try:
            if self._ledger_out is not None:
                export_ledger(Store(self._db), self.coordinator.public_key, self._ledger_out)
        finally:
            self.discard()

    def database_bytes(self) -> int:
        """The size of the coordinator's scratch database files (in memory where /dev/shm exists)."""
        return sum(f.stat().st_size for f in Path(self._scratch.name).iterdir() if f.is_file())

    def discard(self) -> None:
        """Drop the scratch database without exporting anything (a federation that failed to start)."""
        self._db.dispose()
        self._scratch.cleanup()


class _SecureFederation(CoordinatorSide):
    """The real thing: a Coordinator and N enrolled Devices with PQ sessions, over the in-process transport."""

    def __init__(
        self, cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor, root: RootFactory | None = None
    ) -> None:
        super().__init__(cfg, layout, initial, root)
        spec = cfg.federation
        transport = InProcessTransport(self.coordinator)
        self.devices: list[Device] = []
        try:
            for token in self.coordinator.create_tokens(spec.devices, ttl_s=600, label="simulation"):
                dev = Device(
                    transport=transport,
                    identity=SigningKey.generate(spec.suite.sig),
                    server_key=self.coordinator.public_key,
                    layout=layout,
                    suite=spec.suite,
                )
                dev.enroll(token)
                dev.connect()
                self.devices.append(dev)
        except BaseException:
            self.discard()
            raise
        self.index = {d.device_id: i for i, d in enumerate(self.devices)}
        self._secure: dict[int, SecureParticipant] = {}  # a secure round's devices, by index

    def _round_opened(self, rnd: OpenRound, chosen: list[int]) -> None:
        self._secure = {}
        if rnd.secure is not None:  # the key phases, before anyone trains (every device answers here)
            self._secure = {i: SecureParticipant(self.devices[i], rnd.number) for i in chosen}
            for p in self._secure.values():
                p.advertise()
            for p in self._secure.values():
                p.share_keys()

    def work(self, i: int, train: Callable[[torch.Tensor, int], TrainResult]) -> tuple[Any, TrainResult]:
        dev = self.devices[i]
        task = dev.task()
        gm = dev.fetch_model(task)
        result = train(gm.flat, task.round)
        secure = self._secure.get(i)
        if secure is not None:  # masked on the worker thread, sent in selection order by submit()
            return secure.mask(result.delta, result.num_examples), result
        return dev.prepare_update(task, gm, result), result

    def submit(self, i: int, sealed: Any) -> None:
        secure = self._secure.get(i)
        if secure is None:
            self.devices[i].submit(sealed)
            return
        secure.send_masked(sealed)
        if all(p.sent_masked for p in self._secure.values()):  # the last one closed the masked phase
            for p in self._secure.values():  # the consistency round: each signs the survivor set
                p.consistency()
            for p in self._secure.values():
                p.unmask()


class _DirectFederation:
    """Same selection and aggregation without the protocol — only to measure what the protocol costs."""

    def __init__(
        self, cfg: SimulationConfig, layout: ParamLayout, initial: torch.Tensor, root: RootFactory | None = None
    ) -> None:
        spec = self._spec = cfg.federation
        self._strategy = _with_root(spec.build_strategy(), root)
        self._left_out: dict[int, dict[int, str]] = {}
        self._selector = build_selector(spec.selector)  # the same selector, over device indices
        self._flat, self._number = initial, 0
        self._agg: RoundAggregation | None = None
        self._privacy = privacy_of(self._strategy)
        self.mechanism = self._privacy
        self.stop_reason: str | None = None

    def open_round(self) -> tuple[int, list[int]] | None:
        if self._number >= self._spec.rounds:
            return None
        k = min(self._spec.per_round, self._spec.devices)
        if self._privacy is not None:  # as the coordinator does: stop before the round that exceeds the budget
            self.stop_reason = self._privacy.budget_stop(k / self._spec.devices)
            if self.stop_reason is not None:
                return None
            self._privacy.begin_round(k / self._spec.devices)
        self._number += 1
        self._agg = self._strategy.begin(self._flat)
        candidates = [str(i) for i in range(self._spec.devices)]
        chosen = self._selector.select(self._number, candidates, k, self._spec.seed)
        return self._number, [int(i) for i in check_selection(chosen, candidates, k, self._number)]

    def work(self, i: int, train: Callable[[torch.Tensor, int], TrainResult]) -> tuple[Any, TrainResult]:
        result = train(self._flat, self._number)
        return ClientUpdate(str(i), result.delta, result.num_examples), result

    def submit(self, i: int, update: Any) -> None:
        assert self._agg is not None
        self._agg.add(update)
        if self._agg.count == min(self._spec.per_round, self._spec.devices):
            agg = self._agg
            self._flat, self._agg = agg.finish(), None
            self._left_out[self._number] = {int(d): NOT_COMBINED for d in agg.left_out}

    def left_out(self, number: int) -> dict[int, str]:
        return self._left_out.get(number, {})

    def published(self, number: int) -> bool:
        return self._agg is None  # finish() raises when it refuses the aggregate

    def model(self) -> tuple[torch.Tensor, str]:
        return self._flat, ""

    def privacy(self) -> PrivacySpent | None:
        return None if self._privacy is None else self._privacy.spent()

    def close(self) -> None:
        return None


def run_simulation(
    cfg: SimulationConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    federation: FederationFactory | None = None,
    on_progress: Callable[[RoundProgress], None] | None = None,
    stop: threading.Event | None = None,
    on_checkpoint: Callable[[SimulationResult], None] | None = None,
) -> SimulationResult:
    """Run ``cfg``; ``federation`` replaces the in-process backends (e.g. devices talking to a server).

    ``on_progress`` is called from worker threads as devices finish training and evaluation chunks
    finish, and from this thread as updates are submitted and rounds aggregated.
    ``stop``: once set, no new device training starts; the trainings already running finish, the round
    they belong to is abandoned, the last aggregated model is evaluated, and the result (``interrupted``
    true) holds every round finished.  ``on_checkpoint`` is called after every evaluated round with the
    result so far (history and that round's model), e.g. to write it to disk as the run goes."""
    t0 = time.perf_counter()
    spec = cfg.federation
    if cfg.batched_devices and federation is not None:
        raise ConfigError(
            "batched_devices trains from the in-process federation's model; it takes no federation factory"
        )
    tune_heap()
    require_primitives(spec.suite)
    train = load_dataset(spec.dataset, "train", root=spec.data_root)
    test = load_dataset(spec.dataset, "test", root=spec.data_root)
    parts = spec.partitions(train.labels.numpy())
    workers = cfg.workers or (os.cpu_count() or 1)
    if workers > 1:
        torch.set_num_threads(1)

    def make_model() -> torch.nn.Module:
        return create_model(spec.model, train.input_shape, train.num_classes)

    torch.manual_seed(spec.seed)
    model = make_model()
    layout = ParamLayout.from_module(model)
    precision = resolve_precision(spec.train.precision, resolve_device(spec.train.device))
    if cfg.batched_devices and cfg.attack is not None:
        raise ConfigError("--batched-devices cannot simulate attacks (--attack): use the per-device loop")
    if cfg.batched_devices and precision.name != "fp32":
        raise ConfigError(
            f"--batched-devices trains in fp32 only; --precision {spec.train.precision} resolved to {precision.name} "
            "here (use the per-device loop for bf16)"
        )
    batched = (
        BatchedTrainer(make_model(), spec.train, layout, input_shape=train.input_shape) if cfg.batched_devices else None
    )
    x_test, y_test = test.normalized(), test.labels
    attack = cfg.attack
    attackers = attack.attackers(spec.devices) if attack is not None else frozenset()
    if attack is not None:
        attack.check_classes(train.num_classes)
    defence = DefenceLog(attackers)

    def make_root() -> TrainedRoot:
        # FLTrust's root data: 100 seeded examples of the test split, the coordinator's own evaluation
        # data (every train example belongs to some device).  They stay in the evaluation (1% of it).
        idx = root_indices(len(y_test), seed=spec.seed)
        trainer = LocalTrainer(make_model(), spec.train, layout)
        return TrainedRoot(trainer, x_test[idx], y_test[idx], seed=spec.seed)

    initial = layout.module_to_flat(model)
    if federation is not None:
        fed = federation(cfg, layout, initial)
    else:
        fed = (_SecureFederation if cfg.protocol else _DirectFederation)(cfg, layout, initial, make_root)
    pool = _Workers(max(workers, getattr(fed, "driver_threads", 0)), make_model, spec.train, layout)
    privacy: Callable[[], PrivacySpent | None] | None = getattr(fed, "privacy", None)
    mechanism: DPFedAvg | None = getattr(fed, "mechanism", None)
    noise_to_signal = None if mechanism is None else mechanism.noise_to_signal(layout.numel)
    startup = time.perf_counter() - t0
    if on_start is not None:
        on_start(spec.devices)

    progress_lock = threading.Lock()
    counts: dict[tuple[int, str], int] = {}

    def report(number: int, stage: str, total: int) -> None:
        if on_progress is None:
            return
        with progress_lock:
            done = counts[number, stage] = counts.get((number, stage), 0) + 1
            if done == total:
                del counts[number, stage]
        on_progress(RoundProgress(number, stage, done, total))

    def train_device(
        i: int,
        number: int,
        total: int,
        pre: _Batched | None = None,
        benign: dict[int, torch.Tensor] | None = None,
        wait: tuple[Future, ...] = (),
    ) -> tuple[Any, TrainResult]:
        idx = torch.from_numpy(parts[i])

        def fit(flat: torch.Tensor, rnd: int) -> TrainResult:
            if pre is not None:  # computed together with the round's other devices (no attack: refused)
                return pre.result(i, flat, rnd)
            seed = client_seed(spec.seed, rnd, i)
            x, y = train.normalized(idx), train.labels[idx]
            if attack is None or i not in attackers:
                result = pool.trainer().train(flat, x, y, seed=seed)
                if benign is not None:  # the colluding attackers of a full-knowledge attack read it
                    benign[i] = result.delta.clone()
                return result
            if attack.poisons_data:
                x, y = attack.poison_data(x, y, train.num_classes, seed=seed)
            result = pool.trainer().train(flat, x, y, seed=seed)
            for f in wait:  # the round's benign trainings (queued before this one: no deadlock)
                f.result()
            seen = [benign[j] for j in sorted(benign)] if benign is not None else []
            result.delta = attack.poison_update(result.delta, seed=seed, benign=seen)
            return result

        prepared, result = fed.work(i, fit)
        result.delta = torch.empty(0)  # the prepared update carries it; don't hold two copies until submission
        report(number, "train", total)
        return prepared, result

    def train_together(number: int, chosen: list[int]) -> _Batched:
        assert batched is not None
        flat, _ = fed.model()
        jobs = []
        for i in chosen:
            idx = torch.from_numpy(parts[i])
            jobs.append(DeviceJob(train.normalized(idx), train.labels[idx], client_seed(spec.seed, number, i)))
        return _Batched(number, flat, dict(zip(chosen, batched.train_round(flat, jobs), strict=True)))

    elsewhere: Callable[[torch.Tensor, int, int], tuple[float, float]] | None = getattr(fed, "evaluate_chunk", None)

    def eval_chunk(flat: torch.Tensor, lo: int, hi: int, number: int, total: int) -> tuple[float, int]:
        if elsewhere is not None:
            loss, acc = elsewhere(flat, lo, hi)
        else:
            m = pool.eval_model()
            layout.load_into(m, flat)
            loss, acc = evaluate(
                m, x_test[lo:hi], y_test[lo:hi], channels_last=spec.train.channels_last, precision=precision
            )
        report(number, "eval", total)
        return loss * (hi - lo), round(acc * (hi - lo))

    def submit_eval(flat: torch.Tensor, number: int) -> list[Future]:
        n = len(y_test)
        bounds = [n * k // cfg.eval_chunks for k in range(cfg.eval_chunks + 1)]
        spans = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        return [pool.pool.submit(eval_chunk, flat, lo, hi, number, len(spans)) for lo, hi in spans]

    records: list[RoundRecord] = []
    final: list[FinalModel] = []

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    backend_info: dict[str, Any] = getattr(fed, "backend_info", {})

    def partial() -> SimulationResult:
        config = _config_dict(cfg, precision)
        if noise_to_signal is not None:  # DP-FedAvg: the noise on a round's mean, in clip norms
            config["dp_noise_to_signal"] = noise_to_signal
        return SimulationResult(
            {**config, **backend_info},
            list(records),
            time.perf_counter() - t0,
            startup,
            final[-1] if final else None,
            stopping(),
            getattr(fed, "stop_reason", None),
            defence,
        )

    # (record, model to evaluate, its evaluation futures): evaluation of round r's model is queued
    # behind round r+1's training, so it fills the pool's idle tail instead of blocking the next round.
    pending: tuple[RoundRecord, torch.Tensor, list[Future]] | None = None

    def finish_eval() -> None:
        nonlocal pending
        if pending is None:
            return
        rec, flat, futs = pending
        pending = None
        results = [f.result() for f in (futs or submit_eval(flat, rec.round))]
        rec.loss = sum(p[0] for p in results) / len(y_test)
        rec.accuracy = sum(p[1] for p in results) / len(y_test)
        records.append(rec)
        final[:] = [FinalModel(layout, flat, rec.round, rec.model_sha256, train.input_shape, train.num_classes)]
        if on_round is not None:
            on_round(rec)
        if on_checkpoint is not None:
            on_checkpoint(partial())

    try:
        while not stopping() and (opened := fed.open_round()) is not None:
            t_round = time.perf_counter()
            number, chosen = opened
            pre = None
            if batched is not None:  # the previous model's evaluation runs on the pool meanwhile
                if pending is not None:
                    pending = (pending[0], pending[1], submit_eval(pending[1], pending[0].round))
                pre = train_together(number, chosen)
            # Largest devices first: the shortest tail on the pool.  Submission stays in selection order.
            order = sorted(chosen, key=lambda i: -len(parts[i]))
            if attack is not None and attack.needs_benign:
                # Full knowledge: attackers train after the benign devices and see their updates.
                seen: dict[int, torch.Tensor] = {}
                futures = {
                    i: pool.pool.submit(train_device, i, number, len(chosen), None, seen)
                    for i in order
                    if i not in attackers
                }
                wait = tuple(futures.values())
                for i in order:
                    if i in attackers:
                        futures[i] = pool.pool.submit(train_device, i, number, len(chosen), None, seen, wait)
            else:
                futures = {i: pool.pool.submit(train_device, i, number, len(chosen), pre) for i in order}
            if pending is not None and not pending[2]:
                pending = (pending[0], pending[1], submit_eval(pending[1], pending[0].round))
            losses, examples, abandoned = 0.0, 0, False
            for i in chosen:
                if stopping():  # the trainings already running finish; the round is given up
                    abandoned = True
                    for f in futures.values():
                        f.cancel()
                    break
                try:
                    sealed, result = futures[i].result()
                    fed.submit(i, sealed)
                except (TrainingError, ValidationError) as exc:  # non-finite loss, or an update out of bounds
                    finish_eval()  # the rounds before this one are evaluated and checkpointed (history written)
                    if noise_to_signal is None or noise_to_signal <= 1:
                        raise
                    raise type(exc)(
                        f"{exc.message} (round {number}, device {i}). DP-FedAvg adds noise of norm about "
                        f"{noise_to_signal:.3g} clip norms to every round's mean (z·sqrt(parameters)/per_round): "
                        "the global model is a random walk whose weights grow until local training diverges on "
                        "it. More devices a round or a larger epsilon lower it "
                        "(docs/defences.md, 'Why small federations cannot train under DP')",
                        code=exc.code,
                    ) from exc
                report(number, "submit", len(chosen))
                losses += result.mean_loss * result.num_examples
                examples += result.num_examples
            if abandoned:
                break
            finish_eval()
            release_free_memory()
            published = fed.published(number)
            flat, digest = fed.model()
            left_out = getattr(fed, "left_out", None)
            quarantined = getattr(fed, "quarantined", None)
            defence.record(
                number,
                chosen,
                left_out(number) if left_out is not None else {},
                quarantined(number) if quarantined is not None else (),
            )
            rec = RoundRecord(
                number,
                float("nan"),
                float("nan"),
                time.perf_counter() - t_round,
                losses / examples,
                len(chosen),
                examples,
                digest,
                published,
            )
            spent = privacy() if privacy is not None else None
            if spent is not None:
                rec.epsilon, rec.epsilon_unsampled, rec.delta = spent.epsilon, spent.epsilon_unsampled, spent.delta
            pending = (rec, flat, [])
            report(number, "aggregated", 1)
        finish_eval()
    finally:
        pool.pool.shutdown(wait=True, cancel_futures=True)
        fed.close()
    if attack is not None and attack.name == "backdoor" and final:
        m = make_model()
        layout.load_into(m, final[-1].flat)
        defence.extra["backdoor_success"] = backdoor_success(
            m, x_test, y_test, target=attack.target, channels_last=spec.train.channels_last
        )
    return partial()


@dataclass(frozen=True)
class _Batched:
    """A round's results computed together, handed to each device's protocol step."""

    number: int
    trained_from: torch.Tensor
    outcomes: dict[int, TrainResult | TrainingError]

    def result(self, i: int, flat: torch.Tensor, rnd: int) -> TrainResult:
        """Device ``i``'s result, only if the model it fetched (and verified) is the one it was trained from."""
        same = flat.shape == self.trained_from.shape and torch.equal(flat.cpu(), self.trained_from.cpu())
        if rnd != self.number or not same:
            raise TrainingError(
                f"device {i} fetched the model of round {rnd}, not the one its update was computed from "
                f"(round {self.number}); the batched result is not used"
            )
        outcome = self.outcomes.pop(i)
        if isinstance(outcome, TrainingError):
            raise outcome
        return outcome


def _config_dict(cfg: SimulationConfig, precision: Precision) -> dict[str, Any]:
    """The federation's fields and this run's own settings, in one flat object; ``precision`` is what
    ``train.precision`` resolved to here (``auto`` becomes ``fp32`` or ``bf16``), ``precision_detail`` why."""
    d = cfg.federation.to_json()
    del d["format"]
    attack = None if cfg.attack is None else cfg.attack.to_json()
    return {
        **d,
        "workers": cfg.workers,
        "eval_chunks": cfg.eval_chunks,
        "protocol": cfg.protocol,
        "precision": precision.name,
        "precision_detail": precision.describe(),
        "batched_devices": cfg.batched_devices,
        "attack": attack,
    }
