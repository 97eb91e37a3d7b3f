"""Crash recovery over real HTTP: kill -9 the coordinator mid-round, restart it, nothing lost or doubled.

Four devices are selected for round 1.  Two of them are enrolled and then stopped, so that exactly the
other two submit before the coordinator is SIGKILLed.  The coordinator is restarted on the same data dir
and port; the two running devices reconnect by themselves, the two stopped ones are started again (no
token: they reuse key and enrollment), round 1 completes, and round 2 runs with all four.  The
``updates`` table must then hold exactly the updates the devices saw acknowledged (their receipts).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_fixtures import Federation
from typer.testing import CliRunner

from qflare.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, devices=4, rounds=2, per_round=4)
    yield fed
    fed.close()


def test_kill_9_mid_round_loses_and_duplicates_nothing(federation: Federation) -> None:
    fed = federation
    first = fed.start_server("server-1")
    fed.wait_ready("server-1")
    tokens = fed.tokens_via_api(4)

    # Devices 2 and 3 enroll, then stop: they will be late for round 1.
    for i in (2, 3):
        fed.start_device(i, tokens[i])
    fed.wait_status(lambda s: s["devices"] == 2, 60.0)
    fed.children.stop(["device-2", "device-3"])

    # Devices 0 and 1 complete the enrollment; round 1 opens with all four selected; these two submit.
    for i in (0, 1):
        fed.start_device(i, tokens[i])
    fed.wait_status(lambda s: s["round"] == 1 and s["accepted"] == 2, 60.0, poll_s=0.05)
    deadline = time.monotonic() + 20.0
    while len(acked := {r["update_hash"] for i in (0, 1) for r in fed.receipts(i) if r["round"] == 1}) < 2:
        assert time.monotonic() < deadline, fed.logs_tail()
        time.sleep(0.05)  # real time: the devices are real processes
    db, store = fed.store()
    try:
        before = {(u.device_id, u.update_hash) for u in store.updates_for_round(1)}
    finally:
        db.dispose()
    assert len(before) == 2

    assert first.kill() == -signal.SIGKILL  # a crash: no shutdown at all

    fed.start_server("server-2")
    fed.wait_ready("server-2")
    recovered = fed.status()
    assert recovered["round"] == 1 and recovered["state"] == "open" and recovered["accepted"] == 2

    for i in (2, 3):
        fed.start_device(i, None)
    fed.wait_exit([f"device-{i}" for i in range(4)], 120.0)
    final = fed.wait_status(lambda s: s["state"] == "finished", 30.0)
    assert final["model_version"] == 2

    db, store = fed.store()
    try:
        for rnd in (1, 2):
            rows = [(u.device_id, u.update_hash) for u in store.updates_for_round(rnd)]
            assert len(rows) == 4 and len({d for d, _ in rows}) == 4, rows  # one update per device, no duplicates
            seen = {(r["device_id"], r["update_hash"]) for i in range(4) for r in fed.receipts(i) if r["round"] == rnd}
            assert set(rows) == seen  # exactly what was acknowledged: none lost, none extra
        assert before <= {(u.device_id, u.update_hash) for u in store.updates_for_round(1)}
    finally:
        db.dispose()
    # The two devices that submitted before the crash did not submit round 1 again after it.
    assert {r["update_hash"] for i in (0, 1) for r in fed.receipts(i) if r["round"] == 1} == acked

    # The provenance ledger: one entry per round across the crash, naming exactly the acknowledged updates
    # and the published models, signed by the coordinator key; the export verifies offline.
    out = fed.root / "ledger.jsonl"
    runner = CliRunner()
    exported = runner.invoke(app, ["ledger", "export", "--data-dir", str(fed.data_dir), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    key_id = (fed.data_dir / "coordinator.keyid").read_text().strip()
    verified = runner.invoke(app, ["ledger", "verify", str(out), "--pin", key_id, "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert (report["entries"], report["rounds"], report["device_signatures"], report["missing_envelopes"]) == (
        2,
        2,
        8,
        0,
    )
    entries = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    seen_all = {(r["device_id"], r["update_hash"]) for i in range(4) for r in fed.receipts(i)}
    for entry in entries:
        assert entry["body"]["outcome"] == "closed"
        assert {(d, u) for d, u, _ in entry["body"]["updates"]} <= seen_all

    fed.assert_clean_shutdown("server-2")
