"""Prometheus metrics of one coordinator server (its own registry, so several can live in one process).

Counters and histograms are updated where things happen (HTTP layer, round publication, evaluation);
figures that live in the database or the round state machine (updates accepted, active devices, the
current round) are read when ``/metrics`` is scraped, so they are never out of step with the truth.
The evaluation figures (``qflare_eval_*``) are absent until a model has been evaluated (a 0.0 accuracy
would be a false reading), and prometheus-client's ProcessCollector adds ``qflare_process_*`` (CPU
seconds, resident memory, open files; Linux ``/proc``) to this registry.  Every series is ``qflare_``
prefixed and listed in docs/operations.md (``tests/test_metrics.py`` keeps the two in step).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["CONTENT_TYPE", "CRYPTO_OPS", "ROUND_PHASES", "LiveFigures", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_log = logging.getLogger("qflare.server")
ROUND_PHASES = ("waiting", "open", "aggregating", "finished")
"""The round state machine's phases (``/v1/status`` ``state``), each a ``qflare_round_phase`` series."""
CRYPTO_OPS = ("enroll_verify", "enroll_sign", "handshake_respond", "handshake_finish", "update_open", "update_ack")
"""The coordinator's timed cryptographic steps (``qflare_crypto_seconds{op}``, see docs/operations.md)."""


@dataclass(frozen=True)
class LiveFigures:
    """What the scrape-time collector reads: each callable may raise SQLAlchemyError when the DB is down."""

    round_status: Callable[[], dict[str, object]]
    updates_accepted: Callable[[], int]
    active_devices: Callable[[], int]
    quarantined_devices: Callable[[], int]
    round_opened: Callable[[], float | None]
    """When the round in progress opened (Unix seconds), None when none is."""
    pending_handshakes: Callable[[], int]


class _LiveCollector(Collector):
    def __init__(self, figures: LiveFigures) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        status = self._figures.round_status()
        rnd = status.get("round")
        yield GaugeMetricFamily(
            "qflare_current_round",
            "Number of the open round (0 when none is open).",
            value=float(rnd) if isinstance(rnd, int) else 0.0,
        )
        accepted = status.get("accepted", 0)
        yield GaugeMetricFamily(
            "qflare_round_updates",
            "Updates accepted in the open round.",
            value=float(accepted) if isinstance(accepted, int) else 0.0,
        )
        state = status.get("state")
        phase = GaugeMetricFamily(
            "qflare_round_phase", "1 for the round state machine's current phase, 0 for the others.", labels=["phase"]
        )
        for name in ROUND_PHASES:
            phase.add_metric([name], 1.0 if state == name else 0.0)
        yield phase
        opened, deadline = self._figures.round_opened(), status.get("deadline")
        if opened is not None:
            yield GaugeMetricFamily(
                "qflare_round_opened_timestamp_seconds", "When the round in progress opened (Unix time).", value=opened
            )
        if isinstance(deadline, int | float):
            yield GaugeMetricFamily(
                "qflare_round_deadline_timestamp_seconds",
                "Deadline of the round in progress (Unix time).",
                value=float(deadline),
            )
        yield GaugeMetricFamily(
            "qflare_handshakes_pending",
            "Handshakes answered (SERVER_HELLO sent) and awaiting their CLIENT_FINISH.",
            value=float(self._figures.pending_handshakes()),
        )
        version = status.get("model_version", 0)
        yield GaugeMetricFamily(
            "qflare_model_version",
            "Version of the current global model.",
            value=float(version) if isinstance(version, int) else 0.0,
        )
        up = GaugeMetricFamily("qflare_database_up", "1 when the last scrape could read the database.")
        try:
            updates, devices = self._figures.updates_accepted(), self._figures.active_devices()
            quarantined = self._figures.quarantined_devices()
        except SQLAlchemyError as exc:
            _log.warning("metrics: database unreadable: %s", str(exc).splitlines()[0])
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield CounterMetricFamily(
            "qflare_updates_accepted", "Updates accepted and recorded, all rounds.", value=updates
        )
        yield GaugeMetricFamily(
            "qflare_devices_active",
            "Enrolled devices that are active (neither revoked nor quarantined).",
            value=devices,
        )
        yield GaugeMetricFamily(
            "qflare_devices_quarantined",
            "Enrolled devices quarantined (by detection or an operator), not revoked.",
            value=quarantined,
        )


class _EvalCollector(Collector):
    """The newest evaluation, or nothing at all before the first one."""

    def __init__(self) -> None:
        self.newest: tuple[int, float, float] | None = None  # (round, accuracy, loss)

    def collect(self) -> Iterator[Metric]:
        newest = self.newest
        if newest is None:
            return
        rnd, accuracy, loss = newest
        yield GaugeMetricFamily("qflare_eval_accuracy", "Test accuracy of the newest evaluated model.", value=accuracy)
        yield GaugeMetricFamily("qflare_eval_loss", "Test loss of the newest evaluated model.", value=loss)
        yield GaugeMetricFamily("qflare_eval_round", "Round of the newest evaluated model.", value=float(rnd))


class _WithoutCreated(Collector):
    """The registry's families without their ``*_created`` samples: in the 0.0.4 text format
    prometheus-client writes each as a gauge family of its own, one per counter and histogram, which
    no dashboard or alert here reads (the process-wide switch, ``disable_created_metrics``, would change
    every registry of an embedding process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class ServerMetrics:
    """The server's metrics; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "qflare_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=reg,
        )
        self.refusals = Counter("qflare_refusals", "Refused requests by reason code.", ["reason"], registry=reg)
        self.updates_refused = Counter(
            "qflare_updates_refused",
            "Update uploads (POST /v1/update) refused, by reason code.",
            ["reason"],
            registry=reg,
        )
        self.received_bytes = Counter(
            "qflare_http_received_bytes", "Request body bytes received, by route template.", ["route"], registry=reg
        )
        self.sent_bytes = Counter(
            "qflare_http_sent_bytes", "Response body bytes sent, by route template.", ["route"], registry=reg
        )
        self.handshakes = Counter(
            "qflare_handshakes",
            "Handshake requests by step (hello, finish) and outcome (ok, refused).",
            ["step", "outcome"],
            registry=reg,
        )
        self.crypto_seconds = Histogram(
            "qflare_crypto_seconds",
            "Time of the coordinator's cryptographic steps, by step.",
            ["op"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=reg,
        )
        self.upload_slots = Gauge("qflare_upload_slots", "Upload slots (--max-uploads).", registry=reg)
        self.upload_bytes = Histogram(
            "qflare_upload_bytes",
            "Size of update bodies read.",
            buckets=(1e4, 1e5, 1e6, 2e6, 4e6, 8e6, 16e6, 32e6, 64e6),
            registry=reg,
        )
        self.uploads_in_flight = Gauge(
            "qflare_uploads_in_flight", "Update bodies being read or processed.", registry=reg
        )
        self.uploads_waiting = Gauge("qflare_uploads_waiting", "Uploads waiting for an upload slot.", registry=reg)
        self.round_duration = Histogram(
            "qflare_round_duration_seconds",
            "Time from opening a round to publishing its model.",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
            registry=reg,
        )
        self.rounds_published = Counter("qflare_rounds_published", "Rounds aggregated into a new model.", registry=reg)
        self.request_seconds = Histogram(
            "qflare_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template (not raw path) and method.",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=reg,
        )
        self._eval = _EvalCollector()
        reg.register(self._eval)
        # qflare_process_cpu_seconds_total, qflare_process_resident_memory_bytes, ...
        ProcessCollector(namespace="qflare", registry=reg)
        self._live: _LiveCollector | None = None
        self._lock = threading.Lock()

    def attach(self, figures: LiveFigures) -> None:
        """Register the scrape-time figures (once)."""
        if self._live is None:
            self._live = _LiveCollector(figures)
            self.registry.register(self._live)

    def record_evaluation(self, round_number: int, accuracy: float, loss: float) -> None:
        with self._lock:  # the newest round wins if evaluations finish out of order
            newest = self._eval.newest
            if newest is not None and round_number < newest[0]:
                return
            self._eval.newest = (round_number, accuracy, loss)

    def observe_crypto(self, op: str, seconds: float) -> None:
        """One timed cryptographic step of the coordinator (``op`` one of :data:`CRYPTO_OPS`)."""
        self.crypto_seconds.labels(op).observe(seconds)

    def refusals_total(self) -> float:
        """Requests refused so far, all reasons together."""
        return sum(
            sample.value
            for metric in self.refusals.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    def render(self) -> bytes:
        """Prometheus text exposition (reads the database: call it off the event loop)."""
        return generate_latest(_WithoutCreated(self.registry))
