"""Authorization matrix over HTTP: each refusal has its status and code, is recorded, and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_fixtures import admin, counts, make_runtime, new_device

from qflare.errors import QflareError, error_from_code
from qflare.protocol import Device, Frame
from qflare.server import ServerRuntime, create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class World:
    runtime: ServerRuntime
    client: TestClient
    devices: list[Device]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """Two enrolled devices with sessions, round 1 open (selecting both), no background loop."""
    runtime = make_runtime(tmp_path, per_round=2, min_devices=2)
    with TestClient(create_app(runtime)) as client:
        devices = [new_device(client) for _ in range(2)]
        for dev, token in zip(devices, runtime.coordinator.create_tokens(2)):
            dev.enroll(token)
            dev.connect()
        runtime.step()
        assert runtime.coordinator.rounds.current is not None
        yield World(runtime, client, devices)


_UNSET = object()


def _refused(
    w: World, call: object, status: int, code: str, *, device_id: object = _UNSET, events: list[str] | None = None
) -> None:
    """``call()`` must raise the typed error with ``code`` and ``status``, change nothing, and record exactly
    one security event with reason ``code`` (for ``device_id`` when given; ``None``: no device known).

    ``events`` (oldest first) replaces the single expected event when the call sends several messages."""
    before = counts(w.runtime)
    seen = {e.id for e in w.runtime.store.security_events(10_000)}
    with pytest.raises(QflareError) as info:
        call()  # type: ignore[operator]
    assert (info.value.code, info.value.http_status) == (code, status)
    new = [e for e in reversed(w.runtime.store.security_events(10_000)) if e.id not in seen]
    expected = [code] if events is None else events
    assert [e.reason for e in new] == expected, f"expected security events {expected}, got {[e.reason for e in new]}"
    if device_id is not _UNSET:
        assert new[-1].device_id == device_id
    assert counts(w.runtime) == before


def test_unenrolled_device_cannot_handshake(world: World) -> None:
    stranger = new_device(world.client)
    _refused(world, stranger.connect, 401, "unknown_device")
    _refused(world, stranger.task, 401, "unknown_device")  # no session: it tries the handshake again


def test_revoked_device_is_refused_on_its_next_message(world: World) -> None:
    w = world
    victim = w.devices[0]
    assert victim.task().selected
    resp = w.client.post(
        f"/v1/admin/devices/{victim.device_id}/revoke", json={"reason": "key leaked"}, headers=admin(w.runtime)
    )
    assert resp.status_code == 200
    # The revocation closed its session: the task request is refused (unknown_session), the device runs
    # the handshake again, and that is refused (revoked): two messages, two events.
    _refused(w, victim.task, 403, "revoked", events=["unknown_session", "revoked"])
    _refused(w, victim.connect, 403, "revoked")
    assert w.devices[1].task().selected  # the other device is unaffected


def test_session_of_another_device_fails_authentication(world: World) -> None:
    w = world
    a, b = w.devices
    assert b._channel is not None and a._session_id is not None
    frame = b._channel.seal(Frame.TASK_REQUEST, 0, b"")  # b's key, sent under a's session id

    def post() -> None:
        headers = {"X-Qflare-Session": a._session_id, "Content-Type": "application/octet-stream"}
        resp = w.client.post("/v1/task", content=frame, headers=headers)
        raise _typed(resp.json(), resp.status_code)

    # the session id is a cleartext header: a frame that fails authentication under it is not blamed on
    # the session's owner (the event keeps the session id and says the sender is unauthenticated)
    _refused(w, post, 401, "bad_mac", device_id=None)
    assert a.task().selected  # a's own channel still works: a refused frame does not advance its counter


def _typed(err: dict[str, str], status: int) -> QflareError:
    return error_from_code(err["code"], err["message"], status)


def test_missing_or_made_up_session(world: World) -> None:
    w = world

    def post(session: str | None) -> None:
        headers = {"Content-Type": "application/octet-stream"}
        if session is not None:
            headers["X-Qflare-Session"] = session
        resp = w.client.post("/v1/update", content=b"\x00" * 64, headers=headers)
        raise _typed(resp.json(), resp.status_code)

    _refused(w, lambda: post(None), 401, "unknown_session")
    _refused(w, lambda: post("ab" * 32), 401, "unknown_session")


def test_admin_routes_need_the_admin_token(world: World) -> None:
    w = world
    routes = [
        ("POST", "/v1/admin/tokens", {"count": 1}),
        ("GET", "/v1/admin/devices", None),
        ("GET", "/v1/admin/events", None),
        ("POST", f"/v1/admin/devices/{w.devices[0].device_id}/revoke", {"reason": "x"}),
    ]
    for method, path, body in routes:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer wrong-token"}, 403),
            ({"Authorization": f"Basic {w.runtime.admin.value}"}, 401),
            ({"Authorization": f"Bearer {w.runtime.admin.value}x"}, 403),
        ):

            def call() -> None:
                resp = w.client.request(method, path, json=body, headers=headers)
                raise _typed(resp.json(), resp.status_code)

            _refused(w, call, status, "admin_required")
    assert all(d.status == "active" for d in w.runtime.store.list_devices())


def test_token_reuse_expiry_and_unknown_token(world: World) -> None:
    w = world
    token = w.runtime.coordinator.create_tokens(1)[0]
    first = new_device(w.client)
    first.enroll(token)
    _refused(w, lambda: new_device(w.client).enroll(token), 401, "token_used")
    past = datetime.now(UTC) - timedelta(hours=2)
    expired = w.runtime.store.create_tokens(1, timedelta(hours=1), "old", now=past)[0]
    _refused(w, lambda: new_device(w.client).enroll(expired), 401, "token_expired")
    _refused(w, lambda: new_device(w.client).enroll("not-a-token"), 401, "token_unknown")
    # a device cannot enroll twice (with a fresh token): its key is already registered
    again = w.runtime.coordinator.create_tokens(1)[0]
    _refused(w, lambda: first.enroll(again), 409, "device_exists")
