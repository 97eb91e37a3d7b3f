"""Schemathesis against the served OpenAPI schema: no 5xx on any route, and refusals change nothing.

The federation under test has an enrolled device with a live session and an open round, so the protocol
routes have real state that a generated request could (but must not) disturb.  Every test checks what it
fuzzed itself (requests were sent, refusals happened and were recorded, the federation is intact), so the
file holds run alone, in any order, or test by test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from server_fixtures import admin, counts, make_runtime

from qflare.crypto import SigningKey
from qflare.protocol import Device
from qflare.server import ServerRuntime, create_app
from qflare.transport import InProcessTransport

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@dataclass
class Fuzzed:
    runtime: ServerRuntime
    app: FastAPI
    device: Device
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)  # requests per operation, whole module


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    runtime = make_runtime(tmp_path_factory.mktemp("fuzz"), per_round=1, min_devices=1, evaluate=False)
    device = Device(
        transport=InProcessTransport(runtime.coordinator),
        identity=SigningKey.generate(),
        server_key=runtime.identity.public,
        layout=runtime.layout,
    )
    device.enroll(runtime.coordinator.create_tokens(1)[0])
    device.connect()
    runtime.step()
    assert runtime.coordinator.rounds.current is not None
    yield Fuzzed(runtime, create_app(runtime), device)
    runtime.stop()


OPERATIONS = [
    ("POST", "/v1/enroll"),
    ("POST", "/v1/handshake/hello"),
    ("POST", "/v1/handshake/finish"),
    ("POST", "/v1/task"),
    ("POST", "/v1/model"),
    ("POST", "/v1/update"),
    ("POST", "/v1/proof"),
    ("POST", "/v1/secagg/config"),
    ("POST", "/v1/secagg/relay"),
    ("POST", "/v1/secagg/advertise"),
    ("POST", "/v1/secagg/shares"),
    ("POST", "/v1/secagg/masked"),
    ("POST", "/v1/secagg/unmask"),
    ("POST", "/v1/secagg/consistency"),
    ("GET", "/v1/identity"),
    ("GET", "/v1/rotations"),
    ("GET", "/v1/status"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/admin/tokens"),
    ("POST", "/v1/admin/devices/{device_id}/revoke"),
    ("POST", "/v1/admin/devices/{device_id}/quarantine"),
    ("POST", "/v1/admin/devices/{device_id}/reinstate"),
    ("GET", "/v1/admin/devices"),
    ("GET", "/v1/admin/events"),
    ("GET", "/v1/admin/rounds"),
]


@pytest.fixture(scope="module")
def operations(fuzzed: Fuzzed) -> dict[tuple[str, str], Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app)
    loaded = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in loaded), "the served OpenAPI schema must load without errors"
    ops = {(op.method.upper(), op.path): op for op in (r.ok() for r in loaded if isinstance(r, Ok))}
    assert sorted(ops) == sorted(OPERATIONS), "the fuzzed operation list must cover every served route"
    return ops


PUBLIC = {
    ("GET", "/v1/identity"),
    ("GET", "/v1/rotations"),
    ("GET", "/v1/status"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}


def _newest_event_id(runtime: ServerRuntime) -> int:
    newest = runtime.store.security_events(1)
    return newest[0].id if newest else 0


def _check(fuzzed: Fuzzed, case: Any, headers: dict[str, str] | None) -> int:
    """Send one generated request; return its status after checking the refusal contract."""
    runtime = fuzzed.runtime
    before, last_event = counts(runtime), _newest_event_id(runtime)
    response = case.call(headers=headers)
    fuzzed.sent[(case.method.upper(), case.operation.path)] += 1
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    events = [e for e in runtime.store.security_events(50) if e.id > last_event]
    if response.status_code < 400:
        assert events == [], (case.method, case.path, [e.reason for e in events])
        return response.status_code
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"], body
    assert counts(runtime) == before, (case.method, case.path, body)
    if headers is not None and "Authorization" in headers and body["code"] != "admin_required":
        # the administrator's own malformed request (422, 404) is an error, not an attack (negative
        # generation may drop or mangle the credentials: then it is admin_required, recorded below)
        assert events == [], (case.method, case.path, body, [e.reason for e in events])
    else:
        # anything else refused is recorded as exactly one security event, with the code as its reason
        assert [e.reason for e in events] == [body["code"]], (case.method, case.path, body)
        session = (headers or {}).get("X-Qflare-Session")
        if session is not None and session == fuzzed.device._session_id:
            # generated frames never authenticate: the session's device is not blamed for them
            assert events[0].device_id is None, (case.method, case.path, body)
            assert events[0].session_id == session, (case.method, case.path, body)
    return response.status_code


def _fuzz(
    fuzzed: Fuzzed, operation: Any, mode: GenerationMode, headers: dict[str, str] | None, fuzz: Any = FUZZ
) -> list[int]:
    """Fuzz one operation; return the statuses of the requests sent (at least one)."""
    statuses: list[int] = []

    @fuzz
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        statuses.append(_check(fuzzed, case, headers))

    run()
    assert statuses, f"the fuzzer sent no request to {operation.method.upper()} {operation.path}"
    return statuses


def _assert_intact(fuzzed: Fuzzed) -> None:
    """The device, its session and the round survived: refused frames disturbed nothing."""
    runtime = fuzzed.runtime
    session = fuzzed.device._session_id
    task = fuzzed.device.task()  # the same session still works: refused frames did not advance its counter
    assert fuzzed.device._session_id == session and task.selected and task.round == 1
    assert len(runtime.store.list_devices(status="active")) == 1
    rnd = runtime.coordinator.rounds.current
    assert rnd is not None and rnd.number == 1 and not rnd.accepted
    assert runtime.store.count_updates() == 0


# Operations whose inputs have constraints, so that schema-violating (negative) requests exist; the others
# take any bytes / any header value, which positive generation already covers.
CONSTRAINED = [
    ("POST", "/v1/admin/tokens"),
    ("POST", "/v1/admin/devices/{device_id}/revoke"),
    ("POST", "/v1/admin/devices/{device_id}/quarantine"),
    ("GET", "/v1/admin/events"),
]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in CONSTRAINED
]
IDS = [f"{m} {p} {g.value}" for m, p, g in CASES]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=IDS)
def test_route_anonymous(
    method: str, path: str, mode: GenerationMode, fuzzed: Fuzzed, operations: dict[tuple[str, str], Any]
) -> None:
    statuses = _fuzz(fuzzed, operations[(method, path)], mode, None)
    if (method, path) in PUBLIC:
        assert all(s == 200 for s in statuses), statuses
    else:  # random bytes, no session, no admin credentials: every request is refused
        assert all(400 <= s < 500 for s in statuses), statuses
    _assert_intact(fuzzed)


ADMIN_CASES = [c for c in CASES if c[1].startswith("/v1/admin/")]


@pytest.mark.parametrize(("method", "path", "mode"), ADMIN_CASES, ids=[f"{m} {p} {g.value}" for m, p, g in ADMIN_CASES])
def test_admin_route_authenticated(
    method: str, path: str, mode: GenerationMode, fuzzed: Fuzzed, operations: dict[tuple[str, str], Any]
) -> None:
    statuses = _fuzz(fuzzed, operations[(method, path)], mode, admin(fuzzed.runtime))
    if mode is GenerationMode.POSITIVE:
        assert 401 not in statuses and 403 not in statuses, f"the admin credentials were not accepted: {statuses}"
    else:  # negative generation may mangle the credentials (or only a header the route ignores)
        assert any(400 <= s < 500 for s in statuses), f"no schema-violating request was refused: {statuses}"
        assert any(s not in (401, 403) for s in statuses), f"no request got past the admin check: {statuses}"
    _assert_intact(fuzzed)


@pytest.mark.parametrize(
    "path", ["/v1/task", "/v1/model", "/v1/update", "/v1/proof", "/v1/secagg/config", "/v1/secagg/masked"]
)
def test_sessioned_route_with_a_live_session(path: str, fuzzed: Fuzzed, operations: dict[tuple[str, str], Any]) -> None:
    """Random frames under the device's real session id reach the channel: refused, never a 5xx."""
    session = fuzzed.device._session_id
    assert session is not None
    statuses = _fuzz(fuzzed, operations[("POST", path)], GenerationMode.POSITIVE, {"X-Qflare-Session": session})
    assert all(400 <= s < 500 for s in statuses), statuses
    _assert_intact(fuzzed)


def test_every_route_is_fuzzed_and_the_federation_survives(
    fuzzed: Fuzzed, operations: dict[tuple[str, str], Any]
) -> None:
    """A short sweep of its own over every operation (not relying on the other tests having run first):
    each operation receives requests, every non-public one refuses them, and the federation is intact."""
    quick = settings(FUZZ, max_examples=5)
    refused: Counter[tuple[str, str]] = Counter()
    for op in OPERATIONS:
        sent_before = fuzzed.sent[op]
        statuses = _fuzz(fuzzed, operations[op], GenerationMode.POSITIVE, None, quick)
        assert fuzzed.sent[op] - sent_before == len(statuses) > 0
        refused[op] = sum(400 <= s < 500 for s in statuses)
    assert all(refused[op] == 0 for op in PUBLIC), refused
    assert all(refused[op] > 0 for op in OPERATIONS if op not in PUBLIC), refused
    _assert_intact(fuzzed)
