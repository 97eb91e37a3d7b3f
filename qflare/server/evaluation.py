"""Server-side evaluation: each published global model is scored on the data set's test split.

A single background thread owns one model instance and works through a queue, so publishing a round
(which happens inside a device's request) never waits for an evaluation.  The forward pass runs in the
federation's ``train.precision`` (``qflare server --precision``), resolved for the CPU; loss and accuracy
are float32 either way.  Results are stored with the model version (``metrics["eval"]``), so
``/v1/status`` shows them after a restart; a model published but not yet evaluated when the server
stopped is evaluated on the next start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from sqlalchemy.exc import SQLAlchemyError

from ..data import ArrayDataset
from ..errors import QflareError
from ..precision import Precision, resolve_precision
from ..storage import BlobBackend, Store
from ..training import evaluate
from ..wire import ParamLayout, decode_blob
from .logs import bind_round

__all__ = ["Evaluator"]

_log = logging.getLogger("qflare.server")
_Item = tuple[int, int, torch.Tensor]  # (round, model version, flat weights)


class Evaluator:
    """Evaluates global models in a background thread (see the module docstring)."""

    def __init__(
        self,
        *,
        make_model: Callable[[], torch.nn.Module],
        layout: ParamLayout,
        test: ArrayDataset,
        store: Store,
        on_result: Callable[[int, float, float], None] | None = None,
        precision: str = "fp32",
    ) -> None:
        self.precision: Precision = resolve_precision(precision, "cpu")
        """What evaluation runs in (the model is evaluated on the CPU; ``auto`` resolves here)."""
        self._make_model, self._layout, self._store, self._on_result = make_model, layout, store, on_result
        self._inputs, self._targets = test.normalized(), test.labels
        self._queue: queue.Queue[_Item | None] = queue.Queue()  # None: stop
        self._queued: set[int] = set()
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def examples(self) -> int:
        return int(self._targets.shape[0])

    def submit(self, round_number: int, version: int, flat: torch.Tensor) -> None:
        """Queue one model version (called from the round state machine: must not block)."""
        with self._cond:
            if version in self._queued:
                return
            self._queued.add(version)
            self._busy += 1
        self._queue.put((round_number, version, flat))

    def submit_unevaluated(self, blobs: BlobBackend) -> int:
        """Queue every round model that has no stored evaluation (after a restart); returns how many."""
        count = 0
        for row in self._store.list_models():
            if row.round_number is None or isinstance(row.metrics.get("eval"), dict):
                continue
            blob = blobs.get(row.model_hash)
            flat = decode_blob(blob, self._layout, kind="model", expected_sha256=row.model_hash).flat
            self.submit(row.round_number, row.version, flat)
            count += 1
        return count

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qflare-evaluator", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the evaluation in progress, drop the rest (they run again on the next start)."""
        if self._thread is None:
            return
        while True:  # drop what is still queued
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                with self._cond:
                    self._busy -= 1
                    self._queued.discard(item[1])
                    self._cond.notify_all()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Block until every queued model is evaluated (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def _run(self) -> None:
        model = self._make_model()
        while True:
            item = self._queue.get()
            if item is None:
                return
            round_number, version, flat = item
            reset = bind_round(round_number)  # the records of this evaluation carry its round
            try:
                self._evaluate(model, round_number, version, flat)
            except (QflareError, SQLAlchemyError, RuntimeError) as exc:
                _log.error("evaluation of model version %d failed: %s", version, exc)
            finally:
                reset()
                with self._cond:
                    self._busy -= 1
                    self._queued.discard(version)
                    self._cond.notify_all()

    def _evaluate(self, model: torch.nn.Module, round_number: int, version: int, flat: torch.Tensor) -> None:
        start = time.perf_counter()
        self._layout.load_into(model, flat)
        loss, accuracy = evaluate(model, self._inputs, self._targets, precision=self.precision)
        seconds = time.perf_counter() - start
        self._store.record_model_evaluation(
            version, {"accuracy": accuracy, "loss": loss, "examples": self.examples, "seconds": round(seconds, 4)}
        )
        if self._on_result is not None:
            self._on_result(round_number, accuracy, loss)
        _log.info(
            "round %d: model v%d test accuracy %.4f loss %.4f (%d examples, %.2f s)",
            round_number,
            version,
            accuracy,
            loss,
            self.examples,
            seconds,
        )
