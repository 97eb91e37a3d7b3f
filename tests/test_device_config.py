"""A device's configuration mistakes fail fast and leave nothing behind; outages are waited out briefly.

* a mistyped ``--server-key-id`` pins nothing (the rerun with the right id works in the same state dir);
* a device given another model than the coordinator's refuses before it enrolls (token not spent);
* a URL without a scheme, and ``https://`` against a plain-HTTP server, stop at once with the cause;
* an outage is logged with URL and cause once per change, and ``--give-up-after`` is honoured promptly.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from http_fixtures import Federation

from qflare.cli.client import _fetch_identity
from qflare.crypto import DEFAULT_SUITE, SigningKey
from qflare.device import DeviceState, ModelAnnouncement, check_model, parse_announcement
from qflare.errors import ConfigError, MalformedError, PatienceExhaustedError, TransportError
from qflare.processes import child_environment
from qflare.transport import HttpTransport
from qflare.transport.http import CircuitBreaker, RetryPolicy, check_base_url
from qflare.wire import ParamLayout

SERVER = SigningKey.generate()
DOC = {"alg": SERVER.public.alg, "public_key": SERVER.public.raw.hex(), "suite": DEFAULT_SUITE.name}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def transport(handler: httpx.MockTransport, clock: FakeClock, **kw: object) -> HttpTransport:
    return HttpTransport(
        "http://c.test",
        client=httpx.Client(base_url="http://c.test", transport=handler),
        sleep=clock.sleep,
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------- URLs, TLS
@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8080",
        "localhost:8080",
        "fl.example.org",
        "ftp://fl.example.org",
        "http://",
        "http://:80",
        "https://h:0",
        "https://h:99999",
        "http://h/?q=1",
    ],
)
def test_a_url_that_cannot_work_is_refused_at_once(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        HttpTransport(url)
    assert info.value.code == "bad_server_url" and "http:// or https://" in str(info.value)


def test_good_urls_pass() -> None:
    assert check_base_url("https://fl.example.org:8443/") == "https://fl.example.org:8443"
    assert check_base_url("http://[::1]:8080/qflare") == "http://[::1]:8080/qflare"


def test_a_tls_protocol_error_is_not_retried() -> None:
    calls = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        err = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
        err.reason = "WRONG_VERSION_NUMBER"
        raise httpx.ConnectError("TLS failed", request=request) from err

    t = transport(httpx.MockTransport(handler), FakeClock())
    with pytest.raises(TransportError) as info:
        t.get_json("/v1/identity")
    assert info.value.code == "tls_error" and calls == [1]
    assert "http://c.test/v1/identity" in str(info.value) and "WRONG_VERSION_NUMBER" in str(info.value)


def test_a_cut_tls_connection_is_still_an_outage() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("eof", request=request) from ssl.SSLEOFError(8, "EOF occurred")

    t = transport(httpx.MockTransport(handler), FakeClock(), retry=RetryPolicy(attempts=2))
    with pytest.raises(TransportError) as info:
        t.get_json("/v1/identity")
    assert info.value.code == "server_unavailable"


def test_a_url_where_no_coordinator_answers_is_a_configuration_error(tmp_path: Path) -> None:
    t = transport(httpx.MockTransport(lambda r: httpx.Response(404, text="<html>nginx</html>")), FakeClock())
    with pytest.raises(ConfigError) as info:
        _fetch_identity(t, DeviceState(tmp_path), SERVER.public.key_id, 300.0, sleep=FakeClock().sleep)
    assert info.value.code == "bad_server_url" and "HTTP 404" in str(info.value)


# ------------------------------------------------------------------------------------- patience, logs
def test_give_up_after_is_honoured_and_the_cause_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    calls = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    t = transport(
        httpx.MockTransport(handler),
        clock,
        retry=RetryPolicy(max_elapsed_s=0.75),
        breaker=CircuitBreaker(failure_threshold=8, reset_after_s=5.0, clock=clock),
    )
    with caplog.at_level(logging.WARNING, "qflare.client"), pytest.raises(PatienceExhaustedError) as info:
        _fetch_identity(t, DeviceState(tmp_path), SERVER.public.key_id, 3.0, sleep=clock.sleep, clock=clock)
    assert 3.0 < clock.now <= 4.5, clock.now  # the patience, overrun by less than one retry interval
    assert "Connection refused" in str(info.value) and "http://c.test/v1/identity" in str(info.value)
    warnings = [r.getMessage() for r in caplog.records if r.name == "qflare.client"]
    assert len(warnings) == 1, warnings  # the cause did not change: said once (the circuit opening is no news)
    assert "http://c.test/v1/identity" in warnings[0] and "Connection refused" in warnings[0]
    assert calls[0] >= 3


def test_a_long_outage_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Past the circuit breaker's threshold the failures are fast-failed circuit_open: still no news."""
    clock = FakeClock()

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    t = transport(
        httpx.MockTransport(handler),
        clock,
        retry=RetryPolicy(max_elapsed_s=5.0),
        breaker=CircuitBreaker(failure_threshold=8, reset_after_s=5.0, clock=clock),
    )
    with caplog.at_level(logging.WARNING, "qflare.client"), pytest.raises(PatienceExhaustedError):
        _fetch_identity(t, DeviceState(tmp_path), SERVER.public.key_id, 120.0, sleep=clock.sleep, clock=clock)
    assert 120.0 < clock.now <= 126.0, clock.now
    warnings = [r.getMessage() for r in caplog.records if r.name == "qflare.client"]
    assert len(warnings) == 1 and "Connection refused" in warnings[0], warnings


def test_a_changed_cause_is_logged_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    answers = iter([503, 503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers, None)
        if status is None or status == 200:
            return httpx.Response(200, json=DOC)
        return httpx.Response(status, json={"code": "database_unavailable", "message": "db down"})

    calls = [0]

    def refusing_then(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] == 1:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return handler(request)

    t = transport(httpx.MockTransport(refusing_then), clock, retry=RetryPolicy(attempts=1))
    with caplog.at_level(logging.WARNING, "qflare.client"):
        key, _, _ = _fetch_identity(
            t, DeviceState(tmp_path), SERVER.public.key_id, 300.0, sleep=clock.sleep, clock=clock
        )
    assert key == SERVER.public
    warnings = [r.getMessage() for r in caplog.records if r.name == "qflare.client"]
    assert len(warnings) == 2 and "Connection refused" in warnings[0] and "503" in warnings[1], warnings


# ------------------------------------------------------------------------------------- announcement
def test_announcement_is_bounded_and_checked() -> None:
    layout = ParamLayout.from_module(__import__("torch").nn.Linear(2, 2))
    doc = DOC | {
        "model": "MLP",
        "arch": layout.fingerprint,
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "mean": [0.5],
        "std": [0.25],
    }
    ann = parse_announcement(doc)
    assert ann == ModelAnnouncement("mlp", layout.fingerprint, (1, 8, 8), 10, (0.5,), (0.25,))
    check_model(ann, "mlp", layout)
    with pytest.raises(ConfigError, match="server runs model 'mlp', this device was given 'fedavg-cnn'") as info:
        check_model(ann, "fedavg-cnn")
    assert info.value.code == "model_mismatch"
    other = ParamLayout.from_module(__import__("torch").nn.Linear(3, 2))
    with pytest.raises(ConfigError) as info:
        check_model(ann, "mlp", other)
    assert info.value.code == "arch_mismatch" and "architecture" in str(info.value)
    assert parse_announcement(DOC) is None  # an older coordinator: nothing to check
    for bad in (
        {"arch": "zz"},
        {"input_shape": [1, 8]},
        {"num_classes": 0},
        {"num_classes": True},
        {"std": [0.0]},
        {"mean": [float("nan")]},
        {"input_shape": [1, 8, 10**9]},
        {"model": "a b"},
    ):
        with pytest.raises(MalformedError):
            parse_announcement(doc | bad)


# ------------------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    federation = Federation(tmp_path_factory.mktemp("fed"), devices=1, per_round=1, rounds=3)
    federation.start_server()
    federation.wait_ready()
    yield federation
    federation.close()


def run_client(
    fed: Federation, *args: str, token: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "250", **({"QFLARE_ENROLL_TOKEN": token} if token else {})}
    return subprocess.run(
        [sys.executable, "-m", "qflare", "client", "--poll-interval", "0.2", *args],
        env=child_environment({**fed.env, **env}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(out: subprocess.CompletedProcess[str], code: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and f"[{code}]" in out.stderr, out.stderr
    return out.stderr


@pytest.mark.slow
def test_mistakes_leave_nothing_and_the_corrected_run_trains(fed: Federation, tmp_path: Path) -> None:
    state = tmp_path / "device"
    (token,) = fed.tokens_via_api(1)
    key_id = fed._server().key_id()
    wrong_id = ("0" if key_id[0] != "0" else "1") + key_id[1:]
    common = ["--server", fed.url, "--state-dir", str(state), "--give-up-after", "30"]

    # a mistyped key id: refused, and nothing pinned
    out = run_client(fed, *common, "--server-key-id", wrong_id, "--model", "mlp", "--dataset", "digits", token=token)
    one_line_error(out, "server_key_mismatch")
    assert not (state / "server.keyid").exists() and not list(state.iterdir())

    # another model: refused before enrollment, nothing stored, the token not spent
    out = run_client(
        fed, *common, "--server-key-id", key_id, "--model", "fedavg-cnn", "--dataset", "digits", token=token
    )
    assert "server runs model 'mlp', this device was given 'fedavg-cnn'" in one_line_error(out, "model_mismatch")
    assert not list(state.iterdir())

    # the same model name built for another input shape (Fashion-MNIST's 28x28, the server's digits are 8x8)
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        out = run_client(
            fed, *common, "--server-key-id", key_id, "--model", "mlp", "--dataset", "fashion-mnist", token=token
        )
        one_line_error(out, "arch_mismatch")
        assert not list(state.iterdir())

    # bad own data: one clear line
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    out = run_client(fed, *common, "--server-key-id", key_id, "--model", "mlp", "--data", str(bad), token=token)
    assert "[N, 1, 8, 8] or [N, 8, 8]" in one_line_error(out, "bad_local_data")
    assert not list(state.iterdir())

    # corrected: the right id, the right model, its own data - same state dir, same token
    from sklearn.datasets import load_digits

    digits = load_digits()
    own = tmp_path / "own.npz"
    x = np.rint(digits.images[:120] * 255 / 16).astype(np.uint8)
    np.savez(own, x=x, y=digits.target[:120].astype(np.int64))
    out = run_client(
        fed,
        *common,
        "--server-key-id",
        key_id,
        "--model",
        "mlp",
        "--data",
        str(own),
        "--max-rounds",
        "1",
        "--json",
        token=token,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (state / "server.keyid").read_text().strip() == key_id
    assert json.loads(out.stdout)["rounds_trained"] == [1], out.stdout
    assert "own data" in out.stderr and "(120 examples" in out.stderr, out.stderr


@pytest.mark.slow
def test_https_against_plain_http_stops_at_once(fed: Federation, tmp_path: Path) -> None:
    url = fed.url.replace("http://", "https://")
    out = run_client(
        fed,
        "--server",
        url,
        "--server-key-id",
        fed._server().key_id(),
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--state-dir",
        str(tmp_path / "d"),
        token="t" * 32,
        timeout=90,
    )
    err = one_line_error(out, "tls_error")
    assert url in err and "plain HTTP" in err and "not reachable yet" not in err
    assert not (tmp_path / "d" / "key.pem").exists()


def test_a_url_without_scheme_stops_at_once(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qflare",
            "client",
            "--server",
            "127.0.0.1:8080",
            "--server-key-id",
            "ab" * 32,
            "--state-dir",
            str(tmp_path / "d"),
        ],
        env=child_environment({"COLUMNS": "250"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    err = one_line_error(out, "bad_server_url")
    assert "127.0.0.1:8080" in err and "no scheme" in err


def test_a_running_device_waits_out_a_tls_failure() -> None:
    """Once the URL has worked, a TLS failure is unauthenticated (anything on the path can cause one)."""
    from qflare.errors import Retry

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("bad cert", request=request) from ssl.SSLCertVerificationError(
            1, "certificate verify failed"
        )

    with pytest.raises(TransportError) as info:
        transport(httpx.MockTransport(handler), FakeClock()).get_json("/v1/task")
    assert info.value.code == "tls_error" and info.value.retry is Retry.FATAL and info.value.unauthenticated
