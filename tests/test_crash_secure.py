"""kill -9 of the coordinator in the middle of a secure-aggregation round (real processes over HTTP):
the restarted coordinator resumes the round from its stored state, and the federation finishes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_fixtures import Federation

from qflare.ledger.canonical import decode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, devices=4, rounds=2, per_round=4)
    fed.spec = fed.spec.replace(secure_aggregation=True)
    yield fed
    fed.close()


def _stored_adverts(fed: Federation) -> int:
    db, store = fed.store()
    try:
        row = store.get_secagg_round(1)
        return 0 if row is None else len(json.loads(row.state)["adverts"])
    finally:
        db.dispose()


def test_kill_9_in_the_advertise_phase_resumes_the_secure_round(federation: Federation) -> None:
    fed = federation
    first = fed.start_server("server-1")
    fed.wait_ready("server-1")
    tokens = fed.tokens_via_api(4)
    # Devices 2 and 3 enroll, then stop: round 1 selects them, and its advertise phase waits for them.
    for i in (2, 3):
        fed.start_device(i, tokens[i])
    fed.wait_status(lambda s: s["devices"] == 2, 60.0)
    fed.children.stop(["device-2", "device-3"])
    for i in (0, 1):
        fed.start_device(i, tokens[i])
    fed.wait_status(lambda s: s["round"] == 1, 60.0, poll_s=0.05)
    deadline = time.monotonic() + 60.0
    while _stored_adverts(fed) < 2:  # both adverts accepted, and stored with the message
        assert time.monotonic() < deadline, fed.logs_tail()
        time.sleep(0.1)

    assert first.kill() == -signal.SIGKILL  # a crash: no shutdown at all

    fed.start_server("server-2")
    fed.wait_ready("server-2")
    assert fed.status()["round"] == 1 and fed.status()["state"] == "open"
    assert _stored_adverts(fed) == 2
    for i in (2, 3):
        fed.start_device(i, None)
    fed.wait_exit([f"device-{i}" for i in range(4)], 180.0)
    final = fed.wait_status(lambda s: s["state"] == "finished", 30.0)
    assert final["model_version"] == 2
    db, store = fed.store()
    try:
        for rnd in (1, 2):
            body = decode(store.ledger_entry_for_round(rnd).body)
            assert body["outcome"] == "closed" and len(body["updates"]) == 4, body
            assert store.updates_for_round(rnd) == []
    finally:
        db.dispose()
    fed.assert_clean_shutdown("server-2")
