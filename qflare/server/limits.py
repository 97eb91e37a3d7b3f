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

from starlette.requests import ClientDisconnect, Request

from ..errors import ConfigError, MalformedError, OversizeError

__all__ = ["HttpLimits", "RateDecision", "RateLimiter", "read_body"]

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

    def __post_init__(self) -> None:
        if self.max_concurrent_uploads < 1:
            raise ConfigError("max_concurrent_uploads must be >= 1")
        if self.small_body_bytes < 1024:
            raise ConfigError("small_body_bytes must be >= 1024")
        for name in ("ip_rate", "ip_burst", "session_rate", "session_burst"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number")
        if self.ip_burst < 1 or self.session_burst < 1:
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

    def check(self, key: str) -> RateDecision:
        """Take one token for ``key`` if there is one."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self.burst, now)
                if len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
                bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return RateDecision(True)
            bucket.refused += 1
            retry = (1.0 - bucket.tokens) / self.rate
            if now - bucket.last_report >= self._interval:
                count, bucket.refused, bucket.last_report = bucket.refused, 0, now
                return RateDecision(False, retry, True, count)
            return RateDecision(False, retry)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with OversizeError (413) as soon as it is known to exceed ``limit``.

    A declared ``Content-Length`` over the limit is refused before a byte is read; otherwise (chunked
    bodies, or a client that lies) the stream is counted while it is read and abandoned when it passes
    the limit, so at most ``limit`` plus one chunk is ever held.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.fullmatch(declared.strip()):
            raise MalformedError("Content-Length is not a non-negative integer", code="bad_content_length")
        if int(declared) > limit:
            raise OversizeError(f"request body of {int(declared)} bytes exceeds this route's limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
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
