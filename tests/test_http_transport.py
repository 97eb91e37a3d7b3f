"""HttpTransport: retries, typed refusals, Retry-After and the circuit breaker (httpx.MockTransport)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from qflare.errors import (
    ErrorCode,
    PolicyError,
    QflareError,
    RateLimitedError,
    ReplayError,
    StaleModelError,
    TokenError,
    WrongRoundError,
    error_from_code,
)
from qflare.protocol.messages import Route
from qflare.transport import (
    CircuitBreaker,
    CircuitOpenError,
    HttpTransport,
    RetryPolicy,
    ServerUnavailableError,
)
from qflare.transport.http import SESSION_HEADER, parse_retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    handler: Callable[[httpx.Request], httpx.Response],
    *,
    attempts: int = 4,
    breaker: CircuitBreaker | None = None,
) -> tuple[HttpTransport, list[float]]:
    sleeps: list[float] = []
    client = httpx.Client(base_url="http://coordinator.test", transport=httpx.MockTransport(handler))
    transport = HttpTransport(
        "http://coordinator.test",
        client=client,
        retry=RetryPolicy(attempts=attempts, initial_s=0.01, max_wait_s=0.05, jitter_s=0.01),
        breaker=breaker or CircuitBreaker(failure_threshold=100, reset_after_s=1.0),
        sleep=sleeps.append,
    )
    return transport, sleeps


def refusal(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message})


def test_request_wire_format() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, content=b"\x00reply")

    t, _ = make(handler)
    assert t.request(Route.HELLO, b"\x01\x02") == b"\x00reply"
    assert t.request(Route.UPDATE, b"frame", "ab" * 32) == b"\x00reply"
    assert [r.url.path for r in seen] == ["/v1/handshake/hello", "/v1/update"]
    assert all(r.method == "POST" and r.headers["content-type"] == "application/octet-stream" for r in seen)
    assert SESSION_HEADER not in seen[0].headers
    assert seen[1].headers[SESSION_HEADER] == "ab" * 32
    assert seen[1].content == b"frame"


def test_retries_503_and_connection_error_then_succeeds() -> None:
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("connection refused", request=req)
        if calls["n"] == 2:
            return refusal(503, "not_ready", "starting")
        if calls["n"] == 3:
            raise httpx.ReadTimeout("timed out", request=req)
        return httpx.Response(200, content=b"ok")

    t, sleeps = make(handler)
    assert t.request(Route.TASK, b"x", "s") == b"ok"
    assert calls["n"] == 4
    assert len(sleeps) == 3 and all(0 < s <= 0.05 for s in sleeps)
    assert t.breaker.consecutive_failures == 0


def test_gives_up_after_attempts_with_typed_error() -> None:
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(502, text="bad gateway")

    t, sleeps = make(handler, attempts=3)
    with pytest.raises(ServerUnavailableError) as info:
        t.request(Route.TASK, b"x", "s")
    assert info.value.code == "server_unavailable" and "3 attempt" in str(info.value)
    assert calls["n"] == 3 and len(sleeps) == 2


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [(401, "bad_token", TokenError), (409, "replay", ReplayError), (409, "stale_model", StaleModelError)],
)
def test_refusal_is_not_retried_and_is_typed(status: int, code: str, cls: type) -> None:
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return refusal(status, code, "refused by test")

    t, sleeps = make(handler)
    with pytest.raises(cls) as info:
        t.request(Route.ENROLL, b"x")
    assert info.value.code == code and str(info.value) == "refused by test"
    assert calls["n"] == 1 and sleeps == []
    # Same class as the in-process coordinator would have raised for that code.
    assert type(info.value) is type(error_from_code(code, "", status))


def test_unknown_code_is_typed_by_status_and_kept_in_the_message() -> None:
    t, _ = make(lambda req: refusal(403, "ip_blocked", "go away"))
    with pytest.raises(PolicyError) as info:
        t.request(Route.HELLO, b"x")
    assert info.value.code is ErrorCode.UNKNOWN_REMOTE_CODE
    assert info.value.http_status == 403
    assert "go away" in info.value.message and "'ip_blocked'" in info.value.message
    (QflareError,)


def test_429_honours_retry_after() -> None:
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return httpx.Response(
                429,
                headers={"Retry-After": "0.3" if calls["n"] == 1 else "2"},
                json={"code": "rate_limited", "message": "slow down"},
            )
        return httpx.Response(200, content=b"ok")

    t, sleeps = make(handler)
    assert t.request(Route.TASK, b"x", "s") == b"ok"
    assert sleeps == [0.3, 2.0]


def test_429_exhausted_raises_typed_rate_limit() -> None:
    t, sleeps = make(
        lambda req: httpx.Response(
            429, headers={"Retry-After": "1.5"}, json={"code": "rate_limited", "message": "slow"}
        ),
        attempts=2,
    )
    with pytest.raises(RateLimitedError) as info:
        t.request(Route.TASK, b"x", "s")
    assert info.value.code == "rate_limited" and info.value.retry_after_s == 1.5
    assert sleeps == [1.5]


def test_retry_after_is_capped() -> None:
    calls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(429, headers={"Retry-After": "3600"}) if calls["n"] == 1 else httpx.Response(200)

    sleeps: list[float] = []
    client = httpx.Client(base_url="http://c.test", transport=httpx.MockTransport(handler))
    t = HttpTransport("http://c.test", client=client, retry=RetryPolicy(max_retry_after_s=4.0), sleep=sleeps.append)
    t.request(Route.TASK, b"", "s")
    assert sleeps == [4.0]


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=lambda: 1445412480.0) == pytest.approx(10.0)


def test_circuit_breaker_opens_then_half_opens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=10.0, clock=clock)
    up = {"ok": False, "calls": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        up["calls"] += 1
        if not up["ok"]:
            raise httpx.ConnectError("refused", request=req)
        return httpx.Response(200, content=b"ok")

    t, sleeps = make(handler, attempts=5, breaker=breaker)
    with pytest.raises(CircuitOpenError) as info:
        t.request(Route.TASK, b"x", "s")
    assert up["calls"] == 3 and breaker.state == "open"  # the 4th attempt was stopped by the breaker
    assert info.value.code == "circuit_open" and info.value.retry_in_s == pytest.approx(10.0)
    # While open every call fails fast, without touching the network.
    clock.now += 4
    with pytest.raises(CircuitOpenError) as info:
        t.request(Route.TASK, b"x", "s")
    assert up["calls"] == 3 and info.value.retry_in_s == pytest.approx(6.0)
    # After the cool-down one probe goes out; a failed probe re-opens the circuit at once.
    clock.now += 6
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpenError):
        t.request(Route.TASK, b"x", "s")
    assert up["calls"] == 4 and breaker.state == "open"
    # Next cool-down: the probe succeeds and the circuit closes.
    clock.now += 10
    up["ok"] = True
    assert t.request(Route.TASK, b"x", "s") == b"ok"
    assert breaker.state == "closed" and breaker.consecutive_failures == 0


def test_refusal_resets_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=5.0, clock=clock)
    answers = iter(
        [httpx.ConnectError("x"), refusal(409, "wrong_round", "no"), httpx.ConnectError("x"), httpx.Response(200)]
    )

    def handler(req: httpx.Request) -> httpx.Response:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    t, _ = make(handler, attempts=2, breaker=breaker)
    with pytest.raises(WrongRoundError) as info:
        t.request(Route.UPDATE, b"x", "s")
    assert info.value.code == "wrong_round"
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    t.request(Route.UPDATE, b"x", "s")
    assert breaker.state == "closed"


def test_get_and_post_json() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            return httpx.Response(200, json={"alg": "ML-DSA-65", "key_id": "ab"})
        assert req.headers["authorization"] == "Bearer tok"
        return httpx.Response(200, json={"tokens": ["t1", "t2"], "echo": req.read().decode()})

    t, _ = make(handler)
    assert t.get_json("/v1/identity")["alg"] == "ML-DSA-65"
    out = t.post_json("/v1/admin/tokens", {"count": 2}, headers={"Authorization": "Bearer tok"})
    assert out["tokens"] == ["t1", "t2"] and '"count"' in out["echo"]
