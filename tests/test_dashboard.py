"""The operator dashboard over HTTP (TestClient): who gets in, what a refusal records and leaves unchanged,
the CSRF and security-header contract, and that the pages show the database (browser flow:
tests/test_dashboard_browser.py)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_fixtures import admin, make_runtime, new_device

from qflare.errors import QflareError, TokenError
from qflare.server import ServerRuntime, create_app
from qflare.server.dashboard import write_password_file
from qflare.server.dashboard.auth import SESSION_COOKIE, csrf_token
from qflare.storage import tables as t

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE = "https://testserver"  # the session cookie is Secure: a browser sends it over HTTPS (or to loopback) only
PAGES = [
    "/dashboard",
    "/dashboard/devices",
    "/dashboard/rounds",
    "/dashboard/events",
    "/dashboard/tokens",
    "/dashboard/ledger",
]
DATA = ["overview", "devices", "rounds", "events", "tokens", "ledger"]


@dataclass
class World:
    runtime: ServerRuntime
    client: TestClient


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    runtime = make_runtime(tmp_path, per_round=2, min_devices=2)
    with TestClient(create_app(runtime), base_url=BASE) as client:
        yield World(runtime, client)


def _nonce(client: TestClient) -> str:
    page = client.get("/dashboard/login")
    assert page.status_code == 200
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def login(client: TestClient, secret: str) -> str:
    """Log in; the page's CSRF token."""
    resp = client.post(
        "/dashboard/login", data={"csrf_token": _nonce(client), "secret": secret}, follow_redirects=False
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/dashboard", resp.text
    page = client.get("/dashboard")
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert page.status_code == 200 and found
    return found.group(1)


def events(w: World, reason: str) -> list[str]:
    return [e.detail for e in w.runtime.store.security_events(1000, reason=reason)]


def test_no_session_redirects_pages_and_refuses_data(world: World) -> None:
    c = world.client
    for path in PAGES:
        resp = c.get(path, follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"] == "/dashboard/login", path
    for name in DATA:
        resp = c.get(f"/dashboard/api/{name}")
        assert resp.status_code == 401 and resp.json()["code"] == "admin_required", name
    assert len(events(world, "admin_required")) == len(DATA)


def test_device_and_admin_credentials_open_no_dashboard(world: World) -> None:
    w, c = world, world.client
    device = new_device(c)
    device.enroll(w.runtime.coordinator.create_tokens(1)[0])
    session = device.connect()
    attempts = [
        {"headers": {"X-Qflare-Session": session}},
        {"cookies": {SESSION_COOKIE: session}},  # a device session id presented as the dashboard cookie
        {"headers": admin(w.runtime)},  # the admin token is exchanged at the login form, never accepted as is
        {"cookies": {SESSION_COOKIE: w.runtime.admin.value}},
    ]
    for extra in attempts:
        c.cookies.clear()
        assert c.get("/dashboard/api/devices", **extra).status_code == 401
        assert c.get("/dashboard", follow_redirects=False, **extra).status_code == 303


def test_login_sets_a_hardened_cookie_and_stores_only_its_hash(world: World) -> None:
    w, c = world, world.client
    resp = c.post(
        "/dashboard/login", data={"csrf_token": _nonce(c), "secret": w.runtime.admin.value}, follow_redirects=False
    )
    cookie = next(v for v in resp.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE + "="))
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attrs
    session = cookie.split(";")[0].split("=", 1)[1]
    with w.runtime.db.transaction(write=False) as s:
        stored = [row.id_hash for row in s.query(t.OperatorSession)]
    assert stored == [hashlib.sha256(session.encode()).hexdigest()]  # not the cookie value itself
    assert c.get("/dashboard/api/devices").status_code == 200


def test_security_headers_on_pages_login_and_static(world: World) -> None:
    c = world.client
    responses = [c.get("/dashboard/login"), c.get("/dashboard/static/dashboard.js")]
    login(c, world.runtime.admin.value)
    responses += [c.get(p) for p in PAGES] + [c.get(f"/dashboard/api/{n}") for n in DATA]
    for resp in responses:
        assert resp.status_code == 200, resp.url
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert resp.headers["x-frame-options"] == "DENY" and resp.headers["x-content-type-options"] == "nosniff"
    page = responses[2].text
    assert "<script>" not in page and " on" + "click=" not in page  # no inline script: the CSP would block it
    assert 'src="/dashboard/static/vendor/uplot/uPlot.iife.min.js"' in page  # served here, no CDN


def test_static_files_are_a_fixed_list(world: World) -> None:
    c = world.client
    assert c.get("/dashboard/static/vendor/uplot/LICENSE").text.startswith("The MIT License")
    for bad in ["/dashboard/static/../app.py", "/dashboard/static/%2e%2e/auth.py", "/dashboard/static/routes.py"]:
        assert c.get(bad).status_code == 404, bad


def test_csrf_missing_wrong_or_cross_origin_is_refused_and_changes_nothing(world: World) -> None:
    w, c = world, world.client
    device = new_device(c)
    device.enroll(w.runtime.coordinator.create_tokens(1)[0])
    token = login(c, w.runtime.admin.value)
    tokens_before = len(w.runtime.store.list_tokens())
    actions = [
        ("/dashboard/api/tokens", {"count": 2}),
        (f"/dashboard/api/devices/{device.device_id}/revoke", {"reason": "csrf"}),
        (f"/dashboard/api/devices/{device.device_id}/quarantine", {"reason": "csrf"}),
    ]
    bad_headers = [
        {},
        {"X-CSRF-Token": "0" * 64},
        {"X-CSRF-Token": csrf_token("another session")},
        {"X-CSRF-Token": token, "Origin": "https://evil.example"},
        {"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"},
    ]
    for path, body in actions:
        for headers in bad_headers:
            resp = c.post(path, json=body, headers=headers)
            assert resp.status_code == 403 and resp.json()["code"] == "csrf_failed", (path, headers)
    assert len(events(w, "csrf_failed")) == len(actions) * len(bad_headers)
    assert len(w.runtime.store.list_tokens()) == tokens_before
    row = w.runtime.store.get_device(device.device_id)
    assert row is not None and row.status == "active"
    # the logout form is CSRF-checked too: a forged one leaves the session open
    assert c.post("/dashboard/logout", data={"csrf_token": "forged"}).status_code == 403
    assert c.get("/dashboard/api/devices").status_code == 200
    # and with the token, the same action goes through
    resp = c.post(actions[1][0], json=actions[1][1], headers={"X-CSRF-Token": token})
    assert resp.status_code == 200 and resp.json()["status"] == "revoked"


def test_login_form_needs_its_nonce(world: World) -> None:
    w, c = world, world.client
    _nonce(c)
    resp = c.post("/dashboard/login", data={"csrf_token": "guessed", "secret": w.runtime.admin.value})
    assert resp.status_code == 403 and SESSION_COOKIE not in resp.headers.get("set-cookie", "")
    assert len(events(w, "csrf_failed")) == 1


def test_failed_logins_are_recorded_and_rate_limited(world: World) -> None:
    w, c = world, world.client
    statuses = []
    for _ in range(8):
        resp = c.post("/dashboard/login", data={"csrf_token": _nonce(c), "secret": "wrong secret"})
        statuses.append(resp.status_code)
        assert SESSION_COOKIE not in resp.headers.get("set-cookie", "")
    assert statuses == [403] * 5 + [429] * 3
    assert len(events(w, "login_failed")) == 5
    limited = events(w, "rate_limited")
    assert len(limited) == 1 and "failed-login limit" in limited[0]
    # while limited, even the right secret is turned away (the limit is per address, not per guess)
    resp = c.post("/dashboard/login", data={"csrf_token": _nonce(c), "secret": w.runtime.admin.value})
    assert resp.status_code == 429 and "retry-after" in resp.headers


def test_logout_ends_the_session(world: World) -> None:
    c = world.client
    token = login(c, world.runtime.admin.value)
    cookie = c.cookies.get(SESSION_COOKIE)
    resp = c.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/dashboard/login"
    c.cookies.set(SESSION_COOKIE, cookie or "", domain="testserver")  # replaying the old cookie
    assert c.get("/dashboard/api/devices").status_code == 401


def test_operator_password_is_an_argon2_hash(tmp_path: Path) -> None:
    path = write_password_file(tmp_path, "correct horse battery staple")
    assert path.read_text().startswith("$argon2id$") and "staple" not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime), base_url=BASE) as c:
        bad = c.post("/dashboard/login", data={"csrf_token": _nonce(c), "secret": "correct horse battery"})
        assert bad.status_code == 403
        login(c, "correct horse battery staple")


def test_token_lifecycle_and_revocation(world: World) -> None:
    w, c = world, world.client
    token = login(c, w.runtime.admin.value)
    minted = c.post("/dashboard/api/tokens", json={"count": 2, "label": "lab"}, headers={"X-CSRF-Token": token})
    assert minted.status_code == 200
    plain = minted.json()["tokens"]
    listed = c.get("/dashboard/api/tokens").json()["tokens"]
    assert {x["state"] for x in listed} == {"valid"} and all(p not in str(listed) for p in plain)  # shown once
    victim = hashlib.sha256(plain[0].encode()).hexdigest()
    resp = c.post(f"/dashboard/api/tokens/{victim}/revoke", headers={"X-CSRF-Token": token})
    assert resp.status_code == 200 and resp.json()["state"] == "revoked"
    device = new_device(c)
    with pytest.raises(QflareError) as refused:  # a device presenting it over the protocol
        device.enroll(plain[0])
    assert refused.value.code == "token_revoked" and w.runtime.store.list_devices() == []
    assert len(events(w, "token_revoked")) == 1
    with pytest.raises(TokenError) as info:  # and the store's own atomic re-check
        w.runtime.store.consume_token(plain[0], "d" * 64)
    assert info.value.code == "token_revoked"
    w.runtime.store.consume_token(plain[1], "e" * 64)  # the other still works
    used = hashlib.sha256(plain[1].encode()).hexdigest()
    resp = c.post(f"/dashboard/api/tokens/{used}/revoke", headers={"X-CSRF-Token": token})
    assert resp.status_code == 422 and resp.json()["code"] == "token_used"
    resp = c.post(f"/dashboard/api/tokens/{'0' * 64}/revoke", headers={"X-CSRF-Token": token})
    assert resp.status_code == 404


def test_data_routes_show_the_database(world: World) -> None:
    w, c = world, world.client
    devices = [new_device(c) for _ in range(2)]
    for dev, tok in zip(devices, w.runtime.coordinator.create_tokens(2)):
        dev.enroll(tok)
        dev.connect()
    w.runtime.step()
    login(c, w.runtime.admin.value)
    overview = c.get("/dashboard/api/overview").json()["status"]
    assert overview["round"] == 1 and overview["state"] == "open" and overview["devices"] == {"active": 2}
    listed = c.get("/dashboard/api/devices").json()["devices"]
    assert {d["device_id"] for d in listed} == {d.device_id for d in devices}
    assert all(d["last_seen"] is not None and d["sig_alg"] for d in listed)
    rounds = c.get("/dashboard/api/rounds").json()["rounds"]
    assert [(r["round"], r["state"], r["selected"]) for r in rounds] == [(1, "open", 2)]
    detail = c.get("/dashboard/api/rounds/1").json()
    assert sorted(detail["selected_devices"]) == sorted(d.device_id for d in devices) and detail["accepted"] == []
    assert c.get("/dashboard/api/rounds/99").status_code == 404
    w.runtime.store.record_security_event("bad_mac", "test event", device_id=devices[0].device_id)
    only = c.get("/dashboard/api/events", params={"reason": "bad_mac"}).json()["events"]
    assert [e["detail"] for e in only] == ["test event"]
    assert c.get("/dashboard/api/events", params={"device_id": "f" * 64}).json()["events"] == []
    assert c.get("/dashboard/api/events", params={"since": "not a time"}).status_code == 422
    assert c.get("/dashboard/api/ledger").json()["lineage"][0]["version"] == 0
    # quarantine and reinstate through the dashboard (its CSRF token), as the admin API would
    token = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/dashboard").text)
    assert token
    target, csrf = devices[1].device_id, {"X-CSRF-Token": token.group(1)}
    resp = c.post(f"/dashboard/api/devices/{target}/quarantine", json={"reason": "odd updates"}, headers=csrf)
    assert resp.status_code == 200 and resp.json()["status"] == "quarantined"
    assert resp.json()["quarantine_reason"] == "operator: odd updates"
    resp = c.post(f"/dashboard/api/devices/{target}/reinstate", headers=csrf)
    assert resp.status_code == 200 and resp.json()["status"] == "active"
    resp = c.post(f"/dashboard/api/devices/{'0' * 64}/revoke", json={"reason": "x"}, headers=csrf)
    assert resp.status_code == 404 and resp.json()["code"] == "unknown_device"


def test_stream_sends_the_live_state(world: World) -> None:
    c = world.client
    login(c, world.runtime.admin.value)
    with c.stream("GET", "/dashboard/api/stream") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
        lines = resp.iter_lines()
        assert next(lines) == "event: update"
        data = next(lines)
    assert data.startswith("data: ") and '"changed": ["overview"' in data and '"state": "waiting"' in data


def test_operator_password_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from qflare.cli import app

    monkeypatch.setenv("QFLARE_TEST_PW", "a long enough operator password")
    ok = CliRunner().invoke(
        app, ["server", "operator-password", "--data-dir", str(tmp_path), "--password-env", "QFLARE_TEST_PW"]
    )
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "operator.password").read_text().startswith("$argon2id$")
    monkeypatch.setenv("QFLARE_TEST_PW", "short")
    bad = CliRunner().invoke(
        app, ["server", "operator-password", "--data-dir", str(tmp_path), "--password-env", "QFLARE_TEST_PW"]
    )
    assert bad.exit_code != 0 and "12..1024" in bad.output


def test_hostile_dashboard_input_is_answered_never_5xx(tmp_path: Path) -> None:
    from urllib.parse import quote

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    runtime = make_runtime(tmp_path)
    types = ["application/json", "application/x-www-form-urlencoded", "text/plain", "", "multipart/form-data"]
    with TestClient(create_app(runtime), base_url=BASE) as c:
        token = login(c, runtime.admin.value)

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            body=st.binary(max_size=300),
            ctype=st.sampled_from(types),
            part=st.text(max_size=40),
            q=st.text(max_size=80),
        )
        def probe(body: bytes, ctype: str, part: str, q: str) -> None:
            headers = {"Content-Type": ctype, "X-CSRF-Token": token}
            segment = quote(part, safe="")
            for resp in (
                c.post("/dashboard/login", content=body, headers={"Content-Type": ctype}),
                c.post("/dashboard/api/tokens", content=body, headers=headers),
                c.post(f"/dashboard/api/devices/{segment}/revoke", content=body, headers=headers),
                c.post(f"/dashboard/api/tokens/{segment}/revoke", content=body, headers=headers),
                c.get("/dashboard/api/events", params={"reason": q, "since": q, "device_id": q}),
                c.get(f"/dashboard/api/rounds/{segment}"),
                c.get(f"/dashboard/static/{quote(part, safe='/')}"),
                c.get("/dashboard/api/devices", cookies={SESSION_COOKIE: quote(q, safe="")}),
            ):
                assert resp.status_code < 500, (str(resp.request.url), resp.status_code, resp.text[:200])

        probe()
