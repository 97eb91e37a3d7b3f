"""The coordinator server's runtime: storage, identity, model, coordinator, round loop and evaluator.

:class:`ServerRuntime` builds everything ``qflare server`` needs from one data directory and owns its
background work; the FastAPI app (:mod:`qflare.server.app`) only translates HTTP to
:meth:`~qflare.protocol.Coordinator.handle` calls on ``runtime.coordinator``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ..crypto import MsgType, SignedEnvelope, SigningKey, require_primitives
from ..crypto.rotation import ChainState
from ..data import load_dataset
from ..errors import ConfigError, QflareError
from ..federation import FederationSpec
from ..models import create_model
from ..protocol import Coordinator, CoordinatorConfig, PublishedModel, RoundConfig
from ..protocol.key_ledger import catch_up
from ..published import Architecture
from ..storage import AdvisoryLeadership, BlobBackend, Database, Store, blob_store_from_env
from ..storage.leader import startup_lock
from ..storage.scrub import ScrubReport, verify_store
from ..tracking import open_trackers
from ..wire import ParamLayout
from .credentials import KEY_FILE, AdminToken, load_or_create_admin_token, load_or_create_identity
from .evaluation import Evaluator
from .limits import HttpLimits
from .logs import bind_round
from .metrics import LiveFigures, ServerMetrics
from .rotation import check_key_matches_chain, server_lock
from .rotation import recover as recover_rotation

__all__ = ["ServerConfig", "ServerRuntime"]

_log = logging.getLogger("qflare.server")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``qflare server`` is configured with: the federation it coordinates and its own settings."""

    data_dir: Path
    federation: FederationSpec = field(default_factory=FederationSpec)
    min_devices: int = 1
    """Active devices needed before the first round opens (launchers hold it at the federation's size)."""
    evaluate: bool = True
    key_passphrase: bytes | None = None
    session_lifetime_s: int = 3600
    max_update_bytes: int = 64 * 1024 * 1024
    http: HttpLimits = field(default_factory=HttpLimits)
    round_loop: bool = True
    """Run the background loop that opens rounds and enforces deadlines (tests may step by hand)."""
    step_interval_s: float = 0.2
    gc_interval_s: float = 600.0
    """How often blobs no row refers to are removed (also once at start-up); 0 disables the periodic run."""
    scrub_interval_s: float = 6 * 3600.0
    """How often every stored blob is re-hashed (as ``qflare server verify-store`` does); 0 disables it."""
    tensorboard: Path | None = None
    """Write per-round TensorBoard event files here (:mod:`qflare.tracking`)."""
    mlflow: str | None = None
    """Log per-round metrics to an MLflow run at this tracking URI."""
    blob_store: str | None = None
    """Where the blobs live: ``s3://BUCKET[/PREFIX]``; None: ``$QFLARE_BLOB_STORE`` if set, else
    ``data_dir/blobs`` (:func:`qflare.storage.blob_store_from_env`)."""
    cluster: bool = False
    """Serve as one worker of several (this machine's or others') sharing one PostgreSQL database and
    one blob store: any worker takes any request, one leader at a time runs the rounds
    (:mod:`qflare.protocol.cluster`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.federation, FederationSpec):
            raise ConfigError(f"federation must be a FederationSpec, got {type(self.federation).__name__}")
        if self.step_interval_s <= 0:
            raise ConfigError("step_interval_s must be > 0")
        if self.min_devices < 1:
            raise ConfigError("min_devices must be >= 1")
        if self.gc_interval_s < 0 or self.scrub_interval_s < 0:
            raise ConfigError("gc_interval_s and scrub_interval_s must be >= 0")


def _check_cluster_key(store: Store, identity: SigningKey) -> None:
    """Refuse a cluster worker whose coordinator key is not the federation's: the key that signed the
    ledger's latest entry (a rotation's entry is signed by the new key too), else the initial model."""
    head = store.last_ledger_entry()
    if head is not None:
        signers = {key_id for key_id, _ in head.signatures}
        if identity.key_id in signers:
            return
        theirs = ", ".join(sorted(k[:16] + "..." for k in signers))
    else:
        first = store.get_model(0)
        if first is None:
            return  # a new federation: this worker's key is the federation's
        try:
            SignedEnvelope.open(bytes(first.signature), identity.public, expected_type=MsgType.GLOBAL_MODEL)
            return
        except QflareError:
            theirs = "another key"
    raise ConfigError(
        f"this worker's coordinator key {identity.key_id[:16]}... is not the federation's (its latest ledger entry "
        f"or initial model is signed by {theirs}): every worker of a cluster needs the same coordinator.key"
    )


class ServerRuntime:
    """One coordinator server's state and background threads (see the module docstring)."""

    def __init__(self, config: ServerConfig, *, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        require_primitives(config.federation.suite)
        self.data_dir = Path(config.data_dir).expanduser().resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd: int | None = server_lock(self.data_dir)  # rotate-key refuses while it is held
        try:
            self.db = Database.from_env(self.data_dir, environ)
        except BaseException:
            self._release_lock()
            raise
        self.leadership: AdvisoryLeadership | None = None
        try:
            with startup_lock(self.db) if config.cluster else contextlib.nullcontext():
                self._start_up(config, environ)
        except BaseException:
            if hasattr(self, "trackers"):
                self.trackers.close()
            self._release_leadership()
            self.db.dispose()
            self._release_lock()
            raise
        self.coordinator.on_crypto = self.metrics.observe_crypto
        self.metrics.attach(
            LiveFigures(
                round_status=self.coordinator.rounds.status,
                updates_accepted=self.store.count_updates,
                active_devices=self._active_devices,
                quarantined_devices=lambda: len(self.store.list_devices(status="quarantined")),
                round_opened=self._round_opened,
                pending_handshakes=lambda: self.coordinator.pending_handshakes,
            )
        )
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._maintenance: threading.Thread | None = None
        self._scrub_reported: set[str] = set()
        self._last_round: int | None = None
        self._last_error = ""
        self.started = False

    def _start_up(self, config: ServerConfig, environ: Mapping[str, str] | None) -> None:
        """Migrate, open the stores, load the keys and build the coordinator (a cluster's workers one at a
        time, under its start-up lock: they would race to create the same rows and files)."""
        self.db.upgrade()
        self.store = Store(self.db, shared=config.cluster)
        self.blobs: BlobBackend = blob_store_from_env(self.data_dir, environ, url=config.blob_store)
        # nothing is writing yet -- unless other workers of a cluster share the directory
        self.blobs.remove_stale_temp_files(older_than_s=3600.0 if config.cluster else 0.0)
        if config.cluster:
            self.leadership = AdvisoryLeadership(self.db)
        if config.cluster and not (self.data_dir / KEY_FILE).exists() and self.store.latest_model() is not None:
            raise ConfigError(
                f"{self.data_dir / KEY_FILE} is missing and this federation already exists: every worker of a "
                "cluster signs with the same coordinator key; copy coordinator.key (and admin.token) from another "
                "worker's data directory"
            )
        self.rotations: ChainState = recover_rotation(self.data_dir, config.key_passphrase)
        self.identity, self.identity_created = load_or_create_identity(
            self.data_dir, config.key_passphrase, config.federation.suite.sig
        )
        check_key_matches_chain(self.identity, self.rotations)
        # before the round manager's recovery can sign a round entry with a key the ledger does not
        # know yet: the rotation records a crash left out of the ledger go in first
        for row in catch_up(self.store, self.rotations, self.identity):
            _log.warning(
                "ledger: appended key record entry %d (%s) left out by an interrupted rotation", row.seq, row.kind
            )
        if config.cluster:
            _check_cluster_key(self.store, self.identity)
        self.admin: AdminToken = load_or_create_admin_token(self.data_dir, environ)
        self.metrics = ServerMetrics()
        self.trackers = open_trackers(
            tensorboard=config.tensorboard,
            mlflow=config.mlflow,
            run_name=f"server-{self.data_dir.name}",
            params=config.federation.to_json(),
            on_error=lambda message: _log.error("tracking: %s", message),
        )
        self._refused_seen = 0.0
        self._build_coordinator()
        if not config.cluster:  # other workers may be writing blobs they have not recorded yet
            self.coordinator.rounds.collect_garbage()  # blobs left by a crash between write and record

    def _build_coordinator(self) -> None:
        cfg, spec = self.config, self.config.federation
        test = load_dataset(spec.dataset, "test", root=spec.data_root)
        shape, classes = test.input_shape, test.num_classes
        self.data_shape: dict[str, Any] = {
            "input_shape": list(shape),
            "num_classes": classes,
            "mean": list(test.mean),
            "std": list(test.std),
        }

        def make_model() -> torch.nn.Module:
            return create_model(spec.model, shape, classes)

        torch.manual_seed(spec.seed)
        model = make_model()
        self.layout = ParamLayout.from_module(model)
        if isinstance(spec.model, str):  # what `qflare models export` needs to rebuild the module
            dataset = spec.dataset if isinstance(spec.dataset, str) else ""
            Architecture(spec.model, dataset, shape, classes, self.layout.fingerprint).save(self.data_dir)
        self.evaluator: Evaluator | None = None
        if cfg.evaluate:
            self.evaluator = Evaluator(
                make_model=make_model,
                layout=self.layout,
                test=test,
                store=self.store,
                on_result=self._on_evaluation,
                precision=spec.train.precision,
            )
        strategy = spec.build_strategy()
        if strategy.needs_root:  # FLTrust: this coordinator has no root data it may train on
            raise ConfigError(
                f"aggregator {spec.aggregator!r} needs server-side root data to train on every round, which a "
                "server coordinator does not have (its test split only evaluates); run it in `qflare simulate`",
                code="no_root_data",
            )
        self.coordinator = Coordinator(
            layout=self.layout,
            initial_flat=self.layout.module_to_flat(model),
            strategy=strategy,
            identity=self.identity,
            store=self.store,
            rounds=RoundConfig(
                rounds=spec.rounds,
                per_round=spec.per_round,
                min_participants=spec.min_participants,
                round_timeout_s=spec.round_timeout_s,
                seed=spec.seed,
                min_devices=cfg.min_devices,
                selector=spec.selector,
                detection=spec.detection_config(),
            ),
            config=CoordinatorConfig(
                suite=spec.suite,
                session_lifetime_s=cfg.session_lifetime_s,
                max_update_bytes=cfg.max_update_bytes,
                shared_sessions=cfg.cluster,  # any worker continues any device's handshake and session
            ),
            blobs=self.blobs,
            on_model=self._on_model,
            leadership=self.leadership,
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the evaluator and the round loop (idempotent)."""
        if self.started:
            return
        self.started = True
        if self.evaluator is not None:
            pending = self.evaluator.submit_unevaluated(self.blobs)
            if pending:
                _log.info("evaluating %d model(s) published before the last stop", pending)
            self.evaluator.start()
        if self.config.round_loop:
            self._stop.clear()
            self._loop = threading.Thread(target=self._run_loop, name="qflare-rounds", daemon=True)
            self._loop.start()
        if self.config.gc_interval_s or self.config.scrub_interval_s:
            self._stop.clear()
            self._maintenance = threading.Thread(target=self._run_maintenance, name="qflare-maintenance", daemon=True)
            self._maintenance.start()

    def stop(self) -> None:
        """Stop the background threads and close the database (idempotent)."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(10.0)
            self._loop = None
        if self._maintenance is not None:
            self._maintenance.join(10.0)
            self._maintenance = None
        if self.evaluator is not None:
            self.evaluator.stop()
        self.started = False
        self.trackers.close()
        self._release_leadership()
        self.db.dispose()
        self._release_lock()

    def _release_leadership(self) -> None:
        if self.leadership is not None:
            self.leadership.release()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _run_loop(self) -> None:
        while not self._stop.wait(self.config.step_interval_s):
            self.step()

    def _run_maintenance(self) -> None:
        cfg = self.config
        now = time.monotonic()
        next_gc = now + cfg.gc_interval_s if cfg.gc_interval_s else None
        next_scrub = now + cfg.scrub_interval_s if cfg.scrub_interval_s else None
        while not self._stop.wait(min(1.0, cfg.gc_interval_s or 1.0, cfg.scrub_interval_s or 1.0)):
            now = time.monotonic()
            try:
                if next_gc is not None and now >= next_gc:
                    next_gc = now + cfg.gc_interval_s
                    self.coordinator.rounds.collect_garbage()
                if next_scrub is not None and now >= next_scrub:
                    next_scrub = now + cfg.scrub_interval_s
                    self.scrub()
            except Exception as exc:  # a full disk or an outage must not end the thread
                _log.error("store maintenance: %s: %s", type(exc).__name__, exc)

    def scrub(self) -> ScrubReport:
        """Re-hash every blob; log and record a security event for each newly found damaged or missing one."""
        report = verify_store(self.store, self.blobs, skip_events=self._scrub_reported)
        for problem in report.problems:
            if problem.path not in self._scrub_reported:
                _log.error("store scrub: %s", problem.describe())
                self._scrub_reported.add(problem.path)
        return report

    def step(self) -> None:
        """One tick of the round loop: deadlines, and the next round once enough devices are enrolled."""
        try:
            rnd = self.coordinator.rounds.step()
        except Exception as exc:  # the loop must outlive a database outage; log each new failure once
            message = f"{type(exc).__name__}: {exc}"
            if message != self._last_error:
                _log.error("round loop: %s", message)
                self._last_error = message
            return
        self._last_error = ""
        if rnd is not None and rnd.number != self._last_round:
            self._last_round = rnd.number
            reset = bind_round(rnd.number)
            try:
                _log.info(
                    "round %d open: %d device(s) selected, model v%d, deadline in %.0f s",
                    rnd.number,
                    len(rnd.selected),
                    rnd.base.version,
                    rnd.deadline - time.time(),
                )
            finally:
                reset()

    def _on_model(self, model: PublishedModel) -> None:
        """Called by the round state machine (inside its lock) for each published model."""
        number = model.version if model.round_number is None else model.round_number
        reset = bind_round(number)  # the records below carry the round they are about
        try:
            self._published(model, number)
        finally:
            reset()

    def _published(self, model: PublishedModel, number: int) -> None:
        row = self.store.get_round(number)
        seconds = None
        if row is not None and row.closed_at is not None:
            seconds = (row.closed_at - row.opened_at).total_seconds()
            self.metrics.round_duration.observe(seconds)
        self.metrics.rounds_published.inc()
        if self.trackers and model.round_number is not None:
            refused = self.metrics.refusals_total()
            scalars = {"participants": float(self.store.count_updates(number)), "refused": refused - self._refused_seen}
            self._refused_seen = refused
            if seconds is not None:
                scalars["round_seconds"] = seconds
            self.trackers.log(number, scalars)
        _log.info("round %d closed: model v%d %s", number, model.version, model.sha256[:16])
        if model.round_number is not None and model.round_number >= self.config.federation.rounds:
            _log.info(
                "federation finished: %d round(s) done, final model v%d %s",
                self.config.federation.rounds,
                model.version,
                model.sha256[:16],
            )
        if self.evaluator is not None:
            self.evaluator.submit(number, model.version, model.flat)

    def _on_evaluation(self, round_number: int, accuracy: float, loss: float) -> None:
        self.metrics.record_evaluation(round_number, accuracy, loss)
        if self.trackers:
            self.trackers.log(round_number, {"accuracy": accuracy, "loss": loss})

    # ------------------------------------------------------------------ read-only views
    def open_round(self) -> int | None:
        """Number of the round in progress (read without the round lock: one attribute read), or None."""
        rnd = self.coordinator.rounds.current
        return None if rnd is None else rnd.number

    def _round_opened(self) -> float | None:
        rnd = self.coordinator.rounds.current
        return None if rnd is None else rnd.opened

    def _active_devices(self) -> int:
        return len(self.store.list_devices(status="active"))

    def readiness(self) -> dict[str, Any]:
        """``{"ready": bool, "database": bool, "storage": bool, "coordinator": bool[, "error": str]}``.

        ``storage`` is false while writes fail (full disk): after a failed write, each call probes the
        blob store and the database with a real write, and reports ready again once both succeed."""
        out: dict[str, Any] = {
            "coordinator": getattr(self, "coordinator", None) is not None,
            "database": False,
            "storage": True,
        }
        try:
            with self.db.connect(write=False) as conn:
                conn.execute(text("SELECT 1"))
            out["database"] = True
        except SQLAlchemyError as exc:
            out["error"] = str(exc).splitlines()[0][:300]
        if out["database"] and (self.blobs.write_error is not None or self.store.write_error is not None):
            problem = self._probe_storage()
            if problem is not None:
                out["storage"] = False
                out["error"] = f"storage cannot be written: {problem}"[:300]
        out["ready"] = out["coordinator"] and out["database"] and out["storage"]
        return out

    def _probe_storage(self) -> str | None:
        """A real write to the blob store and the database; None when both succeed (and clear the fault)."""
        problem = self.blobs.probe()
        if problem is not None:
            return problem
        try:
            with self.db.connect(write=True) as conn:  # rewrites one row with itself: needs the journal
                conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        except SQLAlchemyError as exc:
            return str(exc).splitlines()[0][:300]
        self.store.write_error = None
        return None

    def history(self) -> list[dict[str, Any]]:
        """Every evaluated round model, oldest first."""
        closed = {r.round_number: r.closed_at for r in self.store.list_rounds()}
        out: list[dict[str, Any]] = []
        for m in self.store.list_models():
            ev = m.metrics.get("eval")
            if m.round_number is None or not isinstance(ev, dict):
                continue
            at = closed.get(m.round_number)
            out.append(
                {
                    "round": m.round_number,
                    "model_version": m.version,
                    "model_sha256": m.model_hash,
                    "accuracy": ev.get("accuracy"),
                    "loss": ev.get("loss"),
                    "updates": m.metrics.get("updates"),
                    "examples": m.metrics.get("examples"),
                    "train_loss": m.metrics.get("train_loss"),
                    "closed_at": at.isoformat() if at is not None else None,
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.coordinator.rounds.status())
        if self.leadership is not None:
            out["worker"] = {"pid": os.getpid(), "leader": self.leadership.held}
        out["history"] = self.history()
        out["devices"] = self._active_devices()
        return out

    def identity_info(self) -> dict[str, Any]:
        """The ``GET /v1/identity`` document: the signing key and suite devices pin, and the model
        devices must train (name, architecture fingerprint, input shape, classes, input normalisation),
        so a device with another model refuses before it enrolls (``docs/protocol.md`` section 9.1)."""
        pub = self.identity.public
        return {
            "alg": pub.alg,
            "public_key": pub.raw.hex(),
            "key_id": pub.key_id,
            "suite": self.config.federation.suite.name,
            "model": model.lower() if isinstance(model := self.config.federation.model, str) else "custom",
            "arch": self.layout.fingerprint,
            **self.data_shape,
        }

    def rotation_info(self) -> dict[str, Any]:
        """The rotation chain as served at ``/v1/rotations`` (read at start; restart after a rotation)."""
        chain = self.rotations
        return {
            "current_key_id": self.identity.key_id,
            "head_sha256": chain.head_hash.hex(),
            "records": [r.raw.hex() for r in chain.records],
        }

    def __repr__(self) -> str:
        return f"ServerRuntime({str(self.data_dir)!r}, db={self.db.url!r}, pid={os.getpid()})"
