"""Storage layer: rounds (compare-and-set), idempotent updates, model lineage, ledger.

Runs on SQLite and on a throw-away PostgreSQL database (skipped if none is reachable, failed in CI).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ledger_fixtures import chain, coordinator_key, h, round_entry
from storage_fixtures import BACKENDS, race, scratch

from qflare.errors import (
    PolicyError,
    ReplayError,
    RevokedError,
    RoundError,
    StaleModelError,
    ValidationError,
    WrongRoundError,
)
from qflare.ledger import LedgerEntry
from qflare.storage import Store, key_id

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DEADLINE = T0 + timedelta(minutes=10)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with scratch(request.param, tmp_path) as database:
        yield Store(database, clock=lambda: T0)


def _devices(store: Store, n: int) -> list[str]:
    ids = []
    for i in range(n):
        key = bytes([65 + i]) * 32
        store.add_device(key_id(key), "ML-DSA-65", key, b"rec")
        ids.append(key_id(key))
    return ids


def _submit(store: Store, dev: str, h: str = "u1", rnd: int = 1, base: str = "m0") -> tuple[object, bool]:
    return store.record_update(rnd, dev, h, base, 10, b"sig", {"loss": 0.25})


# -- rounds ------------------------------------------------------------------------------------


def test_open_round_invariants(store: Store) -> None:
    assert store.current_round() is None
    r1 = store.open_round(1, "m0", ["a", "b"], 1, 2, DEADLINE)
    assert (r1.state, r1.selected_devices, r1.opened_at, r1.deadline) == ("open", ("a", "b"), T0, DEADLINE)
    assert store.current_round() == r1 == store.get_round(1)
    with pytest.raises(RoundError) as exc:
        store.open_round(2, "m0", [], 1, 1, DEADLINE)
    assert exc.value.code == "round_in_progress"
    with pytest.raises(RoundError) as exc:
        store.open_round(1, "m0", [], 1, 1, DEADLINE)
    assert exc.value.code == "round_exists"
    store.set_round_state(1, "open", "failed")
    with pytest.raises(RoundError) as exc:
        store.open_round(0, "m0", [], 1, 1, DEADLINE)
    assert exc.value.code == "round_number_not_increasing"
    with pytest.raises(ValidationError):
        store.open_round(2, "m0", ["a", "a"], 1, 1, DEADLINE)
    with pytest.raises(ValidationError):
        store.open_round(2, "m0", [], 0, 1, DEADLINE)
    with pytest.raises(ValidationError):
        store.open_round(2, "m0", [], 1, 1, T0)
    store.open_round(5, "m0", [], 1, 1, DEADLINE)
    assert [r.round_number for r in store.list_rounds()] == [1, 5]
    assert [r.round_number for r in store.list_rounds(limit=1)] == [5]


def test_round_compare_and_set(store: Store) -> None:
    store.open_round(1, "m0", [], 1, 1, DEADLINE)
    agg = store.set_round_state(1, "open", "aggregating", deadline=DEADLINE + timedelta(minutes=1))
    assert agg.state == "aggregating" and agg.deadline == DEADLINE + timedelta(minutes=1)
    assert agg.closed_at is None
    with pytest.raises(RoundError) as exc:
        store.set_round_state(1, "open", "aggregating")
    assert exc.value.code == "round_state_conflict"
    with pytest.raises(RoundError) as exc:
        store.set_round_state(1, "closed", "open")
    assert exc.value.code == "bad_transition"
    with pytest.raises(ValidationError):
        store.set_round_state(1, "aggregating", "closed")  # no result model hash
    assert store.get_round(1).state == "aggregating"  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        store.set_round_state(1, "aggregating", "closed", state="open")
    with pytest.raises(WrongRoundError):
        store.set_round_state(9, "open", "aggregating")
    closed = store.set_round_state(1, "aggregating", "closed", result_model_hash="m1")
    assert (closed.state, closed.result_model_hash, closed.closed_at) == ("closed", "m1", T0)


def test_round_cas_race_has_one_winner(store: Store) -> None:
    store.open_round(1, "m0", [], 1, 1, DEADLINE)
    results = race(6, lambda i: store.set_round_state(1, "open", "aggregating"))
    wins = [r for r in results if not isinstance(r, Exception)]
    conflicts = [r for r in results if isinstance(r, RoundError) and r.code == "round_state_conflict"]
    assert len(wins) == 1 and len(conflicts) == 5, results


# -- updates -----------------------------------------------------------------------------------


def test_record_update_is_idempotent(store: Store) -> None:
    a, b = _devices(store, 2)
    store.open_round(1, "m0", [a, b], 1, 1, DEADLINE)
    first, created = store.record_update(1, a, "u1", "m0", 10, b"sig", {"loss": 0.25})
    assert created and first.metrics == {"loss": 0.25} and first.received_at == T0
    again, created_again = store.record_update(1, a, "u1", "m0", 10, b"sig", {"loss": 0.25})
    assert not created_again and again == first
    with pytest.raises(ReplayError) as exc:
        store.record_update(1, a, "u2", "m0", 10, b"sig", {})
    assert exc.value.code == "duplicate_submission"
    assert store.count_updates(1) == 1
    _submit(store, b, "u3")
    assert [u.device_id for u in store.updates_for_round(1)] == [a, b]
    assert store.count_updates(1) == 2 and store.count_updates(2) == 0


def test_record_update_refusals_leave_nothing(store: Store) -> None:
    a, b, c = _devices(store, 3)
    store.open_round(1, "m0", [a, b], 1, 1, DEADLINE)
    with pytest.raises(WrongRoundError):
        _submit(store, a, rnd=2)
    with pytest.raises(PolicyError) as pexc:
        _submit(store, c)
    assert pexc.value.code == "not_selected"
    with pytest.raises(StaleModelError):
        _submit(store, a, base="m-old")
    with pytest.raises(ValidationError) as vexc:
        store.record_update(1, a, "u", "m0", 1, b"sig", {"loss": float("nan")})
    assert vexc.value.code == "bad_json"
    with pytest.raises(RoundError) as rexc:
        store.record_update(1, a, "u", "m0", 1, b"s", {}, now=DEADLINE + timedelta(seconds=1))
    assert rexc.value.code == "deadline_passed"
    store.revoke_device(b, "compromised")
    with pytest.raises(RevokedError):
        _submit(store, b)
    _submit(store, a)
    store.set_round_state(1, "open", "aggregating")
    with pytest.raises(RoundError) as rexc:
        _submit(store, b, "u9")
    assert rexc.value.code == "round_not_open"
    assert _submit(store, a)[1] is False  # a retry of an accepted update is still idempotent
    assert store.count_updates(1) == 1


def test_concurrent_identical_submissions_store_one(store: Store) -> None:
    (a,) = _devices(store, 1)
    store.open_round(1, "m0", [a], 1, 1, DEADLINE)
    results = race(6, lambda i: _submit(store, a))
    assert all(isinstance(r, tuple) for r in results), results
    assert sorted(r[1] for r in results) == [False] * 5 + [True]  # type: ignore[index]
    assert len({r[0].id for r in results}) == 1  # type: ignore[index]
    assert store.count_updates(1) == 1


# -- model versions ----------------------------------------------------------------------------


def test_model_lineage(store: Store) -> None:
    assert store.latest_model() is None
    store.add_model_version(0, None, "m0", None, b"sig0", {})
    with pytest.raises(ReplayError) as rexc:
        store.add_model_version(0, None, "mX", None, b"sig", {})
    assert rexc.value.code == "model_version_exists"
    with pytest.raises(StaleModelError):
        store.add_model_version(1, None, "m1", "not-m0", b"sig", {})
    with pytest.raises(StaleModelError):
        store.add_model_version(2, None, "m2", "m0", b"sig", {})
    with pytest.raises(WrongRoundError):
        store.add_model_version(1, 7, "m1", "m0", b"sig", {})
    m1 = store.add_model_version(1, None, "m1", "m0", b"sig1", {"acc": 0.9})
    assert store.latest_model() == m1 == store.get_model(1)
    assert store.get_model(0).model_hash == "m0" and store.get_model(5) is None  # type: ignore[union-attr]


def test_publish_model_closes_round_atomically(store: Store) -> None:
    store.add_model_version(0, None, "m0", None, b"sig0", {})
    store.open_round(1, "m0", [], 1, 1, DEADLINE)
    with pytest.raises(RoundError):
        store.publish_model(1, 1, "m1", b"sig", {})  # round still open: model must not appear
    assert store.latest_model().version == 0  # type: ignore[union-attr]
    store.set_round_state(1, "open", "aggregating")
    with pytest.raises(StaleModelError):
        store.publish_model(1, 3, "m1", b"sig", {})  # bad version: round must stay aggregating
    assert store.get_round(1).state == "aggregating"  # type: ignore[union-attr]
    rnd, model = store.publish_model(1, 1, "m1", b"sig", {"acc": 0.5})
    assert (rnd.state, rnd.result_model_hash, model.parent_hash, model.round_number) == (
        "closed",
        "m1",
        "m0",
        1,
    )


# -- ledger ------------------------------------------------------------------------------------


def test_ledger_chain(store: Store) -> None:
    key = coordinator_key()
    e1, e2, e3 = chain(key, 3)
    assert store.last_ledger_entry() is None and store.ledger_entries() == []
    r1 = store.append_ledger(e1)
    r2 = store.append_ledger(e2)
    assert (r1.seq, r2.seq, r2.round_number, r2.body) == (1, 2, 2, e2.raw)
    assert LedgerEntry.parse(r2.body, r2.signatures).entry_hash == e2.entry_hash  # stored bytes, not re-encoded
    with pytest.raises(ReplayError) as exc:
        store.append_ledger(e2)  # again: does not extend the head
    assert exc.value.code == "ledger_conflict"
    fork = round_entry(key, seq=3, prev=e1.entry_hash, round_number=3, parent=h("model", 2), model=h("m", 3))
    with pytest.raises(ReplayError):
        store.append_ledger(fork)  # stale prev_hash: a fork
    assert store.ledger_entries() == [r1, r2] and store.ledger_entries(after_seq=1, limit=5) == [r2]
    assert store.last_ledger_entry() == r2 and store.ledger_entry_for_round(2) == r2
    assert store.ledger_entry_for_round(3) is None
    store.append_ledger(e3)
    assert [e.seq for e in store.ledger_entries(limit=2)] == [1, 2]


def test_concurrent_ledger_appends_do_not_fork(store: Store) -> None:
    key = coordinator_key()
    first = chain(key, 1)[0]
    store.append_ledger(first)
    rivals = [
        round_entry(key, seq=2, prev=first.entry_hash, round_number=2, parent=h("model", 1), model=h("rival", i))
        for i in range(6)
    ]
    results = race(6, lambda i: store.append_ledger(rivals[i]))
    ok = [r for r in results if not isinstance(r, Exception)]
    conflicts = [r for r in results if isinstance(r, ReplayError) and r.code == "ledger_conflict"]
    assert len(ok) == 1 and len(conflicts) == 5, results
    assert [e.seq for e in store.ledger_entries()] == [1, 2]
