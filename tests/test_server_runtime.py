"""The server runtime across restarts: devices, tokens, rounds, models, key and admin token persist."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_fixtures import counts, make_runtime, new_device, train_and_submit

from qflare.errors import AdminAuthError, AuthError, ConfigError
from qflare.server import create_app
from qflare.server.credentials import load_or_create_admin_token, load_or_create_identity

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_restart_recovers_everything(tmp_path: Path) -> None:
    first = make_runtime(tmp_path, per_round=2, min_devices=2, rounds=3)
    with TestClient(create_app(first)) as client:
        devices = [new_device(client) for _ in range(2)]
        for dev, token in zip(devices, first.coordinator.create_tokens(2)):
            dev.enroll(token)
            dev.connect()
        spare = first.coordinator.create_tokens(1, ttl_s=3600, label="spare")[0]
        first.step()
        for i, dev in enumerate(devices):
            train_and_submit(dev, i, 2)
        assert first.evaluator is not None and first.evaluator.wait_idle(60)
        first.step()  # round 2 opens on model v1
        dev0_update_round2 = train_and_submit(devices[0], 0, 2)  # one of two updates in, then "crash"
        assert dev0_update_round2 == 2
        state = counts(first)
        key_id, admin_token = first.identity.key_id, first.admin.value
        model_sha = first.coordinator.rounds.model.sha256
        history = client.get("/v1/status").json()["history"]
    assert [h["round"] for h in history] == [1]

    second = make_runtime(tmp_path, per_round=2, min_devices=2, rounds=3)
    with TestClient(create_app(second)) as client:
        assert counts(second) == state  # devices, rounds (1 closed, 2 open), 3 updates, 2 model versions
        assert second.identity.key_id == key_id and not second.identity_created
        assert second.admin.value == admin_token and second.admin.source == "file"
        assert second.coordinator.rounds.model.sha256 == model_sha and second.coordinator.rounds.model.version == 1
        rnd = second.coordinator.rounds.current
        assert rnd is not None and rnd.number == 2 and set(rnd.accepted) == {devices[0].device_id}
        token = second.store.get_token(spare)
        assert token is not None and token.used_at is None and token.label == "spare"
        assert client.get("/v1/status").json()["history"] == history
        # sessions live in memory: the device handshakes again, then finishes round 2 on the new process
        for dev in devices:
            dev.transport.client = client  # type: ignore[attr-defined]
        assert train_and_submit(devices[1], 1, 2) == 2
        assert second.coordinator.rounds.model.version == 2
        assert second.evaluator is not None and second.evaluator.wait_idle(60)
        assert [h["round"] for h in client.get("/v1/status").json()["history"]] == [1, 2]
    mode = stat.S_IMODE((tmp_path / "coordinator.key").stat().st_mode)
    assert mode == 0o600 and stat.S_IMODE((tmp_path / "admin.token").stat().st_mode) == 0o600


def test_unevaluated_models_are_evaluated_on_the_next_start(tmp_path: Path) -> None:
    first = make_runtime(tmp_path, per_round=1, min_devices=1, evaluate=False)
    with TestClient(create_app(first)) as client:
        dev = new_device(client)
        dev.enroll(first.coordinator.create_tokens(1)[0])
        first.step()
        train_and_submit(dev, 0, 1)
        assert client.get("/v1/status").json()["history"] == []
    second = make_runtime(tmp_path, per_round=1, min_devices=1)
    with TestClient(create_app(second)) as client:
        assert second.evaluator is not None and second.evaluator.wait_idle(60)
        history = client.get("/v1/status").json()["history"]
    assert [h["round"] for h in history] == [1] and 0 <= history[0]["accuracy"] <= 1


def test_identity_key_with_passphrase(tmp_path: Path) -> None:
    key, created = load_or_create_identity(tmp_path, b"correct horse", "ML-DSA-65")
    assert created and b"ENCRYPTED" in (tmp_path / "coordinator.key").read_bytes()
    again, created_again = load_or_create_identity(tmp_path, b"correct horse", "ML-DSA-65")
    assert not created_again and again.key_id == key.key_id
    with pytest.raises(AuthError) as info:
        load_or_create_identity(tmp_path, b"wrong", "ML-DSA-65")
    assert info.value.code == "bad_passphrase"
    with pytest.raises(ConfigError) as wrong_alg:
        load_or_create_identity(tmp_path, b"correct horse", "ML-DSA-87")
    assert wrong_alg.value.code == "wrong_key_type"


def test_insecure_key_and_token_files_are_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, None, "ML-DSA-65")
    token = load_or_create_admin_token(tmp_path, environ={})
    assert token.created and (tmp_path / "admin.token").read_text().strip() == token.value
    assert load_or_create_admin_token(tmp_path, environ={}).value == token.value
    os.chmod(tmp_path / "coordinator.key", 0o644)
    with pytest.raises(ConfigError) as key_info:
        load_or_create_identity(tmp_path, None, "ML-DSA-65")
    assert key_info.value.code == "insecure_key_file"
    os.chmod(tmp_path / "admin.token", 0o640)
    with pytest.raises(ConfigError) as token_info:
        load_or_create_admin_token(tmp_path, environ={})
    assert token_info.value.code == "insecure_key_file"


def test_admin_token_from_environment_and_its_check(tmp_path: Path) -> None:
    token = load_or_create_admin_token(tmp_path, environ={"QFLARE_ADMIN_TOKEN": "s3cret-admin-token-value"})
    assert token.source == "env" and not (tmp_path / "admin.token").exists()
    token.check("Bearer s3cret-admin-token-value")
    token.check("bearer   s3cret-admin-token-value ")
    for header, status in (
        (None, 401),
        ("", 401),
        ("Basic s3cret-admin-token-value", 401),
        ("Bearer", 401),
        ("Bearer s3cret-admin-token-valuX", 403),
        ("Bearer s3cret", 403),
    ):
        with pytest.raises(AdminAuthError) as info:
            token.check(header)
        assert info.value.http_status == status and info.value.code == "admin_required"
    with pytest.raises(ConfigError):
        load_or_create_admin_token(tmp_path, environ={"QFLARE_ADMIN_TOKEN": "short"})
