"""The closed error vocabulary: every code is an ErrorCode member with a meaning, classes, status and
retry meaning; the documented table is the generated one; the device loop and the HTTP transport act
on ``retry``; a peer's unknown code never crashes the reader."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import qflare.errors as errors_module
from qflare.crypto import SigningKey
from qflare.device import DeviceClient, DeviceState
from qflare.errors import (
    CODE_SPECS,
    CODE_TABLE_BEGIN,
    CODE_TABLE_END,
    AuthError,
    ConfigError,
    ErrorCode,
    PolicyError,
    ProtocolError,
    QflareError,
    RateLimitedError,
    Retry,
    ServerUnavailableError,
    code_spec,
    code_table_markdown,
    error_from_code,
)
from qflare.errors_table import replace_code_table
from qflare.protocol import TaskInfo
from qflare.protocol.messages import Route
from qflare.transport import CircuitBreaker, HttpTransport, RetryPolicy
from qflare.wire import ParamLayout

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qflare"
ERROR_CLASSES = {
    name: obj for name, obj in vars(errors_module).items() if isinstance(obj, type) and issubclass(obj, QflareError)
}


# ---------------------------------------------------------------- the documented table


def test_protocol_doc_table_is_the_generated_one() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    begin = lines.index(CODE_TABLE_BEGIN + "\n")
    end = lines.index(CODE_TABLE_END + "\n")
    assert "".join(lines[begin + 1 : end]) == code_table_markdown(), (
        "docs/protocol.md is stale: run python -m qflare.errors_table docs/protocol.md"
    )
    assert replace_code_table(text) == text


def test_table_has_one_row_per_code_and_replacing_is_exact() -> None:
    table = code_table_markdown()
    rows = table.splitlines()[2:]
    assert [row.split("|")[1].strip().strip("`") for row in rows] == [c.value for c in ErrorCode]
    doc = f"intro\n{CODE_TABLE_BEGIN}\nold table\n{CODE_TABLE_END}\noutro\n"
    assert replace_code_table(doc) == f"intro\n{CODE_TABLE_BEGIN}\n{table}{CODE_TABLE_END}\noutro\n"
    with pytest.raises(ConfigError):
        replace_code_table("no markers here\n")
    with pytest.raises(ConfigError):
        replace_code_table(f"{CODE_TABLE_END}\n{CODE_TABLE_BEGIN}\n")


# ---------------------------------------------------------------- the vocabulary is closed


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _code_value(node: ast.expr) -> str | None:
    """The code a ``code=`` value names: a string literal or ``ErrorCode.X`` (None for anything else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode":
        member = getattr(ErrorCode, node.attr, None)
        return member.value if isinstance(member, ErrorCode) else f"ErrorCode.{node.attr}"
    return None


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def test_every_code_in_the_source_is_a_member_and_raised_with_its_classes() -> None:
    members = {c.value for c in ErrorCode}
    used: set[str] = set()
    problems: list[str] = []
    for path, tree in _sources():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg != "code":
                        continue
                    code = _code_value(kw.value)
                    if code is None:
                        continue  # a variable passed through (error_from_code, super().__init__)
                    used.add(code)
                    if code not in members:
                        problems.append(f"{where}:{node.lineno}: {code!r} is not an ErrorCode")
                        continue
                    cls = ERROR_CLASSES.get(_callee(node) or "")
                    if cls is not None and cls not in CODE_SPECS[ErrorCode(code)].classes:
                        problems.append(f"{where}:{node.lineno}: {cls.__name__} raised with {code!r}")
            elif isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                    if isinstance(stmt, ast.AnnAssign):
                        targets = [stmt.target]
                    if any(isinstance(t, ast.Name) and t.id == "code" for t in targets):
                        value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
                        code = _code_value(value) if value is not None else None
                        if code is None or code not in members:
                            problems.append(f"{where}:{stmt.lineno}: class {node.name} has code {code!r}")
                        else:
                            used.add(code)
            elif isinstance(node, ast.Attribute):
                code = _code_value(node)
                if code is not None:
                    used.add(code)
    assert problems == [], "\n".join(problems)
    assert members - used == set(), "members nothing raises or sends"


def test_every_member_has_meaning_status_classes_and_retry() -> None:
    assert set(CODE_SPECS) == set(ErrorCode)
    for code, spec in CODE_SPECS.items():
        assert spec.meaning and spec.meaning == spec.meaning.strip(), code
        assert all(issubclass(c, QflareError) for c in spec.classes), code
        generic = code in (ErrorCode.HTTP_ERROR, ErrorCode.UNKNOWN_REMOTE_CODE)
        assert (spec.classes == ()) == generic, code
        assert (spec.retry is None) == generic, code
        if not generic:
            assert spec.statuses and all(400 <= s < 600 for s in spec.statuses), code
    for cls in ERROR_CLASSES.values():  # each class's default code lists the class itself
        assert cls in CODE_SPECS[cls.code].classes, cls
        assert isinstance(cls.code, ErrorCode)


def test_codes_are_checked_at_construction() -> None:
    err = QflareError("stale", code="stale_model")
    assert err.code is ErrorCode.STALE_MODEL and err.code == "stale_model"
    assert err.retry is Retry.DROP_UPDATE
    assert QflareError("x", code=ErrorCode.REVOKED).retry is Retry.FATAL
    assert code_spec("revoked") is CODE_SPECS[ErrorCode.REVOKED]
    with pytest.raises(ValueError):
        QflareError("typo", code="stale_modle")
    with pytest.raises(ValueError):
        AuthError("typo", code="")
    with pytest.raises(ValueError):
        code_spec("nope")
    with pytest.raises(ValueError):

        class _Typo(QflareError):
            code = "no_such_code"  # type: ignore[assignment]


def test_class_default_retry_applies_to_generic_codes_only() -> None:
    assert ProtocolError("x", code=ErrorCode.HTTP_ERROR).retry is Retry.RENEW_SESSION
    assert RateLimitedError("x", code=ErrorCode.HTTP_ERROR).retry is Retry.TRANSIENT
    assert QflareError("x", code=ErrorCode.UNKNOWN_REMOTE_CODE).retry is Retry.FATAL
    # a specific code keeps its own meaning whatever class carries it
    assert ConfigError("x", code="key_alg_mismatch").retry is PolicyError("x", code="key_alg_mismatch").retry


# ---------------------------------------------------------------- rebuilding a peer's error


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_from_code_rebuilds_each_member(code: ErrorCode) -> None:
    spec = CODE_SPECS[code]
    err = error_from_code(code.value, "msg", 418)
    assert err.code is code and err.http_status == 418 and err.message == "msg"
    if spec.classes:
        assert type(err) is spec.classes[0]


@pytest.mark.parametrize(
    ("status", "cls", "retry"),
    [
        (403, PolicyError, Retry.RENEW_SESSION),
        (429, RateLimitedError, Retry.TRANSIENT),
        (503, ServerUnavailableError, Retry.TRANSIENT),
        (599, ProtocolError, Retry.RENEW_SESSION),
        (None, ProtocolError, Retry.RENEW_SESSION),
    ],
)
def test_unknown_remote_code_is_typed_never_raised(status: int | None, cls: type, retry: Retry) -> None:
    for hostile in ("ip_blocked", "", "x" * 100_000, "\x00\n<script>", "Stale_Model"):
        err = error_from_code(hostile, "peer said no", status)
        assert type(err) is cls and err.code is ErrorCode.UNKNOWN_REMOTE_CODE
        assert err.retry is retry
        assert err.message.startswith("peer said no") and repr(hostile[:64]) in err.message
        assert len(err.message) < 200
        if status is not None:
            assert err.http_status == status


# ---------------------------------------------------------------- the device loop follows retry


class ScriptedDevice:
    """Stands in for the protocol Device: counts handshakes, hands out one open task, then 'finished'."""

    device_id = "d" * 64

    def __init__(self) -> None:
        self.connects = 0
        self.tasks = 0

    def connect(self) -> str:
        self.connects += 1
        return "ab" * 32

    def task(self) -> TaskInfo:
        self.tasks += 1
        if self.tasks == 1:
            return TaskInfo(round=3, state="open", selected=True, model_hash="00" * 32, model_version=2)
        return TaskInfo(round=3, state="finished", selected=False, model_version=2)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("device")


class _Workload:
    layout = ParamLayout.from_module(torch.nn.Linear(2, 2))


_SERVER_KEY = SigningKey.generate().public  # one coordinator: the state dir it is pinned to is shared


def scripted_client(state_dir: Path, error: QflareError) -> tuple[DeviceClient, ScriptedDevice, list[float]]:
    sleeps: list[float] = []
    client = DeviceClient(
        transport=None,  # type: ignore[arg-type]  # the scripted device never uses it
        state=DeviceState(state_dir),
        server_key=_SERVER_KEY,
        workload=_Workload(),  # type: ignore[arg-type]
        sleep=sleeps.append,
    )
    device = ScriptedDevice()
    client.device = device  # type: ignore[assignment]

    def work(task: TaskInfo) -> None:
        raise error

    client._work = work  # type: ignore[method-assign]
    client._pending = ("pending update", "00" * 32)  # type: ignore[assignment]
    return client, device, sleeps


@pytest.mark.parametrize("code", list(ErrorCode))
def test_device_loop_acts_on_retry(state_dir: Path, code: ErrorCode) -> None:
    error = error_from_code(code.value, "scripted refusal", None)
    if isinstance(error, RateLimitedError):
        error.retry_after_s = 7.0
    client, device, sleeps = scripted_client(state_dir, error)
    retry = error.retry
    if retry is Retry.FATAL:
        with pytest.raises(QflareError) as info:
            client.run(poll_interval=0.0)
        assert info.value is error and device.tasks == 1
        return
    summary = client.run(poll_interval=0.0)
    assert summary.reason == "finished" and device.tasks == 2
    pending_kept = client._pending is not None
    if retry is Retry.TRANSIENT and isinstance(error, RateLimitedError):
        assert device.connects == 1 and pending_kept and sleeps and sleeps[0] >= 7.0
    elif retry is Retry.TRANSIENT:
        assert device.connects == 2 and pending_kept and len(sleeps) == 1
    elif retry is Retry.SKIP_ROUND:
        assert device.connects == 1 and not pending_kept and 3 in client._skipped
    elif retry is Retry.DROP_UPDATE:
        assert device.connects == 2 and not pending_kept and not client._skipped
    else:
        assert retry is Retry.RENEW_SESSION
        assert device.connects == 2 and pending_kept and not client._skipped


def test_device_loop_gives_up_after_max_refusals(state_dir: Path) -> None:
    error = error_from_code("malformed", "again", 400)
    client, device, _ = scripted_client(state_dir, error)
    device.task = lambda: TaskInfo(round=3, state="open", selected=True)  # type: ignore[method-assign]
    with pytest.raises(QflareError) as info:
        client.run(poll_interval=0.0, max_refusals=3)
    assert info.value is error and device.connects == 3


# ---------------------------------------------------------------- the HTTP transport follows retry


def transport(responses: list[httpx.Response]) -> tuple[HttpTransport, list[float], list[int]]:
    calls: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        return responses[min(len(calls), len(responses)) - 1]

    sleeps: list[float] = []
    client = httpx.Client(base_url="http://c.test", transport=httpx.MockTransport(handler))
    t = HttpTransport(
        "http://c.test",
        client=client,
        retry=RetryPolicy(attempts=3, initial_s=0.01, max_wait_s=0.02, jitter_s=0.0),
        breaker=CircuitBreaker(failure_threshold=100),
        sleep=sleeps.append,
    )
    return t, sleeps, calls


def test_transport_retries_transient_codes_only() -> None:
    ok = httpx.Response(200, content=b"fine")
    # database_unavailable and a body-less 429 (class RateLimitedError by status) are transient
    for first in (
        httpx.Response(503, json={"code": "database_unavailable", "message": "db"}),
        httpx.Response(429, text="slow down", headers={"retry-after": "2"}),
    ):
        t, sleeps, calls = transport([first, ok])
        assert t.request(Route.TASK, b"") == b"fine" and len(calls) == 2 and len(sleeps) == 1
    t, sleeps, calls = transport([httpx.Response(429, text="slow down"), httpx.Response(429, text="still")])
    with pytest.raises(RateLimitedError) as info:
        t.request(Route.TASK, b"")
    assert info.value.code is ErrorCode.HTTP_ERROR and len(calls) == 3
    # internal_error (renew_session) and a known refusal are answered at once
    for status, code in ((500, "internal_error"), (409, "stale_model"), (401, "bad_signature")):
        t, sleeps, calls = transport([httpx.Response(status, json={"code": code, "message": "no"}), ok])
        with pytest.raises(QflareError) as err:
            t.request(Route.TASK, b"")
        assert err.value.code == code and err.value.http_status == status
        assert len(calls) == 1 and sleeps == []
