"""The HTTP front door under attack: slow bodies, unauthenticated uploads, refusal floods, garbage under
a device's session id, scrapes and probes, and the Content-Type of every route."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from server_fixtures import admin, counts, make_runtime, new_device

from qflare.errors import QflareError
from qflare.protocol import Device, Frame
from qflare.server import HttpLimits, ServerRuntime, create_app
from qflare.server.limits import EventThrottle, RateLimiter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
OCTETS = "application/octet-stream"
LOOSE = dict(
    ip_rate=1e4,
    ip_burst=1e4,
    session_rate=1e4,
    session_burst=1e4,
    ops_rate=1e4,
    ops_burst=1e4,
    keys_rate=1e4,
    keys_burst=1e4,
)


@dataclass
class World:
    runtime: ServerRuntime
    app: FastAPI
    client: TestClient
    device: Device
    idle: Device
    """Enrolled, with a session, not selected for the open round."""


def _world(tmp_path: Path, limits: HttpLimits) -> Iterator[World]:
    runtime = make_runtime(tmp_path, per_round=1, min_devices=2, http=limits)
    app = create_app(runtime)
    with TestClient(app) as client:
        devices = [new_device(client) for _ in range(2)]
        for dev, token in zip(devices, runtime.coordinator.create_tokens(2), strict=True):
            dev.enroll(token)
            dev.connect()
        runtime.step()
        rnd = runtime.coordinator.rounds.current
        assert rnd is not None
        chosen = next(d for d in devices if d.device_id in rnd.selected)
        other = next(d for d in devices if d is not chosen)
        yield World(runtime, app, client, chosen, other)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from _world(
        tmp_path, HttpLimits(max_concurrent_uploads=1, body_grace_s=0.3, min_body_rate=4096, event_burst=1000, **LOOSE)
    )


def _async(app: FastAPI, address: str = "203.0.113.50") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 1)), base_url="http://t")


class CountingBody:
    def __init__(self, total: int, delay: float = 0.0, chunk: int = 64 * 1024) -> None:
        self.total, self.delay, self.chunk, self.pulled = total, delay, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        while sent < self.total:
            self.pulled += 1
            n = min(self.chunk, self.total - sent)
            sent += n
            yield b"\x00" * n
            if self.delay:
                await asyncio.sleep(self.delay)


def _new_events(runtime: ServerRuntime, after: int) -> list[tuple[str, str | None, str | None]]:
    rows = [e for e in reversed(runtime.store.security_events(10_000)) if e.id > after]
    return [(e.reason, e.session_id, e.device_id) for e in rows]


def _last_event_id(runtime: ServerRuntime) -> int:
    rows = runtime.store.security_events(1)
    return rows[0].id if rows else 0


# ---------------------------------------------------------------- item 3: slowloris and unauthenticated uploads


def test_slow_body_is_cut_off_and_its_slot_freed(world: World) -> None:
    """A selected device's session trickling a declared 1 MB body holds the only upload slot for the grace
    period plus what it sent at the minimum rate, then gets 408 slow_body; the waiting upload proceeds."""
    w = world
    sid = w.device._session_id
    assert sid is not None
    headers = {"X-Qflare-Session": sid, "Content-Type": OCTETS}
    slow = CountingBody(1_000_000, delay=0.05, chunk=1)  # 20 bytes/s
    metrics = w.runtime.metrics

    async def main() -> tuple[httpx.Response, httpx.Response, float, float]:
        async with _async(w.app) as attacker, _async(w.app, "198.51.100.20") as honest:
            started = time.monotonic()
            trickle = asyncio.ensure_future(
                attacker.post("/v1/update", content=slow, headers={**headers, "Content-Length": "1000000"})
            )
            while metrics.uploads_in_flight._value.get() < 1:  # the trickler holds the slot
                await asyncio.sleep(0.01)
            with anyio.fail_after(10):  # today: the slot is held until the whole megabyte has trickled in
                waiting = await honest.post("/v1/update", content=b"\x00" * 64, headers=headers)
                cut = await trickle
            return cut, waiting, time.monotonic() - started, metrics.uploads_in_flight._value.get()

    before = counts(w.runtime)
    last = _last_event_id(w.runtime)
    cut, waiting, elapsed, in_flight = anyio.run(main)
    assert cut.status_code == 408 and cut.json()["code"] == "slow_body"
    assert elapsed < 5.0 and slow.pulled < 100  # 0.3 s grace + a few bytes at 4 KiB/s: well under a second
    assert waiting.status_code == 400 and waiting.json()["code"] == "malformed"  # it got the slot and was read
    assert in_flight == 0
    events = _new_events(w.runtime, last)
    assert ("slow_body", sid, None) in events
    assert counts(w.runtime) == before
    assert w.device.task().selected  # the device's own session is unharmed


def test_uploads_are_refused_from_their_headers_before_a_slot_or_a_byte(world: World) -> None:
    """Made-up, missing and unselected sessions, and an upload without a length: refused unread, no slot."""
    w = world
    idle = w.idle._session_id
    assert idle is not None
    seen_in_handle: list[str | None] = []
    real_handle = w.runtime.coordinator.handle

    def spy(route: object, body: bytes, **kw: object) -> bytes:
        seen_in_handle.append(str(route))
        return real_handle(route, body, **kw)  # type: ignore[arg-type]

    w.runtime.coordinator.handle = spy  # type: ignore[method-assign]
    total = 63 * 1024 * 1024
    cases = [
        ({"X-Qflare-Session": "ab" * 32, "Content-Length": str(total)}, 401, "unknown_session"),
        ({"Content-Length": str(total)}, 401, "unknown_session"),
        ({"X-Qflare-Session": idle, "Content-Length": str(total)}, 409, "not_selected"),
        ({"X-Qflare-Session": "ab" * 32}, 411, "length_required"),
    ]
    bodies = [CountingBody(total) for _ in cases]
    most_in_flight = 0

    async def main() -> list[httpx.Response]:
        nonlocal most_in_flight
        with anyio.fail_after(30):
            return await uploads()

    async def uploads() -> list[httpx.Response]:
        nonlocal most_in_flight
        async with _async(w.app) as client:
            tasks = [
                asyncio.ensure_future(
                    client.post("/v1/update", content=body, headers={"Content-Type": OCTETS, **headers})
                )
                for body, (headers, _, _) in zip(bodies * 2, cases * 2, strict=True)  # eight 63 MiB uploads at once
            ]
            while not all(t.done() for t in tasks):
                most_in_flight = max(most_in_flight, int(w.runtime.metrics.uploads_in_flight._value.get()))
                await asyncio.sleep(0)
            return [t.result() for t in tasks]

    before = counts(w.runtime)
    last = _last_event_id(w.runtime)
    results = anyio.run(main)
    assert [(r.status_code, r.json()["code"]) for r in results] == [(s, c) for _, s, c in cases] * 2
    assert all(b.pulled == 0 for b in bodies), [b.pulled for b in bodies]  # not a byte of 8 x 63 MiB was read
    assert most_in_flight == 0 and seen_in_handle == []
    events = _new_events(w.runtime, last)
    assert sorted(e[0] for e in events) == sorted(c for _, _, c in cases * 2)
    assert ("not_selected", idle, None) in events  # the session id is cleartext: the device is not named
    assert counts(w.runtime) == before


def test_no_round_open_refuses_uploads_unread(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, min_devices=1, http=HttpLimits(**LOOSE))
    app = create_app(runtime)
    with TestClient(app) as client:
        dev = new_device(client)
        dev.enroll(runtime.coordinator.create_tokens(1)[0])
        dev.connect()
        sid = dev._session_id or ""
        assert runtime.coordinator.rounds.current is None
        body = CountingBody(1024 * 1024)

        async def main() -> httpx.Response:
            async with _async(app) as c:
                headers = {"X-Qflare-Session": sid, "Content-Type": OCTETS, "Content-Length": str(body.total)}
                return await c.post("/v1/update", content=body, headers=headers)

        resp = anyio.run(main)
    assert resp.status_code == 409 and resp.json()["code"] == "wrong_round" and body.pulled == 0


def test_small_route_bodies_keep_the_minimum_rate_too(world: World) -> None:
    """The enrollment route is unauthenticated: a trickled body there is cut off as well."""
    slow = CountingBody(60_000, delay=0.05, chunk=1)

    async def main() -> httpx.Response:
        async with _async(world.app) as client:
            with anyio.fail_after(10):
                return await client.post("/v1/enroll", content=slow, headers={"Content-Type": OCTETS})

    resp = anyio.run(main)
    assert resp.status_code == 408 and resp.json()["code"] == "slow_body" and slow.pulled < 100


# ---------------------------------------------------------------- item 9: floods of one refusal


def test_a_refusal_flood_writes_a_bounded_number_of_events(tmp_path: Path) -> None:
    """A stranger hammering the handshake: the first refusals are recorded at once, the rest counted and
    reported with the next event after the window; another address has rows of its own."""
    runtime = make_runtime(tmp_path, http=HttpLimits(**LOOSE))
    app = create_app(runtime)
    now = [1000.0]
    app.state.gate.events = EventThrottle(3, 10.0, clock=lambda: now[0])
    with TestClient(app) as client:
        stranger = new_device(client)  # never enrolled: every handshake is unknown_device
        last = _last_event_id(runtime)

        def flood(n: int) -> None:
            for _ in range(n):
                with pytest.raises(QflareError) as info:
                    stranger.connect()
                assert info.value.code == "unknown_device"

        flood(1)
        assert [e[0] for e in _new_events(runtime, last)] == ["unknown_device"]  # the first: at once
        flood(19)
        rows = [e for e in runtime.store.security_events(100) if e.id > last]
        assert [e.reason for e in rows] == ["unknown_device"] * 3
        now[0] += 10.0
        flood(1)
        rows = [e for e in runtime.store.security_events(100) if e.id > last]
        assert len(rows) == 4 and "+17 more" in rows[0].detail
        other = TestClient(app, client=("198.51.100.77", 1))
        stranger.transport.client = other  # type: ignore[attr-defined]
        flood(1)
        rows = [e for e in runtime.store.security_events(100) if e.id > last]
        assert len(rows) == 5 and rows[0].remote_addr == "198.51.100.77"


def test_event_throttle_windows() -> None:
    now = [0.0]
    t = EventThrottle(2, 10.0, max_keys=3, clock=lambda: now[0])
    assert [t.admit("x", "a", None) for _ in range(5)] == [0, 0, None, None, None]
    assert t.admit("x", "a", "dev") == 0 and t.admit("y", "a", None) == 0  # other keys: their own windows
    now[0] = 9.9
    assert t.admit("x", "a", None) is None  # still the first window: 4 counted
    now[0] = 10.0
    assert t.admit("x", "a", None) == 4  # a new window: recorded, with the count of the ones before
    assert t.admit("x", "a", None) == 0 and t.admit("x", "a", None) is None
    t.admit("z", "b", None)  # a fourth key: the least recently used one is forgotten (bounded memory)
    assert len(t._windows) == 3


# ---------------------------------------------------------------- item 9: garbage under a device's session


def test_garbage_under_a_session_is_charged_to_the_sender_not_the_device(tmp_path: Path) -> None:
    limits = HttpLimits(session_rate=0.001, session_burst=2, **{k: v for k, v in LOOSE.items() if "session" not in k})
    runtime_iter = _world(tmp_path, limits)
    w = next(runtime_iter)
    sid = w.device._session_id
    assert sid is not None
    last = _last_event_id(w.runtime)
    headers = {"X-Qflare-Session": sid, "Content-Type": OCTETS}
    assert w.idle._channel is not None
    garbage = [  # frames sealed under another session's keys, sent under the device's session id
        w.client.post("/v1/task", content=w.idle._channel.seal(Frame.TASK_REQUEST, 0, b""), headers=headers)
        for _ in range(6)
    ]
    assert [r.status_code for r in garbage] == [401] * 6  # refused as forgeries, never rate-limited
    assert {r.json()["code"] for r in garbage} == {"bad_mac"}
    events = [e for e in reversed(w.runtime.store.security_events(100)) if e.id > last]
    assert [(e.reason, e.session_id, e.device_id) for e in events] == [("bad_mac", sid, None)] * 6
    assert all("unauthenticated sender" in e.detail for e in events)
    # the device's own bucket is whole: its two authenticated requests pass, the third is over its limit
    assert w.device.task().selected and w.device.task().selected
    with pytest.raises(QflareError) as info:
        w.device.task()
    assert info.value.code == "rate_limited"
    runtime_iter.close()


# ---------------------------------------------------------------- item 9: /metrics and /readyz


def test_scrapes_and_probes_are_rate_limited_per_address_but_never_refused_at_their_pace(tmp_path: Path) -> None:
    defaults = HttpLimits()
    runtime = make_runtime(tmp_path, http=HttpLimits(ops_rate=defaults.ops_rate, ops_burst=defaults.ops_burst))
    app = create_app(runtime)
    now = [0.0]
    app.state.gate.by_address_ops = RateLimiter(defaults.ops_rate, defaults.ops_burst, clock=lambda: now[0])
    with TestClient(app) as client:
        # an hour of 1 s readiness probes plus a 5 s Prometheus scrape from one address: never refused
        # (every minute over HTTP, the rest straight on the same bucket to keep the test quick)
        limiter = app.state.gate.by_address_ops
        for second in range(3600):
            now[0] = float(second)
            if second % 60 == 0:
                assert client.get("/readyz").status_code == 200 and client.get("/metrics").status_code == 200
                continue
            assert limiter.check("testclient").allowed
            if second % 5 == 0:
                assert limiter.check("testclient").allowed
        now[0] = 10_000.0
        flood = [client.get("/metrics") for _ in range(int(defaults.ops_burst) + 10)]
        assert [r.status_code for r in flood].count(429) == 10
        assert flood[-1].json()["code"] == "rate_limited"
        assert client.get("/readyz").status_code == 429
        assert client.get("/healthz").status_code == 200  # liveness is never limited
        other = TestClient(app, client=("198.51.100.9", 1))
        assert other.get("/metrics").status_code == 200  # per address
    assert [e.reason for e in runtime.store.security_events(10)][:1] == ["rate_limited"]


def test_public_key_routes_have_a_tight_bucket_per_address_refused_before_any_crypto(tmp_path: Path) -> None:
    """Each enrollment or hello costs the coordinator a verification (and then a signature and an
    encapsulation); an address gets ``keys_burst`` of them, then 429 without the coordinator being asked."""
    runtime = make_runtime(tmp_path, http=HttpLimits(**{**LOOSE, "keys_rate": 0.001, "keys_burst": 3.0}))
    app = create_app(runtime)
    calls: list[str] = []
    handle = runtime.coordinator.handle

    def counting(route, body, **kw):  # type: ignore[no-untyped-def]
        calls.append(str(route))
        return handle(route, body, **kw)

    runtime.coordinator.handle = counting  # type: ignore[method-assign]
    with TestClient(app) as client:
        hello = [client.post("/v1/handshake/hello", content=b"x", headers={"Content-Type": OCTETS}) for _ in range(3)]
        assert [r.status_code for r in hello] == [400, 400, 400] and len(calls) == 3  # parsed: malformed
        more = client.post("/v1/enroll", content=b"x", headers={"Content-Type": OCTETS})
        assert more.status_code == 429 and more.json()["code"] == "rate_limited" and len(calls) == 3
        assert more.headers.get("Retry-After")
        other = TestClient(app, client=("198.51.100.9", 1))
        assert other.post("/v1/handshake/hello", content=b"x", headers={"Content-Type": OCTETS}).status_code == 400


# ---------------------------------------------------------------- item 9: Content-Type


def test_protocol_routes_need_octet_stream(world: World) -> None:
    w = world
    session = {"X-Qflare-Session": w.device._session_id or ""}
    for path in ("/v1/enroll", "/v1/handshake/hello", "/v1/handshake/finish", "/v1/task", "/v1/model"):
        for content_type in (None, "text/plain", "application/json", "application/x-www-form-urlencoded"):
            headers = dict(session)
            if content_type is not None:
                headers["Content-Type"] = content_type
            before, last = counts(w.runtime), _last_event_id(w.runtime)
            resp = w.client.post(path, content=b"\x00" * 100, headers=headers)
            assert resp.status_code == 415 and resp.json()["code"] == "unsupported_media_type", (path, resp.text)
            assert [e[0] for e in _new_events(w.runtime, last)] == ["unsupported_media_type"]
            assert counts(w.runtime) == before
        ok = w.client.post(
            path, content=b"\x00" * 100, headers={**session, "Content-Type": "Application/Octet-Stream; x=1"}
        )
        assert ok.status_code != 415, path  # parameters and case do not matter
    assert w.device.task().selected


def test_update_route_needs_octet_stream_before_anything_else(world: World) -> None:
    body = CountingBody(1024 * 1024)

    async def main() -> httpx.Response:
        async with _async(world.app) as client:
            headers = {"X-Qflare-Session": world.device._session_id or "", "Content-Type": "text/plain"}
            return await client.post("/v1/update", content=body, headers={**headers, "Content-Length": "1048576"})

    resp = anyio.run(main)
    assert resp.status_code == 415 and resp.json()["code"] == "unsupported_media_type" and body.pulled == 0


def test_admin_posts_need_json(world: World) -> None:
    w = world
    last = _last_event_id(w.runtime)
    wrong = w.client.post(
        "/v1/admin/tokens", content=b'{"count": 1}', headers={**admin(w.runtime), "Content-Type": "text/plain"}
    )
    assert wrong.status_code == 415 and wrong.json()["code"] == "unsupported_media_type"
    form = w.client.post(f"/v1/admin/devices/{w.idle.device_id}/revoke", data={"reason": "x"}, headers=admin(w.runtime))
    assert form.status_code == 415
    assert _new_events(w.runtime, last) == []  # the administrator's own mistake, not an attack
    assert all(d.status == "active" for d in w.runtime.store.list_devices())
    ok = w.client.post(
        "/v1/admin/tokens",
        content=b'{"count": 1}',
        headers={**admin(w.runtime), "Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200 and len(ok.json()["tokens"]) == 1
