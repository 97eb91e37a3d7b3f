"""Request limits of the HTTP layer: body sizes, token-bucket rate limits, upload concurrency.

Everything here is refused *before* the coordinator sees the request, so it is cheap: a body over its
route's limit is refused from its ``Content-Length`` alone, or as soon as the streamed bytes pass the
limit (chunked uploads), never after buffering all of it.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from starlette.requests import ClientDisconnect, Request

from ..errors import ConfigError, FrontDoorError, MalformedError, OversizeError

__all__ = [
    "EventThrottle",
    "HttpLimits",
    "RateDecision",
    "RateLimiter",
    "declared_length",
    "read_body",
    "require_media_type",
]

_DIGITS = re.compile(r"[0-9]{1,20}")
_FRAME_OVERHEAD = 4096
"""Bytes a sealed channel frame adds around its plaintext (header, nonce, tag), with room to spare."""


@dataclass(frozen=True)
class HttpLimits:
    """Limits of the HTTP layer (see ``docs/operations.md``)."""

    max_concurrent_uploads: int = 8
    """Update bodies read and processed at once; further uploads wait before their body is read."""
    small_body_bytes: int = 64 * 1024
    """Largest body of every route but ``/v1/update`` (enrollment, handshake, task, model, admin)."""
    ip_rate: float = 50.0
    """Requests per second per client address (token refill rate)."""
    ip_burst: float = 200.0
    """Bucket size per client address."""
    session_rate: float = 10.0
    """Requests per second per session (``X-Qflare-Session``)."""
    session_burst: float = 40.0
    event_interval_s: float = 10.0
    """A rate-limited client is recorded as a security event at most once per this interval (the
    event says how many refusals it stands for), so a flood cannot turn into a flood of writes."""
    event_burst: int = 10
    """Other refusals: the same code from the same address about the same device (or none) is recorded
    individually this many times per ``event_interval_s``; the rest are counted into the next event."""
    ops_rate: float = 2.0
    """Requests per second per client address to ``/metrics`` and ``/readyz`` (a bucket of their own:
    a scrape every few seconds and the probes of an orchestrator stay far below it)."""
    ops_burst: float = 30.0
    keys_rate: float = 5.0
    """Requests per second per client address to the public-key routes (``/v1/enroll`` and
    ``/v1/handshake/hello``: each one costs the coordinator a signature verification and, once checked, a
    signature and a key encapsulation).  A device runs them once per session; an address that sends more
    is flooding, and each refusal here costs nothing of the kind."""
    keys_burst: float = 20.0
    """Devices behind one address (NAT) reconnecting together after a restart fit in this burst; more wait
    for the refill (429 with Retry-After, which the device waits out)."""
    body_grace_s: float = 10.0
    """A request body may take this long before the minimum transfer rate applies."""
    min_body_rate: float = 8 * 1024.0
    """Bytes per second a body must average after the grace period (else 408 ``slow_body``): a client
    trickling bytes cannot hold a connection, or an upload slot, for long."""

    def __post_init__(self) -> None:
        if self.max_concurrent_uploads < 1:
            raise ConfigError("max_concurrent_uploads must be >= 1")
        if self.small_body_bytes < 1024:
            raise ConfigError("small_body_bytes must be >= 1024")
        if self.event_burst < 1:
            raise ConfigError("event_burst must be >= 1 (the first refusal is always recorded)")
        for name in (
            "ip_rate",
            "ip_burst",
            "session_rate",
            "session_burst",
            "ops_rate",
            "ops_burst",
            "body_grace_s",
            "min_body_rate",
            "event_interval_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number")
        if self.ip_burst < 1 or self.session_burst < 1 or self.ops_burst < 1:
            raise ConfigError("bursts must be >= 1 (a bucket must hold at least one request)")

    def update_body_bytes(self, max_update_bytes: int) -> int:
        """Largest ``/v1/update`` body: the coordinator's plaintext limit plus the frame overhead."""
        return max_update_bytes + _FRAME_OVERHEAD


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: float = 0.0
    report: bool = False
    """True when this refusal should be recorded as a security event (throttled per key)."""
    refused_since_report: int = 0
    """Refusals of this key since its last recorded event, this one included."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    last_report: float = -math.inf
    refused: int = 0


class RateLimiter:
    """Token buckets keyed by a string (client address, session id), least recently used evicted.

    ``max_keys`` bounds memory when clients invent keys (random session ids): the evicted bucket was
    the least recently used, and a newcomer starts with a full bucket.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        report_interval_s: float = 10.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._interval, self._max_keys, self._clock = report_interval_s, max_keys, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        return bucket

    def check(self, key: str, *, take: bool = True) -> RateDecision:
        """Take one token for ``key`` if there is one (``take=False``: only look; an unknown key, whose
        bucket would be full, is then allowed without creating a bucket)."""
        now = self._clock()
        with self._lock:
            if not take and key not in self._buckets:
                return RateDecision(True)
            bucket = self._bucket(key, now)
            if bucket.tokens >= 1.0:
                if take:
                    bucket.tokens -= 1.0
                return RateDecision(True)
            bucket.refused += 1
            retry = (1.0 - bucket.tokens) / self.rate
            if now - bucket.last_report >= self._interval:
                count, bucket.refused, bucket.last_report = bucket.refused, 0, now
                return RateDecision(False, retry, True, count)
            return RateDecision(False, retry)

    def charge(self, key: str) -> None:
        """Take one token for ``key`` after the fact (never below empty): the request it pays for was
        admitted by a look (``check(take=False)``) and proved to belong to ``key``."""
        now = self._clock()
        with self._lock:
            bucket = self._bucket(key, now)
            bucket.tokens = max(0.0, bucket.tokens - 1.0)


@dataclass
class _Window:
    start: float
    recorded: int = 0
    suppressed: int = 0


class EventThrottle:
    """Bounds the security-event rows a flood of one refusal can write.

    Keyed by (reason, address, device): the first ``burst`` refusals of a key in an ``interval_s`` window
    are recorded at once; the rest are only counted, and the next recorded event of that key says how many
    it stands for.  At most ``max_keys`` keys are remembered (least recently used forgotten).
    """

    def __init__(
        self,
        burst: int,
        interval_s: float,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.interval_s, self._max_keys, self._clock = burst, interval_s, max_keys, clock
        self._windows: OrderedDict[tuple[str, str | None, str | None], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, reason: str, remote: str | None, device_id: str | None) -> int | None:
        """None: do not record this refusal (it was counted); else record it, and the int is how many
        refusals of the same key were counted without a row since the last one recorded."""
        key = (reason, remote, device_id)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(now)
                if len(self._windows) > self._max_keys:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end(key)
                if now - window.start >= self.interval_s:
                    window.start, window.recorded = now, 0
            if window.recorded >= self.burst:
                window.suppressed += 1
                return None
            window.recorded += 1
            counted, window.suppressed = window.suppressed, 0
            return counted


def require_media_type(request: Request, expected: str) -> None:
    """FrontDoorError ``unsupported_media_type`` (415) unless the Content-Type is ``expected`` (parameters
    such as ``charset`` are ignored, case is not significant)."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() != expected:
        shown = given[:80] if given else "none"
        raise FrontDoorError(f"Content-Type must be {expected} (got {shown})", code="unsupported_media_type")


def declared_length(request: Request, limit: int) -> int:
    """The declared Content-Length, required and within ``limit`` (read from the headers only)."""
    declared = request.headers.get("content-length")
    if declared is None:
        raise FrontDoorError("an upload must declare its Content-Length", code="length_required")
    if not _DIGITS.fullmatch(declared.strip()):
        raise MalformedError("Content-Length is not a non-negative integer", code="bad_content_length")
    if int(declared) > limit:
        raise OversizeError(f"request body of {int(declared)} bytes exceeds this route's limit of {limit} bytes")
    return int(declared)


async def read_body(
    request: Request,
    limit: int,
    *,
    grace_s: float = math.inf,
    min_rate: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """The request body, refused with OversizeError (413) as soon as it is known to exceed ``limit``.

    A declared ``Content-Length`` over the limit is refused before a byte is read; otherwise (chunked
    bodies, or a client that lies) the stream is counted while it is read and abandoned when it passes
    the limit, so at most ``limit`` plus one chunk is ever held.

    The body must arrive at ``min_rate`` bytes per second on average once ``grace_s`` has passed: after
    ``grace_s + received / min_rate`` seconds without the next chunk the read is abandoned with
    FrontDoorError ``slow_body`` (408), whether the client trickles bytes or sends none.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.fullmatch(declared.strip()):
            raise MalformedError("Content-Length is not a non-negative integer", code="bad_content_length")
        if int(declared) > limit:
            raise OversizeError(f"request body of {int(declared)} bytes exceeds this route's limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    start = clock()
    stream = request.stream().__aiter__()
    try:
        while True:
            due = grace_s + size / min_rate if min_rate > 0 else math.inf
            with anyio.move_on_after(due - (clock() - start)) as waited:
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if waited.cancelled_caught:
                raise FrontDoorError(
                    f"request body too slow: {size} bytes in {clock() - start:.1f} s (the minimum is "
                    f"{min_rate:.0f} bytes/s after {grace_s:.0f} s)",
                    code="slow_body",
                )
            size += len(chunk)
            if size > limit:
                raise OversizeError(f"request body exceeds this route's limit of {limit} bytes")
            if chunk:
                chunks.append(chunk)
    except ClientDisconnect:
        raise MalformedError(
            "the client disconnected before sending the whole body", code="client_disconnected"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
