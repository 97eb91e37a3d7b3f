"""What every request passes before the coordinator sees it: rate limits, upload slots, refusal records.

Refusals decided here (rate limit, oversize, wrong Content-Type, slow body, bad admin credentials)
never reach :meth:`~qflare.protocol.Coordinator.handle`, so the gate records them as security events
itself.  Every recorded refusal, the gate's and the coordinator's, passes one :class:`EventThrottle`:
a flood of one refusal from one address writes a bounded number of rows.

The session id is a cleartext header: it is not proof of anything until a frame authenticates under
it.  So a request only *looks* at its session's token bucket on the way in, and the bucket is charged
once the coordinator has authenticated the frame (:meth:`RequestGate.charge_session`): garbage sent
under a device's session id is charged to the sender's address, never to the device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import ErrorCode, QflareError, RateLimitedError
from ..storage import Store
from .limits import EventThrottle, HttpLimits, RateDecision, RateLimiter, read_body, require_media_type
from .metrics import ServerMetrics

__all__ = ["SESSION_HEADER", "RequestGate", "remote_of"]

SESSION_HEADER = "X-Qflare-Session"
_MAX_KEY = 128
_log = logging.getLogger("qflare.server")


def remote_of(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


class RequestGate:
    """Per-address and per-session token buckets, the upload semaphore, and refusal recording."""

    def __init__(self, limits: HttpLimits, store: Store, metrics: ServerMetrics) -> None:
        self.limits, self._store, self._metrics = limits, store, metrics
        self.by_address = RateLimiter(limits.ip_rate, limits.ip_burst, report_interval_s=limits.event_interval_s)
        self.by_session = RateLimiter(
            limits.session_rate, limits.session_burst, report_interval_s=limits.event_interval_s
        )
        self.by_address_ops = RateLimiter(limits.ops_rate, limits.ops_burst, report_interval_s=limits.event_interval_s)
        self.by_address_keys = RateLimiter(
            limits.keys_rate, limits.keys_burst, report_interval_s=limits.event_interval_s
        )
        self.events = EventThrottle(limits.event_burst, limits.event_interval_s)
        self._uploads: asyncio.Semaphore | None = None
        self._uploads_loop: asyncio.AbstractEventLoop | None = None

    def throttled(self, reason: str, detail: str, remote: str | None, device_id: str | None) -> str | None:
        """``detail`` to record, or None when this refusal is only counted (see :class:`EventThrottle`)."""
        if reason == ErrorCode.RATE_LIMITED:
            return detail  # the rate limiter throttles its own events
        counted = self.events.admit(reason, remote, device_id)
        if counted is None:
            return None
        if counted:
            detail = f"{detail} (+{counted} more such refusal(s) not recorded one by one)"
        return detail

    async def record(self, reason: str, detail: str, request: Request, session_id: str | None = None) -> None:
        """Persist a security event off the event loop; a database outage is logged, not raised."""
        kept = self.throttled(reason, detail, remote_of(request), None)
        if kept is None:
            return
        detail = kept
        try:
            await run_in_threadpool(
                self._store.record_security_event, reason, detail, session_id=session_id, remote_addr=remote_of(request)
            )
        except SQLAlchemyError as exc:
            _log.error("could not record security event %s: %s", reason, str(exc).splitlines()[0])

    async def refuse(self, exc: QflareError, request: Request, session_id: str | None = None) -> QflareError:
        """Record ``exc`` as a security event and hand it back for raising."""
        await self.record(exc.code, f"{request.method} {request.url.path}: {exc}", request, session_id)
        return exc

    async def admit(self, request: Request, session_id: str | None = None) -> None:
        """Take a token from the client's address bucket (and look at its session's, see the module
        docstring); RateLimitedError if empty."""
        remote = remote_of(request)
        decision = self.by_address.check(remote[:_MAX_KEY])
        scope = f"address {remote}"
        if decision.allowed and session_id:
            decision = self.by_session.check(session_id[:_MAX_KEY], take=False)
            scope = "session"
        if not decision.allowed:
            await self._rate_limited(decision, scope, request, session_id)

    def charge_session(self, session_id: str | None) -> None:
        """Charge a request to its session once a frame has authenticated under it."""
        if session_id:
            self.by_session.charge(session_id[:_MAX_KEY])

    async def admit_ops(self, request: Request) -> None:
        """The operations endpoints' own per-address bucket (``/metrics``, ``/readyz``)."""
        remote = remote_of(request)
        decision = self.by_address_ops.check(remote[:_MAX_KEY])
        if not decision.allowed:
            await self._rate_limited(decision, f"address {remote}", request, None)

    async def admit_keys(self, request: Request) -> None:
        """The public-key routes' own per-address bucket (enrollment and the handshake hello)."""
        remote = remote_of(request)
        decision = self.by_address_keys.check(remote[:_MAX_KEY])
        if not decision.allowed:
            await self._rate_limited(decision, f"address {remote} (public-key routes)", request, None)

    async def media_type(self, request: Request, expected: str, session_id: str | None = None) -> None:
        """Refuse (recorded) a request whose Content-Type is not ``expected``."""
        try:
            require_media_type(request, expected)
        except QflareError as exc:
            raise await self.refuse(exc, request, session_id) from None

    async def _rate_limited(self, decision: RateDecision, scope: str, request: Request, session_id: str | None) -> None:
        exc = RateLimitedError(
            f"too many requests from this {scope.split()[0]}; retry in {decision.retry_after_s:.2f} s",
            retry_after_s=decision.retry_after_s,
        )
        if decision.report:
            detail = f"{request.method} {request.url.path}: {scope} over its rate limit ({decision.refused_since_report} refusal(s) since the last event)"
            await self.record(exc.code, detail, request, session_id)
        raise exc

    async def body(self, request: Request, limit: int, session_id: str | None = None) -> bytes:
        """The request body under ``limit`` (an oversize refusal is recorded before it is raised)."""
        try:
            return await read_body(request, limit, grace_s=self.limits.body_grace_s, min_rate=self.limits.min_body_rate)
        except QflareError as exc:
            raise await self.refuse(exc, request, session_id) from None

    @asynccontextmanager
    async def upload_slot(self) -> AsyncIterator[None]:
        """One of ``max_concurrent_uploads`` slots: hold it while reading and processing an update."""
        loop = asyncio.get_running_loop()
        if self._uploads is None or self._uploads_loop is not loop:
            self._uploads, self._uploads_loop = asyncio.Semaphore(self.limits.max_concurrent_uploads), loop
        sem = self._uploads
        self._metrics.uploads_waiting.inc()
        try:
            await sem.acquire()
        finally:
            self._metrics.uploads_waiting.dec()
        self._metrics.uploads_in_flight.inc()
        try:
            yield
        finally:
            self._metrics.uploads_in_flight.dec()
            sem.release()
