"""Secure aggregation end to end over real HTTP: ``qflare server`` (spec with secure_aggregation) and three
``qflare client`` processes, whose device loops run the phases through the /v1/secagg/* routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from http_fixtures import Federation

from qflare.ledger.canonical import decode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, devices=3, rounds=2, per_round=3)
    fed.spec = fed.spec.replace(secure_aggregation=True)
    yield fed
    fed.close()


def test_two_secure_rounds_over_http(federation: Federation) -> None:
    fed = federation
    fed.start_server()
    fed.wait_ready()
    initial = fed.status()
    for i, token in enumerate(fed.tokens_via_cli(3)):
        fed.start_device(i, token)
    fed.wait_exit([f"device-{i}" for i in range(3)], 180.0)
    final = fed.wait_status(lambda s: any(h["round"] == 2 for h in s["history"]), 60.0)
    assert final["state"] == "finished" and final["model_version"] == 2
    assert final["model_sha256"] != initial["model_sha256"]
    db, store = fed.store()
    try:
        for rnd in (1, 2):
            assert store.updates_for_round(rnd) == []  # no plaintext update reached the coordinator
            body = decode(store.ledger_entry_for_round(rnd).body)
            assert body["outcome"] == "closed" and len(body["updates"]) == 3
            assert body["pipeline"]["secure_aggregation"] is True
            assert store.get_secagg_round(rnd) is not None
    finally:
        db.dispose()
    for i in range(3):
        assert not (fed.state_dir(i) / "secagg.json").exists()
    fed.assert_clean_shutdown("server")
