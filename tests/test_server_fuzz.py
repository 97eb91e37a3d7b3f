"""Schemathesis against the served OpenAPI schema: no 5xx on any route, and refusals change nothing.

The federation under test has an enrolled device with a live session and an open round, so the protocol
routes have real state that a generated request could (but must not) disturb.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
    ("GET", "/v1/identity"),
    ("GET", "/v1/status"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/admin/tokens"),
    ("POST", "/v1/admin/devices/{device_id}/revoke"),
    ("GET", "/v1/admin/devices"),
    ("GET", "/v1/admin/events"),
]


@pytest.fixture(scope="module")
def operations(fuzzed: Fuzzed) -> dict[tuple[str, str], Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app)
    loaded = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in loaded), "the served OpenAPI schema must load without errors"
    ops = {(op.method.upper(), op.path): op for op in (r.ok() for r in loaded if isinstance(r, Ok))}
    assert sorted(ops) == sorted(OPERATIONS), "the fuzzed operation list must cover every served route"
    return ops


def _check(fuzzed: Fuzzed, case: Any, headers: dict[str, str] | None = None) -> None:
    before = counts(fuzzed.runtime)
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"code", "message"} and body["code"], body
        assert counts(fuzzed.runtime) == before, (case.method, case.path, body)


def _fuzz(fuzzed: Fuzzed, operation: Any, mode: GenerationMode, headers: dict[str, str] | None) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        _check(fuzzed, case, headers)

    run()


# Operations whose inputs have constraints, so that schema-violating (negative) requests exist; the others
# take any bytes / any header value, which positive generation already covers.
CONSTRAINED = [
    ("POST", "/v1/admin/tokens"),
    ("POST", "/v1/admin/devices/{device_id}/revoke"),
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
    _fuzz(fuzzed, operations[(method, path)], mode, None)


ADMIN_CASES = [c for c in CASES if c[1].startswith("/v1/admin/")]


@pytest.mark.parametrize(("method", "path", "mode"), ADMIN_CASES, ids=[f"{m} {p} {g.value}" for m, p, g in ADMIN_CASES])
def test_admin_route_authenticated(
    method: str, path: str, mode: GenerationMode, fuzzed: Fuzzed, operations: dict[tuple[str, str], Any]
) -> None:
    _fuzz(fuzzed, operations[(method, path)], mode, admin(fuzzed.runtime))


@pytest.mark.parametrize("path", ["/v1/task", "/v1/model", "/v1/update"])
def test_sessioned_route_with_a_live_session(path: str, fuzzed: Fuzzed, operations: dict[tuple[str, str], Any]) -> None:
    """Random frames under the device's real session id reach the channel: refused, never a 5xx."""
    session = fuzzed.device._session_id
    assert session is not None
    _fuzz(fuzzed, operations[("POST", path)], GenerationMode.POSITIVE, {"X-Qflare-Session": session})


def test_fuzzing_left_the_federation_intact(fuzzed: Fuzzed) -> None:
    """Runs after the fuzz tests (file order): the device, its session and the round survived them."""
    runtime = fuzzed.runtime
    session = fuzzed.device._session_id
    task = fuzzed.device.task()  # the same session still works: refused frames did not disturb it
    assert fuzzed.device._session_id == session and task.selected and task.round == 1
    assert len(runtime.store.list_devices(status="active")) == 1
    rnd = runtime.coordinator.rounds.current
    assert rnd is not None and rnd.number == 1 and not rnd.accepted
    assert runtime.store.count_updates() == 0
