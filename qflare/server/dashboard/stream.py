"""Live updates for the dashboard: server-sent events carrying the federation's state as it changes.

One :class:`LiveState` per app reads the state at most once per ``interval_s`` whatever the number of open
pages (the database is read once, not once per viewer), and says which areas changed (``overview``,
``devices``, ``rounds``, ``events``, ``tokens``, ``ledger``) so each page re-reads only its own.  A stream
ends when its operator session does; at most ``max_streams`` are open at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..runtime import ServerRuntime

__all__ = ["AREAS", "LiveState", "sse_events"]

AREAS = ("overview", "devices", "rounds", "events", "tokens", "ledger")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LiveState:
    """The current overview plus a fingerprint of each area, cached for ``interval_s``."""

    def __init__(self, runtime: ServerRuntime, interval_s: float = 1.0, max_streams: int = 32) -> None:
        self.runtime, self.interval_s, self.max_streams = runtime, interval_s, max_streams
        self.open_streams = 0
        self._lock = threading.Lock()
        self._at = -1e9
        self._value: dict[str, Any] = {}

    def overview(self) -> dict[str, Any]:
        """What the overview page shows: the round manager's live state, device counts, evaluated history."""
        rt = self.runtime
        status = dict(rt.coordinator.rounds.status())
        deadline = status.get("deadline")
        status["deadline_in_s"] = max(0.0, deadline - time.time()) if isinstance(deadline, (int, float)) else None
        devices = rt.store.list_devices()
        by_status: dict[str, int] = {}
        for d in devices:
            by_status[d.status] = by_status.get(d.status, 0) + 1
        status["devices"] = by_status
        status["updates_total"] = rt.store.count_updates()
        latest = rt.store.current_round()
        status["last_round"] = latest.round_number if latest is not None else None
        status["last_round_state"] = latest.state if latest is not None else None
        return status

    def read(self) -> dict[str, Any]:
        """``{"overview": ..., "versions": {area: fingerprint}}``, at most ``interval_s`` old."""
        with self._lock:
            now = time.monotonic()
            if now - self._at < self.interval_s and self._value:
                return self._value
            store = self.runtime.store
            overview = self.overview()
            last_event = store.security_events(1)
            head = store.last_ledger_entry()
            rounds = store.list_rounds(1)
            models = store.latest_model()
            versions = {
                "overview": _digest({k: v for k, v in overview.items() if k != "deadline_in_s"}),
                "devices": _digest([(d.device_id, d.status) for d in store.list_devices()]),
                "rounds": _digest([(r.round_number, r.state) for r in rounds] + [models.version if models else None]),
                "events": str(last_event[0].id) if last_event else "0",
                "tokens": _digest([(t.token_hash, t.used_at, t.revoked_at) for t in store.list_tokens(50)]),
                "ledger": str(head.seq) if head is not None else "0",
            }
            self._value, self._at = {"overview": overview, "versions": versions}, now
            return self._value


async def sse_events(
    request: Request, live: LiveState, still_logged_in: Callable[[], bool], *, keepalive_s: float = 15.0
) -> AsyncIterator[str]:
    """The event stream of one page: an ``update`` event whenever an area changed (the first at once), a
    comment every ``keepalive_s`` otherwise, and ``logout`` (then the end) once the session is over."""
    sent: dict[str, str] = {}
    quiet_since = time.monotonic()
    live.open_streams += 1
    try:
        while not await request.is_disconnected():
            if not await run_in_threadpool(still_logged_in):
                yield "event: logout\ndata: {}\n\n"
                return
            state = await run_in_threadpool(live.read)
            versions: dict[str, str] = state["versions"]
            changed = [a for a in AREAS if sent.get(a) != versions.get(a)]
            if changed:
                sent = dict(versions)
                payload = json.dumps({"changed": changed, "overview": state["overview"]}, default=str)
                yield f"event: update\ndata: {payload}\n\n"
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= keepalive_s:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(live.interval_s)
    finally:
        live.open_streams -= 1
