"""Experiment tracking: per-round scalars to TensorBoard event files and/or an MLflow run.

One small observer, :class:`RoundTrackers`, is fed where round results are produced — the simulation's
``on_round`` (``qflare simulate``) and the server's round publication and evaluation (``qflare
server``) — with ``log(round, {name: value})``.  Names are the ``ROUND_SCALARS`` keys; a figure the
producer does not measure is not logged (never a placeholder 0).

Both back ends are optional (``pip install 'qflare[tracking]'``): TensorBoard event files are written
with ``torch.utils.tensorboard`` (which needs the ``tensorboard`` package), MLflow runs with
``mlflow.MlflowClient`` (``mlflow-skinny`` suffices) to any tracking URI (``file:DIR``, ``http://...``).
A requested back end that is not installed is a :class:`~qflare.errors.ConfigError` saying how to
install it — never a silent fallback.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError

__all__ = ["ROUND_SCALARS", "MlflowTracker", "RoundTracker", "RoundTrackers", "TensorBoardTracker", "open_trackers"]

ROUND_SCALARS: dict[str, str] = {
    "accuracy": "test accuracy of the round's global model",
    "loss": "test loss of the round's global model",
    "train_loss": "mean local training loss of the round's participants (simulation)",
    "participants": "updates aggregated into the round's model",
    "examples": "training examples behind those updates",
    "refused": "requests the server refused while the round was open (server)",
    "round_seconds": "time from opening the round to publishing its model",
}
_INSTALL = "pip install 'qflare[tracking]'"


class RoundTracker(Protocol):
    def log(self, round_number: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _clean(scalars: Mapping[str, float]) -> dict[str, float]:
    unknown = set(scalars) - set(ROUND_SCALARS)
    if unknown:
        raise ValueError(f"unknown round scalar(s): {', '.join(sorted(unknown))}")
    return {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}


class TensorBoardTracker:
    """Event files under ``log_dir`` (one scalar per name, tag ``round/<name>``, step = round)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                f"--tensorboard needs the tensorboard package, which is not installed: {_INSTALL}"
            ) from None
        try:
            self._writer = SummaryWriter(log_dir=str(log_dir))
        except OSError as exc:
            raise ConfigError(f"--tensorboard {log_dir}: cannot write there: {exc.strerror or exc}") from None
        self.log_dir = Path(log_dir)

    def log(self, round_number: int, scalars: Mapping[str, float]) -> None:
        for name, value in _clean(scalars).items():
            self._writer.add_scalar(f"round/{name}", value, global_step=round_number)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MlflowTracker:
    """One MLflow run at ``tracking_uri`` (experiment ``experiment``), metrics with step = round."""

    def __init__(
        self, tracking_uri: str, *, experiment: str = "qflare", run_name: str, params: Mapping[str, Any]
    ) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(f"--mlflow needs the mlflow package, which is not installed: {_INSTALL}") from None
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri)
            found = self._client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self._client.create_experiment(experiment)
            self.run_id: str = self._client.create_run(exp_id, run_name=run_name).info.run_id
            for key, value in list(params.items())[:100]:
                self._client.log_param(self.run_id, key, str(value)[:500])
        except Exception as exc:  # mlflow raises its own MlflowException, OSError, requests errors...
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"--mlflow {tracking_uri}: {type(exc).__name__}: {first[:300]}") from None

    def log(self, round_number: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, round_number) for name, value in _clean(scalars).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


class RoundTrackers:
    """Every tracker the user asked for; a failing back end is reported once and then left alone."""

    def __init__(self, trackers: list[RoundTracker], on_error: Callable[[str], None] | None = None) -> None:
        self.trackers = trackers
        self._lock = threading.Lock()
        self._on_error = on_error
        self._failed: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, round_number: int, scalars: Mapping[str, float]) -> None:
        with self._lock:  # the server logs from its round and evaluation threads
            for i, tracker in enumerate(self.trackers):
                if i in self._failed:
                    continue
                try:
                    tracker.log(round_number, scalars)
                except Exception as exc:  # a full disk or an unreachable MLflow must not stop training
                    self._failed.add(i)
                    if self._on_error is not None:
                        self._on_error(f"{type(tracker).__name__} stopped: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        with self._lock:
            for tracker in self.trackers:
                try:
                    tracker.close()
                except Exception as exc:
                    if self._on_error is not None:
                        self._on_error(f"{type(tracker).__name__} close: {type(exc).__name__}: {exc}")


def open_trackers(
    *,
    tensorboard: Path | None = None,
    mlflow: str | None = None,
    run_name: str = "qflare",
    params: Mapping[str, Any] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> RoundTrackers:
    """The trackers named by ``--tensorboard DIR`` / ``--mlflow URI`` (none: an empty, falsy set)."""
    trackers: list[RoundTracker] = []
    if tensorboard is not None:
        trackers.append(TensorBoardTracker(tensorboard))
    if mlflow is not None:
        try:
            trackers.append(MlflowTracker(mlflow, run_name=run_name, params=params or {}))
        except ConfigError:
            for t in trackers:
                t.close()
            raise
    return RoundTrackers(trackers, on_error)
