"""Storage layer: database set-up, migrations, tokens, devices, sessions, security events.

Every database test runs on SQLite (a file under tmp_path) and on PostgreSQL (a uniquely named
throw-away database, dropped afterwards); the PostgreSQL params skip if no server is reachable (in CI
they fail instead, see storage_fixtures.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect, select, text
from sqlalchemy.exc import IntegrityError
from storage_fixtures import BACKENDS, race, scratch

from qflare.errors import (
    ConfigError,
    ReplayError,
    RevokedError,
    RoundError,
    SessionExpiredError,
    TokenError,
    UnknownDeviceError,
    ValidationError,
    WrongRoundError,
)
from qflare.storage import Database, Store, hash_token, key_id
from qflare.storage import tables as t

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with scratch(request.param, tmp_path, migrate=False) as database:
        yield database


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with scratch(request.param, tmp_path) as database:
        yield Store(database, clock=lambda: T0)


def _device(store: Store, seed: bytes = b"a") -> str:
    key = seed * 32
    store.add_device(key_id(key), "ML-DSA-65", key, b"record")
    return key_id(key)


# -- Database & migrations ---------------------------------------------------------------------


def _diff(db: Database, metadata: MetaData) -> list[object]:
    with db.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_migrations_match_models_and_round_trip(
    empty_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini anywhere near the CWD
    assert empty_db.current_revision() is None
    empty_db.upgrade()
    assert empty_db.current_revision() == "0007"
    with empty_db.connect() as conn:
        tables = set(inspect(conn).get_table_names())
    assert tables == set(t.Base.metadata.tables) | {"alembic_version"}
    assert _diff(empty_db, t.Base.metadata) == []

    empty_db.downgrade()
    assert empty_db.current_revision() is None
    with empty_db.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    empty_db.upgrade()  # and back up again
    assert _diff(empty_db, t.Base.metadata) == []


def test_drift_check_detects_a_difference(empty_db: Database) -> None:
    empty_db.upgrade()
    drifted = MetaData(naming_convention=t.NAMING_CONVENTION)
    for table in t.Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["devices"].append_column(Column("extra", Integer, nullable=True))
    diff = _diff(empty_db, drifted)
    assert any(d[0] == "add_column" and d[3].name == "extra" for d in diff)  # type: ignore[index]


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'sub' / 'q.db'}")
    try:
        with db.connect(write=False) as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        db.upgrade()
        with pytest.raises(IntegrityError, match="FOREIGN KEY"), db.connect() as conn:
            conn.execute(
                text(
                    "INSERT INTO sessions (session_id, device_id, created_at, expires_at) VALUES ('s', 'nope', :a, :a)"
                ),
                {"a": "2030-01-01"},
            )
    finally:
        db.dispose()


def test_from_env_and_url_validation(tmp_path: Path) -> None:
    default = Database.from_env(tmp_path / "data", environ={})
    assert default.is_sqlite and default.url.endswith("/data/qflare.db")
    default.dispose()
    pg = Database.from_env(tmp_path, environ={"QFLARE_DATABASE_URL": "postgresql://u:pw@h/db"})
    assert pg.dialect == "postgresql" and "psycopg" in pg.url and "pw" not in pg.url
    pg.dispose()
    for bad in ("sqlite://", "sqlite:///:memory:", "mysql://h/db", "postgresql+psycopg2://h/d", "::"):
        with pytest.raises(ConfigError):
            Database(bad)


def test_naive_datetimes_refused_and_results_are_utc(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        store.create_tokens(1, timedelta(hours=1), now=datetime(2030, 1, 1))
    plus5 = timezone(timedelta(hours=5))
    store.create_tokens(1, timedelta(hours=1), now=datetime(2030, 1, 1, 17, 0, tzinfo=plus5))
    with store.db.transaction(write=False) as s:
        row = s.scalars(select(t.EnrollmentToken)).one()
    assert row.created_at == T0 and row.created_at.tzinfo is UTC


# -- enrollment tokens -------------------------------------------------------------------------


def test_tokens_stored_only_as_hashes_and_single_use(store: Store) -> None:
    tokens = store.create_tokens(3, timedelta(hours=1), label="batch-1")
    assert len(set(tokens)) == 3 and all(len(tok) >= 43 for tok in tokens)
    with store.db.transaction(write=False) as s:
        rows = s.scalars(select(t.EnrollmentToken)).all()
    assert {r.token_hash for r in rows} == {hash_token(tok) for tok in tokens}
    assert not {tok for tok in tokens} & {r.token_hash for r in rows}
    assert all(r.label == "batch-1" and r.expires_at == T0 + timedelta(hours=1) for r in rows)

    store.consume_token(tokens[0], "dev-1")
    used = store.get_token(tokens[0])
    assert used is not None and used.used_at == T0 and used.used_by_device == "dev-1"
    with pytest.raises(TokenError) as exc:
        store.consume_token(tokens[0], "dev-2")
    assert exc.value.code == "token_used"
    assert store.get_token(tokens[0]).used_by_device == "dev-1"  # type: ignore[union-attr]
    with pytest.raises(TokenError) as exc:
        store.consume_token("not-a-token", "dev-1")
    assert exc.value.code == "token_unknown"


def test_token_expiry(store: Store) -> None:
    (tok,) = store.create_tokens(1, timedelta(minutes=10))
    with pytest.raises(TokenError) as exc:
        store.consume_token(tok, "dev", now=T0 + timedelta(minutes=10))  # expires_at is exclusive
    assert exc.value.code == "token_expired"
    assert store.get_token(tok).used_at is None  # type: ignore[union-attr]
    store.consume_token(tok, "dev", now=T0 + timedelta(minutes=9, seconds=59))


def test_concurrent_token_consumption_has_exactly_one_winner(store: Store) -> None:
    (tok,) = store.create_tokens(1, timedelta(hours=1))
    n = 8
    ids = iter(range(n))
    results = race(n, lambda i: store.consume_token(tok, f"dev-{next(ids)}"))
    winners = [r for r in results if r is None]
    losers = [r for r in results if isinstance(r, TokenError) and r.code == "token_used"]
    assert len(winners) == 1 and len(losers) == n - 1, results
    assert store.get_token(tok).used_by_device is not None  # type: ignore[union-attr]


# -- devices & sessions ------------------------------------------------------------------------


def test_enroll_device_is_atomic(store: Store) -> None:
    key = b"k" * 32
    tok1, tok2 = store.create_tokens(2, timedelta(hours=1))
    with pytest.raises(ValidationError) as exc:
        store.enroll_device(tok1, "0" * 64, "ML-DSA-65", key, b"rec")
    assert exc.value.code == "device_id_mismatch"
    assert store.get_token(tok1).used_at is None  # type: ignore[union-attr]

    dev = store.enroll_device(tok1, key_id(key), "ML-DSA-65", key, b"rec")
    assert dev.active and dev.sig_public_key == key and dev.enrolled_at == T0
    with pytest.raises(ReplayError) as rexc:
        store.enroll_device(tok2, key_id(key), "ML-DSA-65", key, b"rec")
    assert rexc.value.code == "device_exists"
    assert store.get_token(tok2).used_at is None  # type: ignore[union-attr]  (rolled back)


def test_revoke_device_closes_sessions_and_blocks_use(store: Store) -> None:
    dev, other = _device(store, b"a"), _device(store, b"b")
    store.add_session("s1", dev, T0 + timedelta(hours=1))
    assert store.active_session("s1").device_id == dev

    revoked = store.revoke_device(dev, "key compromised", now=T0 + timedelta(minutes=1))
    assert revoked.status == "revoked" and revoked.revoked_reason == "key compromised"
    assert store.get_session("s1").closed_at == T0 + timedelta(minutes=1)  # type: ignore[union-attr]
    with pytest.raises(RevokedError):
        store.active_device(dev)
    with pytest.raises(RevokedError):
        store.active_session("s1")
    with pytest.raises(RevokedError):
        store.add_session("s2", dev, T0 + timedelta(hours=1))
    again = store.revoke_device(dev, "second reason")
    assert again.revoked_reason == "key compromised"
    with pytest.raises(UnknownDeviceError):
        store.revoke_device("f" * 64, "x")
    assert [d.device_id for d in store.list_devices(status="active")] == [other]
    assert {d.device_id for d in store.list_devices()} == {dev, other}


def test_session_lifecycle(store: Store) -> None:
    dev = _device(store)
    with pytest.raises(UnknownDeviceError):
        store.add_session("s0", "f" * 64, T0 + timedelta(hours=1))
    row = store.add_session("s1", dev, T0 + timedelta(minutes=5))
    assert row.created_at == T0 and row.closed_at is None
    with pytest.raises(ReplayError):
        store.add_session("s1", dev, T0 + timedelta(minutes=5))
    with pytest.raises(SessionExpiredError) as exc:
        store.active_session("s1", now=T0 + timedelta(minutes=5))
    assert exc.value.code == "session_expired"
    with pytest.raises(SessionExpiredError) as exc:
        store.active_session("nope")
    assert exc.value.code == "unknown_session"
    assert store.close_session("s1") is True
    assert store.close_session("s1") is False
    with pytest.raises(SessionExpiredError) as exc:
        store.active_session("s1")
    assert exc.value.code == "session_closed"


# -- security events ---------------------------------------------------------------------------


def test_security_event_survives_rolled_back_caller(store: Store) -> None:
    # On SQLite (single writer) the caller's own transaction must be a read; on PostgreSQL it writes.
    writes = store.db.dialect == "postgresql"
    with pytest.raises(RuntimeError), store.db.transaction(write=writes) as s:
        if writes:
            s.add(t.EnrollmentToken(token_hash="x" * 64, created_at=T0, expires_at=T0, label=""))
            s.flush()
        else:
            s.scalars(select(t.Device)).all()
        store.record_security_event("bad_signature", "sig check failed", device_id="d1")
        raise RuntimeError("caller's operation failed")
    events = store.security_events(10)
    assert [(e.reason, e.device_id) for e in events] == [("bad_signature", "d1")]
    with store.db.transaction(write=False) as s:
        assert s.scalars(select(t.EnrollmentToken)).all() == []

    # A failed Store operation followed by its event: the event persists, the operation left nothing.
    (tok,) = store.create_tokens(1, timedelta(hours=1))
    with pytest.raises(ValidationError):
        store.enroll_device(tok, "0" * 64, "ML-DSA-65", b"k" * 32, b"")
    store.record_security_event("device_id_mismatch", "x", remote_addr="10.0.0.1")
    assert store.get_token(tok).used_at is None  # type: ignore[union-attr]
    assert [e.reason for e in store.security_events(10)] == ["device_id_mismatch", "bad_signature"]
    assert len(store.security_events(1)) == 1


def test_security_event_accepts_hostile_input(store: Store) -> None:
    row = store.record_security_event("r" * 500, "detail\x00" * 2000, device_id="\x00" + "d" * 1000, session_id="s\x00")
    assert len(row.reason) == 64 and len(row.detail) == 4000 and len(row.device_id or "") == 128
    assert "\x00" not in (row.device_id or "") + row.detail + (row.session_id or "")
    assert store.security_events(5, device_id=row.device_id)[0].id == row.id


def test_security_events_filter_by_reason_device_and_time(store: Store) -> None:
    early, late = T0 - timedelta(hours=2), T0 - timedelta(minutes=5)
    store.record_security_event("admin_required", "a", remote_addr="10.0.0.1", at=early)
    store.record_security_event("bad_signature", "b", device_id="d1", at=late)
    store.record_security_event("admin_required", "c", device_id="d1", at=T0)
    assert [e.detail for e in store.security_events(10)] == ["c", "b", "a"]
    assert [e.detail for e in store.security_events(10, reason="admin_required")] == ["c", "a"]
    assert [e.detail for e in store.security_events(10, device_id="d1")] == ["c", "b"]
    assert [e.detail for e in store.security_events(10, since=late)] == ["c", "b"]
    assert [e.detail for e in store.security_events(10, reason="admin_required", since=late)] == ["c"]
    assert store.security_events(10, reason="nothing_like_it") == []
    with pytest.raises(ValueError, match="timezone-aware"):
        store.security_events(10, since=datetime(2026, 1, 1))  # no time zone: refused, not guessed


# -- secure-aggregation round state (migration 0006) ------------------------------------------


def test_secagg_round_state_is_written_only_while_the_round_is_open(store: Store) -> None:
    dev = _device(store)
    store.open_round(1, "ab" * 32, [dev], 1, 1, T0 + timedelta(hours=1))
    due = T0 + timedelta(minutes=5)
    with pytest.raises(ValidationError):  # the first state carries the running sum
        store.save_secagg_round(1, config={"n": 2}, state="{}", total=None, phase_deadline=due)
    store.save_secagg_round(1, config={"n": 2}, state="s1", total=b"\0" * 8, phase_deadline=due)
    row = store.get_secagg_round(1)
    assert (row.state, row.total, row.unmasking_at, row.phase_deadline) == ("s1", b"\0" * 8, None, due)
    store.save_secagg_round(1, config={"n": 2}, state="s2", total=None, phase_deadline=due, unmasking=True)
    row = store.get_secagg_round(1)
    assert (row.state, row.total, row.unmasking_at) == ("s2", b"\0" * 8, T0)  # the sum kept, unmasking stamped
    store.save_secagg_round(1, config={"n": 2}, state="s3", total=b"\1" * 8, phase_deadline=due)
    row = store.get_secagg_round(1)
    assert (row.total, row.unmasking_at) == (b"\1" * 8, T0)  # never cleared
    with pytest.raises(ValidationError):
        store.save_secagg_round(1, config={"n": 3}, state="s4", total=None, phase_deadline=due)
    store.set_round_state(1, "open", "failed")
    with pytest.raises(RoundError) as info:
        store.save_secagg_round(1, config={"n": 2}, state="s5", total=None, phase_deadline=due)
    assert info.value.code == "round_state_conflict"
    assert store.get_secagg_round(1).state == "s3" and store.get_secagg_round(2) is None
    with pytest.raises(WrongRoundError):
        store.save_secagg_round(2, config={}, state="", total=b"", phase_deadline=due)
