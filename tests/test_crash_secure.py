"""kill -9 of the coordinator in each phase of a secure-aggregation round (real processes over HTTP):
the restarted coordinator resumes the round from its stored state (or, when the unmasking had begun,
fails it with ``secagg_aborted``), and the federation finishes.

How a round is held in the phase wanted, without a race on timing: the four devices are two groups,
A (devices 0, 1) and B (devices 2, 3), one of which is frozen (SIGSTOP) at any time.  B enrolls and is
frozen; A advertises, so ADVERTISE waits for B.  To move the round one phase on, the group that is
ahead (it sent the open phase's message; the phase waits for the other group, so it cannot have sent
the next one) is frozen and the other thawed: that group sends its message of the open phase, which
closes it, then its message of the next phase, which now waits for the frozen group.  The coordinator
is killed once the stored state shows the phase wanted with two messages of it accepted.

Round 2 opens as soon as round 1 ends, with the devices that hold a session with the restarted
coordinator by then (``liveness_window_s``): two or four, depending on how fast the running devices
renewed theirs; what is asserted of it is that it closes with every device it selected.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_fixtures import Federation

from qflare.ledger.canonical import decode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# a phase of the round -> the list in SecAggServer.snapshot()'s state holding its accepted messages
PHASES = {
    "advertise": "adverts",
    "share_keys": "shares",
    "masked_input": "masked",
    "consistency": "signatures",
    "unmask": "responses",
}
A, B = ("device-0", "device-1"), ("device-2", "device-3")


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, devices=4, rounds=2, per_round=4)
    fed.spec = fed.spec.replace(secure_aggregation=True)
    yield fed
    _signal(fed, A + B, signal.SIGCONT)  # a frozen device could not stop
    fed.close()


def _signal(fed: Federation, names: tuple[str, ...], sig: signal.Signals) -> None:
    for name in names:
        proc = fed.children.procs.get(name)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)


def _stored_state(fed: Federation) -> dict[str, Any]:
    db, store = fed.store()
    try:
        row = store.get_secagg_round(1)
        return {} if row is None else dict(json.loads(row.state))
    finally:
        db.dispose()


def _wait_stored(fed: Federation, phase: str, count: int) -> None:
    """Until round 1's stored state is in ``phase`` with ``count`` of its messages accepted."""
    deadline = time.monotonic() + 60.0
    while True:
        state = _stored_state(fed)
        if state.get("phase") == phase and len(state[PHASES[phase]]) == count:
            return
        assert time.monotonic() < deadline, f"stored state {state.get('phase')}\n{fed.logs_tail()}"
        time.sleep(0.1)


def _hold_round_in(fed: Federation, phase: str) -> tuple[str, ...]:
    """Run round 1 up to ``phase`` with A's or B's message of it stored; the group it waits for (frozen)."""
    tokens = fed.tokens_via_api(4)
    for i in (2, 3):
        fed.start_device(i, tokens[i])
    fed.wait_status(lambda s: s["devices"] == 2, 60.0)
    _signal(fed, B, signal.SIGSTOP)  # enrolled: round 1 selects B, and waits for it
    for i in (0, 1):
        fed.start_device(i, tokens[i])
    _wait_stored(fed, "advertise", 2)
    ahead, behind = A, B
    for nxt in list(PHASES)[1 : list(PHASES).index(phase) + 1]:
        _signal(fed, ahead, signal.SIGSTOP)
        _signal(fed, behind, signal.SIGCONT)
        _wait_stored(fed, nxt, 2)  # behind's message closed the phase; its next one is stored
        ahead, behind = behind, ahead
    return behind


def _ledger(fed: Federation) -> list[dict[str, Any]]:
    """The bodies of the round entries of the ledger, with their round number."""
    db, store = fed.store()
    try:
        rows = [row for row in store.ledger_entries() if row.kind == "round"]
        return [{**decode(row.body), "round_number": row.round_number} for row in rows]
    finally:
        db.dispose()


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_in_each_phase_resumes_the_secure_round(federation: Federation, phase: str) -> None:
    fed = federation
    first = fed.start_server("server-1")
    fed.wait_ready("server-1")
    frozen = _hold_round_in(fed, phase)
    held = _stored_state(fed)

    assert first.kill() == -signal.SIGKILL  # a crash: no shutdown at all

    fed.start_server("server-2")
    fed.wait_ready("server-2")
    assert fed.status()["round"] == 1 and fed.status()["state"] == "open"
    state = _stored_state(fed)
    assert state["phase"] == phase and state[PHASES[phase]] == held[PHASES[phase]]  # resumed where it was
    assert "round 1: secure round resumed in phase " + phase in fed.servers["server-2"].log_tail(200)
    _signal(fed, frozen, signal.SIGCONT)
    fed.wait_exit([f"device-{i}" for i in range(4)], 180.0)
    final = fed.wait_status(lambda s: s["state"] == "finished", 30.0)
    assert final["model_version"] == 2
    entries = _ledger(fed)
    assert [e["round_number"] for e in entries] == [1, 2]  # one entry per round
    db, store = fed.store()
    try:
        assert len(entries[0]["updates"]) == 4, entries[0]  # the resumed round: all four survived
        for body in entries:
            assert body["outcome"] == "closed" and body["left_out"] == [], body
            assert store.updates_for_round(body["round_number"]) == []
        assert [store.get_model(v).model_hash for v in (1, 2)] == [e["model"] for e in entries]  # published once each
        assert store.get_model(3) is None
    finally:
        db.dispose()
    fed.assert_clean_shutdown("server-2")


def test_kill_9_after_the_unmasking_began_fails_the_round_cleanly(federation: Federation) -> None:
    fed = federation
    first = fed.start_server("server-1")
    fed.wait_ready("server-1")
    frozen = _hold_round_in(fed, "unmask")
    assert first.kill() == -signal.SIGKILL
    # What the coordinator stores just before finish() removes any mask; a kill between that write and the
    # publication (milliseconds, with no place to hold the process) leaves exactly this state.
    db, store = fed.store()
    try:
        row = store.get_secagg_round(1)
        assert row is not None and row.unmasking_at is None
        store.save_secagg_round(
            1, config=row.config, state=row.state, total=None, phase_deadline=row.phase_deadline, unmasking=True
        )
    finally:
        db.dispose()

    fed.start_server("server-2")
    fed.wait_ready("server-2")
    assert "secure round cannot resume (the unmasking had begun)" in fed.servers["server-2"].log_tail(200)
    _signal(fed, frozen, signal.SIGCONT)
    fed.wait_exit([f"device-{i}" for i in range(4)], 180.0)
    final = fed.wait_status(lambda s: s["state"] == "finished", 30.0)
    entries = _ledger(fed)
    assert [e["round_number"] for e in entries] == [1, 2], entries
    assert entries[0]["outcome"] == "failed" and entries[0]["reason"] == "secagg_aborted"
    assert entries[0]["model"] is None
    assert entries[1]["outcome"] == "closed" and entries[1]["left_out"] == [], entries[1]
    assert final["model_version"] == 1
    db, store = fed.store()
    try:
        assert store.get_model(1).model_hash == entries[1]["model"] and store.get_model(2) is None
    finally:
        db.dispose()
    fed.assert_clean_shutdown("server-2")
