"""The HTTP transport: a device's protocol requests over HTTP(S) to ``qflare server`` (API v1).

Each :class:`~qflare.protocol.messages.Route` is ``POST /v1/<route>`` with an ``application/octet-stream``
body; requests inside a session carry ``X-Qflare-Session``.  One :class:`httpx.Client` (keep-alive) is
used for every request.

Failures fall in two classes:

* *transient* - connection errors, timeouts, HTTP 502/503/504 (whoever answered them) and any answer
  whose code has the retry meaning :attr:`~qflare.errors.Retry.TRANSIENT` (``rate_limited`` 429,
  ``database_unavailable`` 503) - are retried with exponential backoff and jitter (a ``Retry-After`` is
  honoured).  When the attempts run out the caller gets :class:`ServerUnavailableError` (or the 429's
  own :class:`~qflare.errors.RateLimitedError`).
* *refusals* - any other 4xx/5xx with the server's JSON ``{"code", "message"}`` body - are never retried:
  they are rebuilt as the typed error of that code with :func:`~qflare.errors.error_from_code`, so a
  :class:`~qflare.protocol.Device` sees exactly the exceptions it sees in process.

Error bodies are plain HTTP: anything on the path (a proxy, an impostor, a middlebox) can send them, so
every error rebuilt from one is marked :attr:`~qflare.errors.QflareError.unauthenticated`; the device
loop never lets such an error stop it (only the coordinator's signed and session-sealed answers can).

Answers are streamed and bounded: each route has a size limit (the model route's is set from the
model layout, :func:`model_response_limit`; the others are small), checked against ``Content-Length``
and while reading, so an oversized answer is refused (:class:`~qflare.errors.ResponseTooLargeError`)
without being buffered; and each attempt has a total deadline (``deadline_s``), not only a limit on
the gaps between reads, so a server trickling bytes cannot hold a device.  ``Retry-After`` is validated
(delta-seconds or an HTTP date) and capped at ``RetryPolicy.max_retry_after_s``.

What retrying cannot heal fails at once, naming the URL and the cause: a base URL that is not
``http(s)://host...`` (:class:`~qflare.errors.ConfigError` ``bad_server_url``, raised by the constructor),
and a TLS failure other than a dropped connection - ``https://`` against a plain-HTTP server, an untrusted
certificate - (:class:`TransportError` ``tls_error``, fatal; marked unauthenticated, so a running device
waits it out, while ``qflare client``'s first contact, the identity fetch, stops on it).  ``RetryPolicy.max_elapsed_s`` bounds the
retries of one call in time as well as in attempts, so a caller's own patience is not overrun by them.

The error classes (:class:`TransportError` and its subclasses) live in :mod:`qflare.errors`.

A :class:`CircuitBreaker` stops hammering a server that keeps failing: after ``failure_threshold``
consecutive transient failures it opens for ``reset_after_s`` (every call fails fast with
:class:`CircuitOpenError`), then lets one probe through (half-open); the probe's outcome closes or
re-opens it.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import tenacity

from ..crypto.envelope import DEFAULT_MAX_ENVELOPE
from ..errors import (
    CircuitOpenError,
    ConfigError,
    ErrorCode,
    QflareError,
    RateLimitedError,
    ResponseTooLargeError,
    Retry,
    ServerUnavailableError,
    TransportError,
    error_from_code,
)
from ..protocol.messages import Route
from .permanent import check_base_url, tls_failure

if TYPE_CHECKING:
    from ..wire import ParamLayout

__all__ = [
    "SESSION_HEADER",
    "CircuitBreaker",
    "CircuitOpenError",
    "HttpTransport",
    "RetryPolicy",
    "ServerUnavailableError",
    "TransportError",
    "check_base_url",
    "model_response_limit",
    "parse_retry_after",
]

SESSION_HEADER = "X-Qflare-Session"
_GATEWAY_STATUSES = frozenset({502, 503, 504})
"""Retried whatever the body says: a proxy in front of the coordinator answers these too."""
SMALL_RESPONSE_LIMIT = 1 << 20
"""Every answer but the model's: control messages, handshake, receipts, identity, error bodies (1 MiB)."""
DEFAULT_MODEL_LIMIT = 1 << 30
"""The model answer's limit until the layout sets it (:meth:`HttpTransport.limit_response`)."""
_ERROR_BODY_LIMIT = 64 * 1024
_DELTA_SECONDS = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?\Z")


def model_response_limit(layout: ParamLayout) -> int:
    """The largest MODEL answer a coordinator can send for ``layout``: the float32 tensors, a generous
    safetensors header (names, shapes, metadata), the signed envelope and framing, AEAD overhead."""
    header = 64 * 1024 + 512 * len(layout.names)
    return 4 * layout.numel + header + DEFAULT_MAX_ENVELOPE + 4 + 4096


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: ``attempts`` tries in all, waits ``initial_s * 2**k`` (capped
    at ``max_wait_s``) plus up to ``jitter_s`` of random jitter; a ``Retry-After`` is obeyed up to
    ``max_retry_after_s``.  With ``max_elapsed_s`` no retry starts whose wait would end more than that
    long after the first attempt began (the call then fails with the last cause)."""

    attempts: int = 5
    initial_s: float = 0.25
    max_wait_s: float = 5.0
    jitter_s: float = 0.25
    max_retry_after_s: float = 30.0
    max_elapsed_s: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if min(self.initial_s, self.max_wait_s, self.jitter_s, self.max_retry_after_s) < 0:
            raise ValueError("retry waits must be >= 0")
        if self.max_elapsed_s is not None and not self.max_elapsed_s >= 0:
            raise ValueError("max_elapsed_s must be >= 0")


class CircuitBreaker:
    """Closed -> (``failure_threshold`` consecutive failures) -> open -> (``reset_after_s``) -> half-open,
    where one probe call decides: success closes the circuit, failure opens it again."""

    def __init__(
        self, failure_threshold: int = 8, reset_after_s: float = 5.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failure_threshold < 1 or reset_after_s < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_after_s >= 0")
        self.failure_threshold, self.reset_after_s, self._clock = failure_threshold, reset_after_s, clock
        self._failures = 0
        self.last_failure = ""
        """The cause of the most recent failure (kept while the circuit is open, for messages)."""
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if self._clock() - self._opened_at >= self.reset_after_s else "open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def before_call(self) -> None:
        """Raise :class:`CircuitOpenError` unless a call may go out now."""
        with self._lock:
            if self._opened_at is None:
                return
            waited = self._clock() - self._opened_at
            if waited >= self.reset_after_s and not self._probing:
                self._probing = True  # this call is the half-open probe
                return
            retry_in = max(self.reset_after_s - waited, 0.0)
            last = f" (last: {self.last_failure})" if self.last_failure else ""
            raise CircuitOpenError(
                f"circuit open after {self._failures} consecutive failures to reach the coordinator{last}; "
                f"next attempt in {retry_in:.1f} s",
                retry_in_s=retry_in if retry_in > 0 else self.reset_after_s,
            )

    def record_success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probing = 0, None, False

    def record_failure(self, cause: str = "") -> None:
        with self._lock:
            self._failures += 1
            self.last_failure = cause or self.last_failure
            if self._probing or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            self._probing = False


class _Transient(Exception):
    """One failed attempt that may be retried (internal)."""

    def __init__(self, message: str, *, retry_after: float | None = None, response: httpx.Response | None = None):
        super().__init__(message)
        self.retry_after, self.response = retry_after, response


def parse_retry_after(
    value: str | None, *, now: Callable[[], float] = time.time, max_s: float = 3600.0
) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), at most ``max_s``; None when
    absent or invalid (signs, exponents, ``inf``/``nan``, hex and other junk are invalid)."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):
        seconds = float(value)
    elif len(value) <= 64 and not value[:1].isdigit():
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - now()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    else:
        return None
    return min(max(seconds, 0.0), max_s) if math.isfinite(seconds) else None


def _error_from_response(resp: httpx.Response) -> QflareError:
    """The typed error of an HTTP error answer (``{"code", "message"}``; FastAPI's ``{"detail"}`` too)."""
    code: str = ErrorCode.HTTP_ERROR
    message = f"HTTP {resp.status_code} {resp.reason_phrase or 'error'}"
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), str) and body["code"]:
            code = body["code"]
        detail = body.get("message", body.get("detail"))
        if detail is not None:
            message = detail if isinstance(detail, str) else json.dumps(detail)[:500]
    elif resp.content:
        message = resp.text[:500]
    error = error_from_code(code, message, resp.status_code)
    error.unauthenticated = True  # plain HTTP: whoever is on the path may have written it
    return error


def _ssl_verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)  # a CA bundle to trust
    return verify


class HttpTransport:
    """Carries protocol requests to ``base_url`` (see the module docstring).

    ``timeout`` bounds each gap between reads (and connecting); ``deadline_s`` (default ``timeout``)
    bounds each attempt as a whole, body included.  ``clock`` is the monotonic clock deadlines use."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        deadline_s: float | None = None,
        verify: bool | str | ssl.SSLContext = True,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.deadline_s = deadline_s if deadline_s is not None else timeout
        self._sleep, self._clock = sleep, clock
        self._limits: dict[str, int] = {"/v1/" + Route.MODEL.value: DEFAULT_MODEL_LIMIT}
        self._owns_client = client is None
        self._client = client or httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=_ssl_verify(verify),
            headers={"user-agent": "qflare-device/1", "accept-encoding": "identity", **(headers or {})},
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )

    def limit_response(self, route: Route | str, max_bytes: int) -> None:
        """Refuse answers on ``route`` (a Route or a path) longer than ``max_bytes``."""
        path = "/v1/" + route.value if isinstance(route, Route) else route
        self._limits[path] = int(max_bytes)

    def response_limit(self, path: str) -> int:
        return self._limits.get(path, SMALL_RESPONSE_LIMIT)

    # ------------------------------------------------------------------ Transport protocol
    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        headers = {"content-type": "application/octet-stream"}
        if session_id is not None:
            headers[SESSION_HEADER] = session_id
        return self.send("POST", "/v1/" + Route(route).value, content=bytes(body), headers=headers).content

    # ------------------------------------------------------------------ JSON endpoints
    def get_json(self, path: str, *, headers: Mapping[str, str] | None = None) -> Any:
        """GET ``path`` (e.g. ``/v1/identity``) and decode its JSON body."""
        return self._json(self.send("GET", path, headers=dict(headers or {})), path)

    def post_json(self, path: str, payload: Any, *, headers: Mapping[str, str] | None = None) -> Any:
        """POST a JSON body to ``path`` and decode the JSON answer (admin API)."""
        return self._json(self.send("POST", path, json=payload, headers=dict(headers or {})), path)

    @staticmethod
    def _json(resp: httpx.Response, path: str) -> Any:
        try:
            return resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ServerUnavailableError(
                f"{path}: the answer is not JSON ({resp.headers.get('content-type')})"
            ) from None

    # ------------------------------------------------------------------ core
    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with retries and the circuit breaker; a refusal raises its typed error."""
        policy = self.retry
        started = self._clock()
        backoff = tenacity.wait_exponential_jitter(
            multiplier=policy.initial_s, max=policy.max_wait_s, jitter=policy.jitter_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            if isinstance(exc, _Transient) and exc.retry_after is not None:
                return min(exc.retry_after, policy.max_retry_after_s)
            return float(backoff(state))

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= policy.attempts:
                return True
            budget = policy.max_elapsed_s
            return budget is not None and self._clock() - started + state.upcoming_sleep > budget

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, path, kwargs)
        except _Transient as exc:
            error = _error_from_response(exc.response) if exc.response is not None else None
            if isinstance(error, RateLimitedError):
                error.retry_after_s = exc.retry_after if exc.retry_after is not None else 1.0
                raise error from None
            tries = retrying.statistics.get("attempt_number", policy.attempts)
            unavailable = ServerUnavailableError(
                f"{method} {self.base_url}{path}: no answer after {tries} attempt(s): {exc}"
            )
            unavailable.retry_after_s = exc.retry_after
            raise unavailable from None

    def _attempt(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        self.breaker.before_call()
        try:
            resp = self._read(method, path, kwargs)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # a configuration mistake, not an outage
            raise ConfigError(f"{method} {self.base_url}{path}: {exc}", code="bad_server_url") from None
        except httpx.TransportError as exc:  # connect/read/write errors and timeouts
            tls = tls_failure(exc)
            if tls is not None:
                tls_error = TransportError(
                    f"{method} {self.base_url}{path}: TLS failed ({getattr(tls, 'reason', None) or tls}): is the server plain HTTP "
                    "(then use http://), or is its certificate not trusted (then --ca-cert)?",
                    code="tls_error",
                )
                # nothing authenticated it: the device's loops wait it out once the URL has worked (a
                # path attacker must not stop a running device); the first contact fails fast on it
                tls_error.unauthenticated = True
                raise tls_error from None
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.breaker.record_failure(cause)
            raise _Transient(cause) from exc
        except httpx.HTTPError as exc:  # not transient (e.g. an undecodable body): fail, do not retry
            self.breaker.record_failure()
            raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except ResponseTooLargeError:
            self.breaker.record_failure()
            raise  # never downloaded again by this call; the device loop waits before it asks again
        if resp.status_code < 400:
            self.breaker.record_success()
            return resp
        error = _error_from_response(resp)
        if resp.status_code in _GATEWAY_STATUSES or error.retry is Retry.TRANSIENT:
            if isinstance(error, RateLimitedError):
                self.breaker.record_success()  # the server is up, only busy
            else:
                self.breaker.record_failure(f"HTTP {resp.status_code} {error.code}")
            retry_after = parse_retry_after(resp.headers.get("retry-after"), max_s=self.retry.max_retry_after_s)
            raise _Transient(f"HTTP {resp.status_code} {error.code}", retry_after=retry_after, response=resp)
        self.breaker.record_success()
        raise error

    def _read(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        """Stream one answer within its size limit and the attempt's total deadline; the whole answer."""
        deadline = self._clock() + self.deadline_s
        with self._client.stream(method, path, **kwargs) as resp:
            limit = self.response_limit(path) if resp.status_code < 400 else _ERROR_BODY_LIMIT
            declared = resp.headers.get("content-length")
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                raise ResponseTooLargeError(
                    f"{method} {path}: the answer declares {int(declared)} bytes, more than the {limit} it may have"
                )
            chunks, total = [], 0
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > limit:
                    raise ResponseTooLargeError(f"{method} {path}: the answer exceeds the {limit} bytes it may have")
                if self._clock() > deadline:
                    raise httpx.ReadTimeout(f"the answer took longer than the {self.deadline_s:g} s deadline")
                chunks.append(chunk)
            if self._clock() > deadline:
                raise httpx.ReadTimeout(f"the answer took longer than the {self.deadline_s:g} s deadline")
            headers = [(k, v) for k, v in resp.headers.multi_items() if k not in ("content-encoding", "content-length")]
            return httpx.Response(resp.status_code, headers=headers, content=b"".join(chunks), request=resp.request)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpTransport({self.base_url!r}, breaker={self.breaker.state})"
