"""HTTP API v1 end to end in process: real Devices over HTTP to the FastAPI app, 2 rounds, status, metrics."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from server_fixtures import admin, counts, make_runtime, new_device, train_and_submit, wait_for

from qflare.server import create_app
from qflare.storage import Database

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_three_devices_two_rounds_over_http(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, round_loop=True, step_interval_s=0.05)
    with TestClient(create_app(runtime)) as client:
        minted = client.post(
            "/v1/admin/tokens", json={"count": 3, "ttl_s": 600, "label": "e2e"}, headers=admin(runtime)
        )
        assert minted.status_code == 200
        tokens = minted.json()["tokens"]
        assert len(tokens) == 3 and len(set(tokens)) == 3
        devices = [new_device(client) for _ in range(3)]
        for dev, token in zip(devices, tokens):
            dev.enroll(token)
            dev.connect()
        initial = runtime.coordinator.rounds.model.flat.clone()
        for expected_round in (1, 2):
            # the background loop opens the round once the 3 devices are enrolled / the last round closed
            wait_for(
                lambda: (
                    client.get("/v1/status").json()["state"] == "open"
                    and client.get("/v1/status").json()["round"] == expected_round
                )
            )
            for i, dev in enumerate(devices):
                assert train_and_submit(dev, i, 3) == expected_round
        assert runtime.evaluator is not None and runtime.evaluator.wait_idle(60)
        status = client.get("/v1/status").json()
        assert status["state"] == "finished" and status["model_version"] == 2 and status["devices"] == 3
        assert [h["round"] for h in status["history"]] == [1, 2]
        for h in status["history"]:
            assert 0.0 <= h["accuracy"] <= 1.0 and h["loss"] > 0 and h["updates"] == 3 and h["closed_at"]
            assert h["examples"] == sum(u.num_examples for u in runtime.store.updates_for_round(h["round"]))
        # two rounds of training on digits must beat chance (10 classes) by a wide margin
        assert status["history"][-1]["accuracy"] > 0.5
        assert not torch.equal(runtime.coordinator.rounds.model.flat, initial)
        assert status["history"][-1]["model_sha256"] == runtime.coordinator.rounds.model.sha256
        # devices see that the federation is over
        assert devices[0].task().state == "finished"
        metrics = client.get("/metrics").text
        assert "qflare_updates_accepted_total 6.0" in metrics
        assert "qflare_devices_active 3.0" in metrics
        assert 'qflare_http_requests_total{method="POST",route="/v1/update",status="200"} 6.0' in metrics
        assert "qflare_round_duration_seconds_count 2.0" in metrics
        assert "qflare_eval_round 2.0" in metrics
        assert "qflare_upload_bytes_count 6.0" in metrics


def test_identity_matches_pinned_files(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        info = client.get("/v1/identity").json()
    assert info["alg"] == "ML-DSA-65" and info["suite"].startswith("v1:ML-DSA-65+ML-KEM-768")
    raw = bytes.fromhex(info["public_key"])
    assert info["key_id"] == hashlib.sha256(raw).hexdigest()
    assert (tmp_path / "coordinator.keyid").read_text().strip() == info["key_id"]
    assert (tmp_path / "coordinator.pub").read_text().strip() == info["public_key"]


def test_health_readiness_and_error_format(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        missing = client.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        wrong_method = client.get("/v1/enroll")
        assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"
        garbage = client.post(
            "/v1/enroll", content=b"not an envelope", headers={"Content-Type": "application/octet-stream"}
        )
        assert garbage.status_code == 400 and garbage.json()["code"] == "malformed"
        assert 'qflare_refusals_total{reason="malformed"} 1.0' in client.get("/metrics").text
        # the database goes away: not ready (503), still alive
        good = runtime.db
        bad = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
        runtime.db = runtime.store.db = bad
        try:
            down = client.get("/readyz")
            assert down.status_code == 503
            assert down.json()["database"] is False and down.json()["ready"] is False
            assert client.get("/healthz").status_code == 200
            status = client.get("/v1/status")  # a database outage is a 503 the client retries, not a 500
            assert status.status_code == 503 and status.json()["code"] == "database_unavailable"
            assert "Retry-After" in status.headers
            scrape = client.get("/metrics")
            assert scrape.status_code == 200 and "qflare_database_up 0.0" in scrape.text
        finally:
            bad.dispose()
            runtime.db = runtime.store.db = good
        assert client.get("/readyz").status_code == 200


def test_status_before_any_round(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        status = client.get("/v1/status").json()
    assert status["state"] == "waiting" and status["round"] is None
    assert status["history"] == [] and status["devices"] == 0 and status["model_version"] == 0
    assert counts(runtime).models == 1


def test_admin_device_listing_and_revocation(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        dev = new_device(client)
        dev.enroll(runtime.coordinator.create_tokens(1)[0])
        listed = client.get("/v1/admin/devices", headers=admin(runtime)).json()["devices"]
        assert [d["device_id"] for d in listed] == [dev.device_id] and listed[0]["status"] == "active"
        revoked = client.post(
            f"/v1/admin/devices/{dev.device_id}/revoke", json={"reason": "lost"}, headers=admin(runtime)
        )
        assert revoked.status_code == 200
        assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_reason"] == "lost"
        unknown = client.post("/v1/admin/devices/" + "0" * 64 + "/revoke", json={"reason": "x"}, headers=admin(runtime))
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_device"
        bad = client.post("/v1/admin/tokens", json={"count": 0}, headers=admin(runtime))
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
        events = client.get("/v1/admin/events?limit=5", headers=admin(runtime))
        assert events.status_code == 200 and len(events.json()["events"]) <= 5
        too_many = client.get("/v1/admin/events?limit=100000", headers=admin(runtime))
        assert too_many.status_code == 422 and too_many.json()["code"] == "validation_error"


def test_admin_quarantine_and_reinstatement(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        dev = new_device(client)
        dev.enroll(runtime.coordinator.create_tokens(1)[0])
        url = f"/v1/admin/devices/{dev.device_id}"
        assert client.post(url + "/quarantine", json={"reason": "probe"}).status_code == 401  # no token: refused
        done = client.post(url + "/quarantine", json={"reason": "probe"}, headers=admin(runtime))
        assert done.status_code == 200
        assert done.json()["status"] == "quarantined" and done.json()["quarantine_reason"] == "operator: probe"
        listed = client.get("/v1/admin/devices?status=quarantined", headers=admin(runtime)).json()
        assert [d["device_id"] for d in listed["devices"]] == [dev.device_id]
        dev.connect()  # a quarantined device still holds a session: it is only never selected
        assert runtime.store.security_events(limit=5, reason="quarantined")[0].device_id == dev.device_id
        back = client.post(url + "/reinstate", headers=admin(runtime))
        assert (
            back.status_code == 200 and back.json()["status"] == "active" and back.json()["quarantine_reason"] is None
        )
        client.post(url + "/revoke", json={"reason": "lost"}, headers=admin(runtime))
        again = client.post(url + "/reinstate", headers=admin(runtime))
        assert again.status_code == 403 and again.json()["code"] == "revoked"
        bad = client.post(url + "/quarantine", json={"reason": ""}, headers=admin(runtime))
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
        unknown = client.post("/v1/admin/devices/" + "0" * 64 + "/reinstate", headers=admin(runtime))
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_device"
