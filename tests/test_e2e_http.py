"""End to end over real HTTP: ``qflare server`` + 3 ``qflare client`` processes, 2 federated rounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from http_fixtures import Federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, devices=3, rounds=2, per_round=3)
    yield fed
    fed.close()


def test_two_rounds_over_http(federation: Federation) -> None:
    fed = federation
    fed.start_server()
    fed.wait_ready()
    identity = fed.api.get_json("/v1/identity")
    assert identity["key_id"] == (fed.data_dir / "coordinator.keyid").read_text().strip()
    initial = fed.status()
    assert initial["state"] == "waiting" and initial["model_version"] == 0

    tokens = fed.tokens_via_cli(3)
    for i, token in enumerate(tokens):
        fed.start_device(i, token)
    names = [f"device-{i}" for i in range(3)]
    fed.wait_exit(names, 120.0)  # each device returns when the federation is finished

    final = fed.wait_status(lambda s: any(h["round"] == 2 for h in s["history"]), 60.0)
    assert final["state"] == "finished" and final["model_version"] == 2
    assert final["model_sha256"] != initial["model_sha256"]
    assert final["devices"] == 3
    by_round = {h["round"]: h for h in final["history"]}
    assert 0.0 <= by_round[2]["accuracy"] <= 1.0 and by_round[2]["loss"] > 0
    assert by_round[2]["updates"] == 3

    # Every device's receipts name exactly the updates the coordinator recorded.
    db, store = fed.store()
    try:
        for rnd in (1, 2):
            rows = {(u.device_id, u.update_hash) for u in store.updates_for_round(rnd)}
            seen = {(r["device_id"], r["update_hash"]) for i in range(3) for r in fed.receipts(i) if r["round"] == rnd}
            assert rows == seen and len(rows) == 3
    finally:
        db.dispose()

    # A restart of a device reuses its key and enrollment: no token, and the finished federation ends it.
    again = fed.start_device(0, None)
    fed.wait_exit(["device-0"], 60.0)
    assert again.returncode == 0

    fed.assert_clean_shutdown("server")
