"""Structured logs: ``qflare server`` with ``QFLARE_LOG_FORMAT=json`` writes uvicorn's and QFLARE's records as
one JSON object a line, with the request id it answers in ``X-Request-Id``; in process, records about a
round carry its number and records made while serving a request carry that request's id."""

from __future__ import annotations

import contextvars
import json
import logging
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import admin, make_runtime, new_device, train_and_submit, wait_for

from qflare.errors import ConfigError
from qflare.federation import FederationSpec
from qflare.server import create_app
from qflare.server.logs import JsonFormatter, bind_request, bind_round, configure_logging
from qflare.server.process import ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
_TEXT_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


class _Capture(logging.Handler):
    """Formats each record when it is emitted (as a stream handler does: the context is the caller's)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_json_formatter_fields() -> None:
    contextvars.Context().run(_formatter_fields)  # a fresh context: nothing bound by another test


def _formatter_fields() -> None:
    fmt = JsonFormatter()
    record = logging.LogRecord("qflare.server", logging.INFO, __file__, 1, "round %d open", (4,), None)
    assert set(json.loads(fmt.format(record))) == {"time", "level", "logger", "message"}
    request_id, unbind = bind_request(7)
    try:
        out = json.loads(fmt.format(record))
        assert out["message"] == "round 4 open" and out["request_id"] == request_id and out["round"] == 7
        reset = bind_round(8)
        assert json.loads(fmt.format(record))["round"] == 8
        reset()
        assert json.loads(fmt.format(record))["round"] == 7
    finally:
        unbind()
    assert "request_id" not in json.loads(fmt.format(record))
    access = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/x", "1.1", 404),
        None,
    )
    out = json.loads(fmt.format(access))
    assert (out["client"], out["method"], out["path"], out["status"]) == ("1.2.3.4:5", "GET", "/x", 404)
    with pytest.raises(ConfigError, match="log format"):
        configure_logging("info", "xml")


def test_round_and_request_ids_in_process(tmp_path: Path) -> None:
    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        runtime = make_runtime(tmp_path, rounds=1, round_loop=True, step_interval_s=0.05)
        with TestClient(create_app(runtime)) as client:
            tokens = client.post("/v1/admin/tokens", json={"count": 3}, headers=admin(runtime)).json()["tokens"]
            devices = [new_device(client) for _ in range(3)]
            for dev, token in zip(devices, tokens, strict=True):
                dev.enroll(token)
                dev.connect()
            wait_for(lambda: client.get("/v1/status").json()["state"] == "open")
            for i, dev in enumerate(devices):
                train_and_submit(dev, i, 3)
            wait_for(lambda: client.get("/v1/status").json()["state"] == "finished")
            assert runtime.evaluator is not None and runtime.evaluator.wait_idle(60)
            # a request id answered to the client is the one its records carry
            bad = client.get("/v1/admin/devices", headers={"Authorization": "Bearer wrong-token-wrong-token"})
            assert bad.status_code == 403
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    about = {line["message"].split(":")[0]: line for line in capture.lines if line["logger"].startswith("qflare")}
    assert about["round 1 open"]["round"] == 1
    assert about["round 1 closed"]["round"] == 1
    assert about["round 1"]["round"] == 1  # the evaluation's record, made in the evaluator thread
    assert re.fullmatch(r"[0-9a-f]{16}", bad.headers["x-request-id"])
    with_ids = [line for line in capture.lines if "request_id" in line]
    assert all(re.fullmatch(r"[0-9a-f]{16}", line["request_id"]) for line in with_ids)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_server_process_json_logs_and_contract(tmp_path: Path) -> None:
    """``qflare server --port P --data-dir DIR`` serves /healthz and qflare_-prefixed /metrics; with
    QFLARE_LOG_FORMAT=json every log record on stderr, uvicorn's included, is one JSON object."""
    spec = FederationSpec(dataset="digits", model="mlp", devices=2, rounds=1, per_round=2)
    with ServerProcess(spec, data_dir=tmp_path / "srv", args=["--no-eval"], env={"QFLARE_LOG_FORMAT": "json"}) as srv:
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/healthz").json() == {"status": "ok"}
        metrics = httpx.get(f"{srv.url}/metrics")
        assert metrics.status_code == 200
        names = [f.name for f in text_string_to_metric_families(metrics.text)]
        assert names and all(n.startswith("qflare_") for n in names), names
        missing = httpx.get(f"{srv.url}/no-such-page")
        assert missing.status_code == 404
        request_id = missing.headers["x-request-id"]
        srv.stop()
        log = srv.log_path.read_text(encoding="utf-8")
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [line for line in log.splitlines() if _TEXT_RECORD.match(line)], "a record in the text format"
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers  # qflare's records: the in-process test above
    access = [r for r in records if r["logger"] == "uvicorn.access" and r.get("path") == "/no-such-page"]
    assert len(access) == 1 and access[0]["status"] == 404 and access[0]["request_id"] == request_id
