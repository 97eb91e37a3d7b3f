"""Limits of the HTTP layer: body sizes (without reading oversize bodies), rate limits, upload slots."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from server_fixtures import counts, make_runtime

from qflare.cli.server import parse_duration
from qflare.errors import ConfigError
from qflare.protocol import Route
from qflare.server import HttpLimits, ServerRuntime, create_app
from qflare.server.limits import RateLimiter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CHUNK = 64 * 1024
OCTETS = {"Content-Type": "application/octet-stream"}


class CountingBody:
    """An async request body of ``total`` bytes in 64 KiB chunks that counts how many were pulled."""

    def __init__(self, total: int) -> None:
        self.total, self.pulled = total, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        while sent < self.total:
            self.pulled += 1
            n = min(CHUNK, self.total - sent)
            sent += n
            yield b"\x00" * n


def _client(runtime: ServerRuntime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime), client=("203.0.113.7", 4321))
    return httpx.AsyncClient(transport=transport, base_url="http://qflare.test")


def test_oversized_bodies_are_refused_unread(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, max_update_bytes=256 * 1024)
    limit = runtime.config.http.update_body_bytes(256 * 1024)
    before = counts(runtime)

    async def main() -> list[tuple[httpx.Response, CountingBody]]:
        out = []
        async with _client(runtime) as client:
            declared = CountingBody(50 * 1024 * 1024)  # Content-Length says 50 MB: refused before reading
            r = await client.post(
                "/v1/update",
                content=declared,
                headers={"Content-Length": str(declared.total), "X-Qflare-Session": "ab", **OCTETS},
            )
            out.append((r, declared))
            chunked = CountingBody(50 * 1024 * 1024)  # an upload without a length is refused unread (411)
            out.append(
                (
                    await client.post("/v1/update", content=chunked, headers={"X-Qflare-Session": "ab", **OCTETS}),
                    chunked,
                )
            )
            small = CountingBody(1024 * 1024)  # the enrollment route has the small limit (64 KiB), chunked: counted
            out.append((await client.post("/v1/enroll", content=small, headers=OCTETS), small))
        return out

    results = anyio.run(main)
    codes = [(resp.status_code, resp.json()["code"]) for resp, _ in results]
    assert codes == [(413, "oversized"), (411, "length_required"), (413, "oversized")]
    assert results[0][1].pulled == 0 and results[1][1].pulled == 0
    assert results[2][1].pulled <= runtime.config.http.small_body_bytes // CHUNK + 2
    assert limit > runtime.config.http.small_body_bytes
    events = runtime.store.security_events(10)
    assert [e.reason for e in events[:3]] == ["oversized", "length_required", "oversized"]
    assert events[0].remote_addr == "203.0.113.7"
    assert counts(runtime) == before
    runtime.stop()


def test_rate_limit_per_address_and_per_session(tmp_path: Path) -> None:
    limits = HttpLimits(ip_rate=0.01, ip_burst=3, session_rate=0.01, session_burst=2)
    runtime = make_runtime(tmp_path, http=limits)
    app = create_app(runtime)

    def client_at(address: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 1)), base_url="http://t")

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with client_at("203.0.113.7") as client:
            by_ip = [await client.get("/v1/identity") for _ in range(6)]
        async with client_at("198.51.100.9") as other:  # its own address bucket; a made-up session id is not
            by_session = [  # charged (nothing authenticates under it), so it never drains that session's bucket
                await other.post("/v1/task", content=b"", headers={"X-Qflare-Session": "cd" * 32, **OCTETS})
                for _ in range(3)
            ]
        return by_ip, by_session

    by_ip, by_session = anyio.run(main)
    assert [r.status_code for r in by_ip] == [200, 200, 200, 429, 429, 429]
    refused = by_ip[3]
    assert refused.json()["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
    assert [r.json()["code"] for r in by_session] == ["unknown_session"] * 3
    assert len(app.state.gate.by_session) == 0  # no bucket for a session id nothing authenticated under
    events = [e for e in runtime.store.security_events(100) if e.reason == "rate_limited"]
    # one event per client per interval, however many refusals: a flood is not a flood of writes
    assert [e.remote_addr for e in events] == ["203.0.113.7"]
    runtime.stop()


def test_upload_slot_is_taken_before_the_body_is_read(tmp_path: Path) -> None:
    runtime = make_runtime(
        tmp_path,
        http=HttpLimits(max_concurrent_uploads=2, ip_rate=1e4, ip_burst=1e4, session_rate=1e4, session_burst=1e4),
    )
    release = threading.Event()
    inside = 0
    most_inside = 0
    lock = threading.Lock()
    real_handle = runtime.coordinator.handle

    def slow_handle(route: Any, body: bytes, **kw: Any) -> bytes:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        release.wait(10)
        with lock:
            inside -= 1
        return real_handle(route, body, **kw)

    runtime.coordinator.handle = slow_handle  # type: ignore[method-assign]
    # every upload passes the header checks (the slot mechanics are under test, not admission)
    runtime.coordinator.check_upload_admissible = lambda session_id: None  # type: ignore[method-assign]
    bodies = [CountingBody(4 * CHUNK) for _ in range(5)]
    headers = {"X-Qflare-Session": "ab", "Content-Length": str(4 * CHUNK), **OCTETS}

    async def main() -> list[httpx.Response]:
        async with _client(runtime) as client:
            tasks = [asyncio.ensure_future(client.post("/v1/update", content=b, headers=headers)) for b in bodies]
            for _ in range(200):  # wait until two uploads are inside the coordinator
                await asyncio.sleep(0.01)  # real time: the uploads run on real threadpool threads
                if inside == 2:
                    break
            started = sum(1 for b in bodies if b.pulled > 0)
            waiting = [b.pulled for b in bodies]
            release.set()
            results = await asyncio.gather(*tasks)
            assert started == 2, waiting  # the three others have not had a byte read
            return results

    results = anyio.run(main)
    assert most_inside == 2
    assert all(r.status_code == 401 and r.json()["code"] == "unknown_session" for r in results)
    assert all(b.pulled == 4 for b in bodies)
    runtime.stop()


def test_rate_limiter_refills_and_evicts() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2.0, report_interval_s=10.0, max_keys=3, clock=lambda: now[0])
    assert [limiter.check("a").allowed for _ in range(3)] == [True, True, False]
    refused = limiter.check("a")
    assert not refused.allowed and not refused.report and refused.retry_after_s == pytest.approx(0.5)
    now[0] = 0.5  # one token back
    assert limiter.check("a").allowed and not limiter.check("a").allowed
    now[0] = 20.0
    assert limiter.check("a").allowed and limiter.check("a").allowed
    third = limiter.check("a")
    assert not third.allowed and third.report and third.refused_since_report == 3
    for key in ("b", "c", "d"):
        limiter.check(key)
    assert len(limiter) == 3  # "a" (least recently used) was evicted


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800.0), ("1h", 3600.0), ("2d", 172800.0), ("90s", 90.0), ("45", 45.0), ("1.5h", 5400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1w", "-1h", "0m", "1 h 2", "nan"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_route_enum_paths_are_served(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    paths = set(create_app(runtime).openapi()["paths"])
    assert {f"/v1/{r.value}" for r in Route} <= paths
    runtime.stop()
