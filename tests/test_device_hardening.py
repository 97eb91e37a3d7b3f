"""A compromised or impersonated coordinator must not roll back, drain or silence a device.

Scripted stand-ins for the protocol Device play the hostile coordinator (they answer what a coordinator
holding the session keys could answer); fake httpx transports play anything on the HTTP path.  Clocks
and sleeps are injected: nothing here waits for real."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from typer.testing import CliRunner

from qflare.cli import app
from qflare.crypto import DEFAULT_SUITE, Field, MsgType, SignedEnvelope, SigningKey
from qflare.crypto.envelope import u64
from qflare.crypto.payloads import AckStatus, SignedUpdate
from qflare.device import DeviceClient, DeviceState
from qflare.device.loop import MAX_WAIT_S
from qflare.errors import (
    AuthError,
    ErrorCode,
    MalformedError,
    PatienceExhaustedError,
    QflareError,
    RateLimitedError,
    ResponseTooLargeError,
    Retry,
    ServerUnavailableError,
    StaleModelError,
    ValidationError,
)
from qflare.protocol import Receipt, Route, TaskInfo
from qflare.protocol.device import GlobalModel
from qflare.transport import CircuitBreaker, HttpTransport, RetryPolicy
from qflare.transport.http import SMALL_RESPONSE_LIMIT, model_response_limit, parse_retry_after
from qflare.wire import ParamLayout

SERVER = SigningKey.generate("ML-DSA-65")
H = "ab" * 32


class FakeClock:
    """A monotonic clock that only moves when the device sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        assert len(self.sleeps) < 5000, "the device loop made no progress"


class FakeWorkload:
    layout = ParamLayout.from_module(torch.nn.Linear(2, 2))

    def __init__(self) -> None:
        self.trained: list[int] = []

    def train(self, flat: torch.Tensor, rnd: int) -> Any:
        self.trained.append(rnd)
        return SimpleNamespace(num_examples=1, duration_s=0.0, mean_loss=0.0)


def ack_for(device_id: str, rnd: int, update_hash: str, status: AckStatus = AckStatus.ACCEPTED) -> bytes:
    fields = {
        Field.DEVICE_KEY_ID: bytes.fromhex(device_id),
        Field.ROUND: u64(rnd),
        Field.UPDATE_HASH: bytes.fromhex(update_hash),
        Field.STATUS: bytes([status]),
        Field.TIMESTAMP: u64(1_700_000_000),
    }
    return SignedEnvelope.sign(DEFAULT_SUITE, MsgType.UPDATE_ACK, fields, SERVER).to_bytes()


class HostileDevice:
    """Stands in for the protocol Device: ``tasks`` says what the coordinator answers to each poll."""

    def __init__(self, device_id: str, tasks: Callable[[int], TaskInfo]) -> None:
        self.device_id, self.tasks = device_id, tasks
        self.polls = self.connects = self.fetches = self.submits = self.proofs = 0
        self.submit_error: QflareError | None = None
        self.connect_errors: list[QflareError] = []

    def connect(self) -> str:
        self.connects += 1
        if self.connect_errors:
            raise self.connect_errors.pop(0)
        return "ab" * 32

    def task(self) -> TaskInfo:
        self.polls += 1
        return self.tasks(self.polls)

    def fetch_model(self, task: TaskInfo) -> GlobalModel:
        self.fetches += 1
        return GlobalModel(task.model_version, task.model_hash, torch.zeros(FakeWorkload.layout.numel))

    def prepare_update(self, task: TaskInfo, model: GlobalModel, result: Any) -> SignedUpdate:
        return SignedUpdate(task.round, b"", f"{task.round:064x}")

    def submit_signed(self, update: SignedUpdate) -> tuple[Receipt, bytes]:
        self.submits += 1
        if self.submit_error is not None:
            raise self.submit_error
        return Receipt(update.round, update.update_hash, 1), ack_for(self.device_id, update.round, update.update_hash)

    def fetch_proof(self, round_number: int, update_hash: str, examples: int, **_: Any) -> Any:
        """A hostile coordinator's receipt proof never verifies: the device records that and goes on."""
        self.proofs += 1
        raise AuthError("the proof does not verify", code="bad_inclusion_proof")


def hostile_client(
    tmp_path: Path, tasks: Callable[[int], TaskInfo], **kwargs: Any
) -> tuple[DeviceClient, HostileDevice, FakeClock, FakeWorkload]:
    clock = FakeClock()
    workload = FakeWorkload()
    state = DeviceState(tmp_path / "dev")
    state.pin(SERVER.public.key_id)
    client = DeviceClient(
        transport=None,  # type: ignore[arg-type]  # the hostile device never uses it
        state=state,
        server_key=SERVER.public,
        workload=workload,  # type: ignore[arg-type]
        sleep=clock.sleep,
        monotonic=clock,
        **kwargs,
    )
    device = HostileDevice(client.device_id, tasks)
    client.device = device  # type: ignore[assignment]
    return client, device, clock, workload


def open_task(rnd: int, version: int, *, submitted: bool = False) -> TaskInfo:
    return TaskInfo(rnd, "open", True, H, version, 0.0, submitted)


# ---------------------------------------------------------------- 1. rollback


def test_older_model_or_round_is_refused_after_restart(tmp_path: Path) -> None:
    client, device, _, workload = hostile_client(tmp_path, lambda n: open_task(5, 4) if n == 1 else open_task(6, 5))
    client.run(max_rounds=2, poll_interval=0.0)
    assert workload.trained == [5, 6] and client.state.progress() == (5, 6)

    # The device restarts; the coordinator (restored from an old backup, or an impostor with the key)
    # offers an older model, then an older round on the current model.
    for task in (open_task(7, 3), open_task(4, 5)):
        again, device, _, workload = hostile_client(tmp_path, lambda n, t=task: t)  # type: ignore[misc]
        with pytest.raises(StaleModelError) as info:
            again.run(poll_interval=0.0, max_refusals=3)
        assert info.value.code is ErrorCode.MODEL_ROLLBACK and info.value.retry is Retry.DROP_UPDATE
        assert device.fetches == 0 and workload.trained == []
    assert again.state.progress() == (5, 6)  # never lowered


def test_waiting_task_with_an_older_model_is_refused(tmp_path: Path) -> None:
    client, _, _, _ = hostile_client(tmp_path, lambda n: TaskInfo(0, "finished", False, H, 1))
    client.state.record_progress(model_version=3, round=2)
    with pytest.raises(StaleModelError, match="rollback"):
        client.run(poll_interval=0.0, max_refusals=1)


# ---------------------------------------------------------------- 2. receipts are proof of delivery


def test_receipts_store_the_signed_ack_and_reverify(tmp_path: Path) -> None:
    client, _, _, _ = hostile_client(tmp_path, lambda n: open_task(n, n - 1))
    client.run(max_rounds=3, poll_interval=0.0)
    lines = client.state.receipts()
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert all(
        set(r) == {"device_id", "round", "update_hash", "duplicate", "signed_at", "ack", "examples"} for r in lines
    )
    checks = client.state.verify_receipts(SERVER.public)
    assert [c.ok for c in checks] == [True, True, True]
    assert not any(c.ok for c in client.state.verify_receipts(SigningKey.generate("ML-DSA-65").public))

    runner = CliRunner()
    # the hostile coordinator's receipt proofs (rounds 1 and 2, asked once each round was over) never
    # verified: recorded, and verify-receipts fails them
    failed = runner.invoke(app, ["client", "verify-receipts", "--state-dir", str(tmp_path / "dev")])
    assert failed.exit_code == 1 and "3 of 3 receipts verify" in failed.output
    assert "0 of 2 inclusion proofs verify" in failed.output and "bad_inclusion_proof" in failed.output
    (tmp_path / "dev" / "proofs.jsonl").unlink()
    ok = runner.invoke(app, ["client", "verify-receipts", "--state-dir", str(tmp_path / "dev")])
    assert ok.exit_code == 0, ok.output
    assert "3 of 3 receipts verify" in ok.output

    # A line edited after the fact (another round, a duplicate flag, a dropped ack) no longer verifies.
    edited = [
        dict(lines[0], round=9),
        dict(lines[1], duplicate=True),
        {k: v for k, v in lines[2].items() if k != "ack"},
    ]
    client.state.receipts_path.write_text("".join(json.dumps(e) + "\n" for e in edited))
    assert [c.ok for c in client.state.verify_receipts(SERVER.public)] == [False, False, False]
    bad = runner.invoke(app, ["client", "verify-receipts", "--state-dir", str(tmp_path / "dev")])
    assert bad.exit_code == 1 and "0 of 3 receipts verify" in bad.output


# ---------------------------------------------------------------- 3. unbounded retraining


def test_selected_not_submitted_forever_trains_once_and_sleeps_between_polls(tmp_path: Path) -> None:
    client, device, clock, workload = hostile_client(tmp_path, lambda n: open_task(3, 2))

    def stop_after_polls(seconds: float) -> None:
        FakeClock.sleep(clock, seconds)
        if device.polls >= 25:
            raise KeyboardInterrupt

    client._sleep = stop_after_polls
    with pytest.raises(KeyboardInterrupt):
        client.run(poll_interval=1.0)
    assert workload.trained == [3] and device.submits == 1
    assert len(clock.sleeps) == device.polls and min(clock.sleeps) >= 0.5  # a jittered pause after every poll


def test_refused_update_is_not_retrained_for_the_same_model(tmp_path: Path) -> None:
    def tasks(n: int) -> TaskInfo:
        return open_task(3, 2) if n < 10 else open_task(4, 3) if n < 20 else TaskInfo(0, "finished", False, H, 3)

    client, device, _, workload = hostile_client(tmp_path, tasks)
    device.submit_error = StaleModelError("refused", code="stale_model")
    assert client.run(poll_interval=0.0, max_refusals=50).reason == "finished"
    # one training for (3, 2), one for (4, 3): refusals do not make the device train again
    assert workload.trained == [3, 4]


def test_trainings_per_period_are_capped(tmp_path: Path) -> None:
    # A coordinator that opens a new round at every poll.
    client, _device, clock, workload = hostile_client(
        tmp_path, lambda n: open_task(n, n), max_trainings=3, training_period_s=100.0
    )
    client.run(max_rounds=5, poll_interval=1.0)
    assert workload.trained[:3] == [1, 2, 3] and len(workload.trained) == 5
    assert clock.now >= 100.0  # the 4th training waited for the period to pass


# ---------------------------------------------------------------- 4. task numbers are range-checked


@pytest.mark.parametrize(
    "change",
    [
        {"round": 2**64},
        {"round": -1},
        {"model_version": -1},
        {"model_version": 2**70},
        {"state": "exploded"},
        {"model_hash": "zz"},
        {"deadline": float("nan")},
        {"deadline": -5.0},
        {"selected": False, "submitted": True},
    ],
)
def test_task_values_out_of_range_are_refused_at_parse_time(change: dict[str, Any]) -> None:
    doc = json.loads(open_task(3, 2).to_bytes()) | change
    raw = json.dumps(doc).encode()
    with pytest.raises(MalformedError) as info:
        TaskInfo.from_bytes(raw)
    assert info.value.code is ErrorCode.BAD_TASK and info.value.retry is Retry.RENEW_SESSION
    assert TaskInfo.from_bytes(open_task(3, 2).to_bytes()) == open_task(3, 2)


# ---------------------------------------------------------------- 5-7. the HTTP transport


def make_transport(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> tuple[HttpTransport, FakeClock]:
    clock = FakeClock()
    client = httpx.Client(base_url="http://c.test", transport=httpx.MockTransport(handler))
    t = HttpTransport(
        "http://c.test",
        client=client,
        retry=kw.pop("retry", RetryPolicy(attempts=3, initial_s=0.01, max_wait_s=0.02, jitter_s=0.0)),
        breaker=CircuitBreaker(failure_threshold=100),
        sleep=clock.sleep,
        clock=clock,
        **kw,
    )
    return t, clock


def test_oversized_answer_is_refused_unread_and_not_retried() -> None:
    pulled = [0]
    calls = [0]

    def endless() -> Iterator[bytes]:
        while True:
            pulled[0] += 65536
            yield b"\0" * 65536

    def handler(req: httpx.Request) -> httpx.Response:
        calls[0] += 1
        return httpx.Response(200, content=endless())

    t, _ = make_transport(handler)
    with pytest.raises(ResponseTooLargeError) as info:
        t.request(Route.TASK, b"", "s")
    assert info.value.retry is Retry.TRANSIENT and calls[0] == 1
    assert pulled[0] <= SMALL_RESPONSE_LIMIT + 65536
    # A declared Content-Length over the limit is refused before any body is read.
    t2, _ = make_transport(lambda req: httpx.Response(200, headers={"content-length": str(10**12)}, content=b""))
    with pytest.raises(ResponseTooLargeError):
        t2.request(Route.HELLO, b"")


def test_model_limit_follows_the_layout() -> None:
    layout = FakeWorkload.layout
    limit = model_response_limit(layout)
    assert 4 * layout.numel < limit < 4 * layout.numel + (1 << 20)
    t, _ = make_transport(lambda req: httpx.Response(200, content=b"\0" * (limit + 1)))
    t.limit_response(Route.MODEL, limit)
    with pytest.raises(ResponseTooLargeError):
        t.request(Route.MODEL, b"", "s")
    t, _ = make_transport(lambda req: httpx.Response(200, content=b"\0" * limit))
    t.limit_response(Route.MODEL, limit)
    assert len(t.request(Route.MODEL, b"", "s")) == limit


def test_trickled_answer_hits_the_total_deadline() -> None:
    holder: dict[str, FakeClock] = {}
    sent = [0]

    def trickle() -> Iterator[bytes]:
        for _ in range(12):
            holder["clock"].now += 1.0  # one byte per second: every gap is under the read timeout
            sent[0] += 1
            yield b"x"

    t, clock = make_transport(lambda req: httpx.Response(200, content=trickle()), deadline_s=2.0)
    holder["clock"] = clock
    with pytest.raises(ServerUnavailableError, match="deadline"):
        t.request(Route.TASK, b"", "s")
    assert sent[0] <= 3 * 3  # three attempts, each cut at the deadline


@pytest.mark.parametrize("value", ["1e9", "1e300", "inf", "nan", "-5", "0x10", "5 seconds", "9" * 40])
def test_retry_after_junk_is_ignored(value: str) -> None:
    assert parse_retry_after(value) is None


def test_retry_after_is_capped_everywhere(tmp_path: Path) -> None:
    assert parse_retry_after("1000000000", max_s=30.0) == 30.0
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", max_s=30.0) == 30.0
    t, clock = make_transport(
        lambda req: httpx.Response(429, headers={"Retry-After": "1000000000"}, json={"code": "rate_limited"}),
        retry=RetryPolicy(attempts=2, max_retry_after_s=30.0),
    )
    with pytest.raises(RateLimitedError) as info:
        t.request(Route.TASK, b"", "s")
    assert clock.sleeps == [30.0] and info.value.retry_after_s == 30.0
    # The loop caps what it is told too (an error built anywhere, e.g. in process).
    client, device, clock, _ = hostile_client(tmp_path, lambda n: TaskInfo(0, "finished", False, H, 0))
    device.connect_errors = [RateLimitedError("slow", retry_after_s=1e300)]
    assert client.run(poll_interval=0.0).reason == "finished"
    assert max(clock.sleeps) <= MAX_WAIT_S


# ---------------------------------------------------------------- 6. one patience for every failure


def test_patience_counts_every_kind_of_failure(tmp_path: Path) -> None:
    # Refusals that never end (each poll succeeds, each submit is refused) exhaust the patience.
    client, device, clock, _ = hostile_client(tmp_path, lambda n: open_task(n, n))
    device.submit_error = ValidationError("no", code="bad_shape")
    with pytest.raises(PatienceExhaustedError) as info:
        client.run(poll_interval=1.0, give_up_after_s=30.0, max_refusals=10**6)
    assert info.value.retry is Retry.FATAL and "bad_shape" in str(info.value)
    assert 30.0 <= clock.now <= 30.0 + 2 * MAX_WAIT_S


# ---------------------------------------------------------------- 8. unauthenticated errors


def http_client(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]) -> tuple[DeviceClient, FakeClock]:
    transport, clock = make_transport(handler)
    client = DeviceClient(
        transport=transport,
        state=DeviceState(tmp_path / "dev"),
        server_key=SERVER.public,
        workload=FakeWorkload(),  # type: ignore[arg-type]
        sleep=clock.sleep,
        monotonic=clock,
    )
    return client, clock


@pytest.mark.parametrize(("status", "code"), [(403, "revoked"), (422, "architecture_mismatch"), (401, "token_used")])
def test_plain_http_error_bodies_do_not_stop_the_device(tmp_path: Path, status: int, code: str) -> None:
    client, clock = http_client(tmp_path, lambda req: httpx.Response(status, json={"code": code, "message": "x"}))
    with pytest.raises(PatienceExhaustedError) as info:
        client.run(poll_interval=1.0, give_up_after_s=120.0)
    assert code in str(info.value) and clock.now >= 120.0
    # enrollment too: a forged refusal is waited out within the patience, not obeyed at once
    client, clock = http_client(tmp_path, lambda req: httpx.Response(status, json={"code": code, "message": "x"}))
    with pytest.raises(PatienceExhaustedError):
        client.ensure_enrolled("token", patience_s=60.0)
    assert clock.now >= 60.0


def test_enrollment_waits_out_an_outage_within_patience(tmp_path: Path) -> None:
    client, device, clock, _ = hostile_client(tmp_path, lambda n: open_task(1, 0))
    answers: list[Any] = [ServerUnavailableError("down")] * 6 + [b"record"]

    def enroll(token: str) -> bytes:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return bytes(a)

    device.enroll = enroll  # type: ignore[attr-defined]
    client._check_record = lambda record: None  # type: ignore[method-assign]
    assert client.ensure_enrolled("tok", patience_s=300.0) is True
    assert len(clock.sleeps) == 6 and clock.now > 5.0  # longer than the transport's own five tries


def test_busy_coordinator_retry_after_is_waited_out(tmp_path: Path) -> None:
    client, device, clock, _ = hostile_client(tmp_path, lambda n: TaskInfo(0, "finished", False, H, 0))
    busy = ServerUnavailableError("disk full")
    busy.retry_after_s = 20.0
    device.connect_errors = [busy, busy]
    assert client.run(poll_interval=0.0, give_up_after_s=300.0).reason == "finished"
    assert clock.sleeps[:2] and all(s >= 20.0 * 0.8 for s in clock.sleeps[:2])


def test_signed_model_of_another_architecture_sits_the_round_out(tmp_path: Path) -> None:
    client, device, _, workload = hostile_client(
        tmp_path, lambda n: open_task(1, 0) if n < 4 else TaskInfo(0, "finished", False, H, 0)
    )

    def incompatible(task: TaskInfo) -> GlobalModel:
        device.fetches += 1
        raise ValidationError("the coordinator's signed model does not fit", code="incompatible_model")

    device.fetch_model = incompatible  # type: ignore[method-assign]
    summary = client.run(poll_interval=0.0)
    assert summary.reason == "finished" and device.fetches == 1 and workload.trained == []
    assert ErrorCode.INCOMPATIBLE_MODEL in list(ErrorCode)


def test_identity_fetch_waits_out_forged_errors_within_patience(tmp_path: Path) -> None:
    from qflare.cli.client import _fetch_identity

    calls = [0]
    doc = {"alg": SERVER.public.alg, "public_key": SERVER.public.raw.hex(), "suite": DEFAULT_SUITE.name}

    def handler(req: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] <= 2:
            return httpx.Response(403, json={"code": "revoked", "message": "forged"})
        return httpx.Response(200, json=doc)

    t, clock = make_transport(handler)
    state = DeviceState(tmp_path)
    key, _, announced = _fetch_identity(t, state, SERVER.public.key_id, 300.0, sleep=clock.sleep, clock=clock)
    assert announced is None  # this document names no model (as an older coordinator's)
    assert key == SERVER.public and calls[0] == 3 and clock.sleeps == [1.0, 1.0]


def test_a_huge_integer_deadline_is_a_bad_task_not_a_crash() -> None:
    """math.isfinite on a 401-digit JSON integer raised OverflowError, which ended the device loop."""
    from qflare.protocol.messages import TaskInfo

    body = (
        b'{"deadline":1' + b"0" * 400 + b',"model_hash":"","model_version":0,"round":0,'
        b'"selected":false,"state":"waiting","submitted":false}'
    )
    with pytest.raises(MalformedError) as info:
        TaskInfo.from_bytes(body)
    assert info.value.code == "bad_task"
