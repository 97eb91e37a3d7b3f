"""``/metrics`` of a live app through a federation round: every series is ``qflare_``-prefixed, documented in
docs/operations.md's Metrics table (and every documented one is served), and the figures move with what
happened (a forged update counts under its refusal reason, handshakes, crypto steps, bytes, quarantine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import admin, make_runtime, new_device, train_and_submit, wait_for

from qflare.server import create_app
from qflare.server.metrics import CRYPTO_OPS, ROUND_PHASES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def exposed_names(client: TestClient) -> set[str]:
    """The series names as operators query them: counters with ``_total``, the rest by family name."""
    text = client.get("/metrics").text
    return {f.name + "_total" if f.type == "counter" else f.name for f in text_string_to_metric_families(text)}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def documented_metrics() -> set[str]:
    """Every ``qflare_*`` name in the first column of docs/operations.md's Metrics table."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.findall(r"`(qflare_[a-z_]+)", first))
    return names


def test_metrics_through_a_round(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, rounds=1, round_loop=True, step_interval_s=0.05)
    seen: set[str] = set()
    with TestClient(create_app(runtime)) as client:
        before = scrape(client)
        seen |= exposed_names(client)
        assert value(before, "qflare_round_phase", phase="waiting") == 1.0
        assert sum(value(before, "qflare_round_phase", phase=p) for p in ROUND_PHASES) == 1.0
        assert value(before, "qflare_upload_slots") == runtime.config.http.max_concurrent_uploads
        tokens = client.post("/v1/admin/tokens", json={"count": 3, "ttl_s": 600}, headers=admin(runtime)).json()
        devices = [new_device(client) for _ in range(3)]
        for dev, token in zip(devices, tokens["tokens"], strict=True):
            dev.enroll(token)
            dev.connect()
        wait_for(lambda: client.get("/v1/status").json()["state"] == "open")
        during = scrape(client)
        seen |= exposed_names(client)
        assert value(during, "qflare_round_phase", phase="open") == 1.0
        assert value(during, "qflare_round_phase", phase="waiting") == 0.0
        assert value(during, "qflare_handshakes_total", step="hello", outcome="ok") == 3.0
        assert value(during, "qflare_handshakes_total", step="finish", outcome="ok") == 3.0
        opened = value(during, "qflare_round_opened_timestamp_seconds")
        deadline = value(during, "qflare_round_deadline_timestamp_seconds")
        assert 0 < opened < deadline and deadline - opened == pytest.approx(runtime.config.federation.round_timeout_s)

        # a forged update under a live session: refused, and counted under its reason
        session = devices[0]._session_id
        assert session is not None
        forged = client.post(
            "/v1/update",
            content=b"\x00" * 512,
            headers={"Content-Type": "application/octet-stream", "X-Qflare-Session": session},
        )
        assert forged.status_code in (400, 401, 403, 422)
        reason = forged.json()["code"]
        assert re.fullmatch(r"[0-9a-f]{16}", forged.headers["x-request-id"])
        after_forged = scrape(client)
        assert value(after_forged, "qflare_updates_refused_total", reason=reason) == 1.0
        assert value(after_forged, "qflare_refusals_total", reason=reason) >= 1.0
        assert value(after_forged, "qflare_updates_accepted_total") == 0.0

        sizes_before = value(after_forged, "qflare_http_received_bytes_total", route="/v1/update")
        assert sizes_before == 512.0
        for i, dev in enumerate(devices):
            assert train_and_submit(dev, i, 3) == 1
        wait_for(lambda: client.get("/v1/status").json()["state"] == "finished")
        assert runtime.evaluator is not None and runtime.evaluator.wait_idle(60)
        after = scrape(client)
        assert value(after, "qflare_updates_accepted_total") == 3.0
        assert value(after, "qflare_updates_refused_total", reason=reason) == 1.0  # the honest ones are not
        assert value(after, "qflare_round_phase", phase="finished") == 1.0
        assert value(after, "qflare_rounds_published_total") == 1.0
        assert value(after, "qflare_round_duration_seconds_count") == 1.0
        # update bodies in, model and receipts out: the byte counters move by at least the bodies' sizes
        assert value(after, "qflare_http_received_bytes_total", route="/v1/update") >= sizes_before + 3 * 1000
        model_bytes = runtime.coordinator.rounds.model.blob
        assert value(after, "qflare_http_sent_bytes_total", route="/v1/model") >= 3 * len(model_bytes) * 0.9
        # every crypto step ran: enrollment 3x, handshake 3x, updates 3 honest + 1 forged opened, 3 acks
        assert value(after, "qflare_crypto_seconds_count", op="enroll_verify") == 3.0
        assert value(after, "qflare_crypto_seconds_count", op="enroll_sign") == 3.0
        assert value(after, "qflare_crypto_seconds_count", op="handshake_respond") == 3.0
        assert value(after, "qflare_crypto_seconds_count", op="handshake_finish") == 3.0
        assert value(after, "qflare_crypto_seconds_count", op="update_open") == 4.0
        assert value(after, "qflare_crypto_seconds_count", op="update_ack") == 3.0
        assert {dict(k[1]).get("op") for k in after if k[0] == "qflare_crypto_seconds_count"} == set(CRYPTO_OPS)
        assert value(after, "qflare_crypto_seconds_sum", op="update_open") > 0
        assert value(after, "qflare_process_resident_memory_bytes") > 10e6
        assert value(after, "qflare_process_cpu_seconds_total") > 0
        assert value(after, "qflare_devices_active") == 3.0 and value(after, "qflare_devices_quarantined") == 0.0

        device_id = devices[1].identity.public.key_id
        resp = client.post(f"/v1/admin/devices/{device_id}/quarantine", json={"reason": "test"}, headers=admin(runtime))
        assert resp.status_code == 200, resp.text
        last = scrape(client)
        seen |= exposed_names(client)
        assert value(last, "qflare_devices_quarantined") == 1.0 and value(last, "qflare_devices_active") == 2.0

    unprefixed = sorted(n for n in seen if not n.startswith("qflare_"))
    assert not unprefixed, f"series without the qflare_ prefix: {unprefixed}"
    documented = documented_metrics()
    assert not seen - documented, f"served but not documented in docs/operations.md: {sorted(seen - documented)}"
    assert not documented - seen, f"documented but never served: {sorted(documented - seen)}"
