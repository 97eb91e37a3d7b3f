"""The operator's view of a real server process: ``qflare status/devices/events/rounds``, its log lines,
its TensorBoard event files, and its ``/metrics`` (process series, latency histogram by route template)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from http_fixtures import Federation
from typer.testing import CliRunner

from qflare.cli import app
from qflare.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A server whose 2-round federation of 3 devices has finished (evaluated), with --tensorboard."""
    root = tmp_path_factory.mktemp("operator")
    fed = Federation(root, devices=3, rounds=2, per_round=3)
    try:
        fed.start_server(args=["--tensorboard", str(root / "tb")])
        fed.wait_ready()
        for i, token in enumerate(fed.tokens_via_api(3)):
            fed.start_device(i, token)
        fed.wait_exit([f"device-{i}" for i in range(3)], 150.0)
        fed.wait_status(lambda s: [h["round"] for h in s["history"]] == [1, 2], 60.0)
        yield fed
    finally:
        fed.close()


def cli(fed: Federation, *args: str, token: str | None = None) -> tuple[int, str]:
    env = {"QFLARE_SERVER": fed.url, "QFLARE_ADMIN_TOKEN": token if token is not None else fed.admin}
    result = runner.invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_status_devices_rounds_as_json_and_tables(finished: Federation) -> None:
    fed = finished
    code, out = cli(fed, "status", "--json")
    status = json.loads(out)
    assert code == 0 and status["state"] == "finished" and status["devices"] == 3
    code, out = cli(fed, "status")
    assert code == 0 and "state finished · 2 round(s) planned · model v2" in out and "evaluated rounds" in out

    code, out = cli(fed, "devices", "--json")
    devices = json.loads(out)
    ids = {d["device_id"] for d in devices["devices"]}
    assert code == 0 and len(ids) == 3 and devices["total"] == 3
    assert {d["status"] for d in devices["devices"]} == {"active"}
    code, out = cli(fed, "devices", "--limit", "1", "--json")
    assert code == 0 and len(json.loads(out)["devices"]) == 1 and json.loads(out)["total"] == 3
    code, out = cli(fed, "devices")
    assert code == 0 and sorted(ids)[0][:8] in out

    code, out = cli(fed, "rounds", "--json")
    rounds = json.loads(out)["rounds"]
    assert code == 0 and [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["state"] == "closed" and r["updates"] == 3 and r["selected"] == 3
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] >= 0
    by_round = {h["round"]: h["accuracy"] for h in status["history"]}
    assert {r["round"]: r["accuracy"] for r in rounds} == by_round
    code, out = cli(fed, "rounds")
    assert code == 0 and "closed" in out


def test_events_filter_by_kind_device_and_time(finished: Federation) -> None:
    fed = finished
    # a wrong token: one line, exit 2, and a security event the administrator can then find
    code, out = cli(fed, "devices", token="not-the-token")
    assert code == 2 and "admin_required" in out and len(out.strip().splitlines()) == 1
    code, out = cli(fed, "events", "--kind", "admin_required", "--json")
    events = json.loads(out)["events"]
    assert code == 0 and events and {e["reason"] for e in events} == {"admin_required"}
    assert events[0]["remote_addr"] == "127.0.0.1"
    code, out = cli(fed, "events", "--kind", "admin_required", "--since", "1h", "--json")
    assert code == 0 and len(json.loads(out)["events"]) == len(events)
    code, out = cli(fed, "events", "--since", "2999-01-01T00:00:00", "--json")
    assert code == 0 and json.loads(out)["events"] == []
    code, out = cli(fed, "events", "--device", "no-such-device", "--json")
    assert code == 0 and json.loads(out)["events"] == []
    code, out = cli(fed, "events", "--kind", "admin_required")
    assert code == 0 and "admin_required" in out and "security events" in out


def test_operator_errors_are_one_line(finished: Federation) -> None:
    fed = finished
    code, out = cli(fed, "events", "--since", "yesterday-ish")
    assert code == 2 and "[bad_duration] cannot parse duration" in out
    code, out = cli(fed, "events", "--kind", "x" * 65)
    assert code == 2 and "validation_error" in out
    code, out = cli(fed, "devices", "--status", "sleeping")
    assert code == 2 and "validation_error" in out
    code, out = cli(fed, "rounds", token="")
    assert code == 2 and "needs the admin token" in out
    result = runner.invoke(app, ["status", "--server", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2 and "server_unavailable" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["status", "--server", "ftp://example.org"])
    assert result.exit_code == 2 and "must be an http" in result.output
    # a page larger than the limit is refused by the server
    reply = httpx.get(f"{fed.url}/v1/admin/events?limit=5000", headers={"Authorization": f"Bearer {fed.admin}"})
    assert reply.status_code == 422 and reply.json()["code"] == "validation_error"


def test_quarantine_and_reinstate_from_the_command_line(finished: Federation) -> None:
    fed = finished
    code, out = cli(fed, "devices", "--json")
    device = json.loads(out)["devices"][0]["device_id"]
    code, out = cli(fed, "quarantine", device, "--reason", "drill", "--json")
    assert code == 0 and json.loads(out)["status"] == "quarantined"
    code, out = cli(fed, "devices", "--status", "quarantined", "--json")
    assert code == 0 and [d["device_id"] for d in json.loads(out)["devices"]] == [device]
    code, out = cli(fed, "events", "--kind", "quarantined", "--json")
    assert code == 0 and json.loads(out)["events"][0]["device_id"] == device
    code, out = cli(fed, "reinstate", device)
    assert code == 0 and f"device {device}: active" in out
    code, out = cli(fed, "reinstate", "not-a-device")
    assert code == 2 and "64 lowercase hex" in out and len(out.strip().splitlines()) == 1
    code, out = cli(fed, "reinstate", device, token="wrong-token-wrong-token")
    assert code == 2 and "admin_required" in out
    code, out = cli(fed, "devices", "--status", "active", "--json")
    assert device in {d["device_id"] for d in json.loads(out)["devices"]}


def test_server_log_is_one_format_and_names_peers(finished: Federation) -> None:
    fed = finished
    with socket.create_connection(("127.0.0.1", fed.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.recv(1024)
        peer_port = sock.getsockname()[1]
    log = fed.servers["server"].log_path

    def lines() -> list[str]:
        return log.read_text(errors="replace").splitlines()

    deadline = time.monotonic() + 10
    while not any("Invalid HTTP request" in line for line in lines()) and time.monotonic() < deadline:
        time.sleep(0.1)
    text = "\n".join(lines())
    assert f"WARNING uvicorn.error: 127.0.0.1:{peer_port} - Invalid HTTP request received." in text
    assert "alembic.runtime.migration" not in text and "Context impl" not in text
    assert "Traceback" not in text and "Exception in callback" not in text
    assert "INFO qflare.server: federation finished: 2 round(s) done, final model v2" in text
    # uvicorn's own lines (start-up, access log) in the same "time LEVEL logger: message" format
    assert any(" INFO uvicorn.error: Uvicorn running on" in line for line in lines())
    assert any(" INFO uvicorn.access: 127.0.0.1:" in line for line in lines())


def test_server_tensorboard_scalars(finished: Federation) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(finished.root / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"round/participants", "round/refused", "round/round_seconds", "round/accuracy", "round/loss"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("round/participants")] == [(1, 3.0), (2, 3.0)]
    history = {h["round"]: h for h in finished.status()["history"]}
    for e in acc.Scalars("round/accuracy"):
        assert e.value == pytest.approx(history[e.step]["accuracy"], abs=1e-6)
    assert all(e.value >= 0 for e in acc.Scalars("round/refused"))


def test_metrics_have_process_series_and_latency_by_template(finished: Federation) -> None:
    fed = finished
    httpx.get(f"{fed.url}/v1/admin/devices/abc123/whatever")
    text = httpx.get(f"{fed.url}/metrics").text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert 'qflare_http_request_duration_seconds_count{method="POST",route="/v1/update"} 6.0' in text
    assert "abc123" not in text  # raw paths never become label values
    assert 'route="unmatched"' in text
    assert "qflare_eval_accuracy" in text  # evaluated by now
