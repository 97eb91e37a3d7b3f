"""Leadership of a coordinator cluster: one PostgreSQL advisory lock, held by one worker at a time.

Several ``qflare server`` workers (``--workers N`` on one machine, or ``--cluster`` processes on several)
serve one federation from one PostgreSQL database.  Any of them accepts enrollments, handshakes and
uploads; exactly one of them, the *leader*, opens rounds, enforces deadlines, closes rounds and publishes
models.  The leader is whoever holds the session-level advisory lock :data:`LEADER_LOCK_ID` on a
connection it keeps for that purpose alone.  The lock dies with that connection: a leader killed with
``kill -9``, or cut off from the database, loses it when PostgreSQL notices the connection is gone, and
the next worker to ask (every round-loop step, 0.2 s by default) takes it.

A leader that lost its lock without noticing (a network partition) can still try to write; every
transition it makes is a compare-and-set on the round's state, and the ledger refuses an entry whose
predecessor moved, so two leaders never publish one round twice (:mod:`qflare.protocol.cluster`).

:func:`startup_lock` serialises the start of workers (schema migration, the initial model version), which
would otherwise race to create the same rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from ..errors import ConfigError
from .db import Database

__all__ = ["LEADER_LOCK_ID", "STARTUP_LOCK_ID", "AdvisoryLeadership", "require_cluster_database", "startup_lock"]

_log = logging.getLogger("qflare.cluster")

LEADER_LOCK_ID = 0x51464C5245_01  # "QFLRE" + 1: the federation's leadership
STARTUP_LOCK_ID = 0x51464C5245_02  # serialises worker start-up (migrations, the initial model version)

KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
"""TCP keepalives of the leadership connection, both ends: a leader whose machine died or was cut off
loses the lock after about 25 s (PostgreSQL's defaults would keep it for two hours), and a leader cut off
from the database notices as soon (``tcp_user_timeout`` too)."""
STATEMENT_TIMEOUT_MS = 5000
STARTUP_WAIT_S = 600.0
"""How long a worker waits for another's start-up before giving up."""


def require_cluster_database(db: Database) -> None:
    """A coordinator of several workers shares its state through PostgreSQL: refuse anything else."""
    if db.dialect != "postgresql":
        raise ConfigError(
            f"a coordinator of several workers needs PostgreSQL (QFLARE_DATABASE_URL), not {db.dialect}: "
            "SQLite has no advisory locks and cannot be shared between machines"
        )


@contextmanager
def startup_lock(db: Database) -> Iterator[None]:
    """Hold the cluster's start-up lock (blocking) while a worker migrates and builds its coordinator."""
    require_cluster_database(db)
    with db.engine.connect() as conn:
        deadline = time.monotonic() + STARTUP_WAIT_S
        while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": STARTUP_LOCK_ID}).scalar():
            conn.commit()
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"another worker has been starting for over {STARTUP_WAIT_S:.0f} s (the cluster's start-up lock "
                    "is held): is one stuck?"
                )
            time.sleep(0.5)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": STARTUP_LOCK_ID})
            conn.commit()


class AdvisoryLeadership:
    """This worker's claim on the federation's leadership (see the module docstring).  Thread-safe.

    :meth:`leading` takes the lock when it is free and checks, each time, that the connection holding it
    is alive; a failed check drops the connection (and with it the lock) and reports False."""

    def __init__(self, db: Database, *, lock_id: int = LEADER_LOCK_ID) -> None:
        require_cluster_database(db)
        self._db, self._lock_id = db, lock_id
        # its own engine: one connection, never pooled, with keepalives on both ends
        self._engine: Engine = create_engine(
            db.engine.url,
            poolclass=NullPool,
            connect_args={**KEEPALIVE, "tcp_user_timeout": 25_000, "connect_timeout": 5},
        )
        self._conn: Connection | None = None
        self._held = False
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether this worker held the lock at the last check (no database round trip)."""
        return self._held

    def leading(self) -> bool:
        """True when this worker holds the leadership now (taking it if it is free)."""
        with self._mutex:
            try:
                if self._conn is None:
                    self._conn = self._engine.connect()
                    for name, value in (
                        ("tcp_keepalives_idle", KEEPALIVE["keepalives_idle"]),
                        ("tcp_keepalives_interval", KEEPALIVE["keepalives_interval"]),
                        ("tcp_keepalives_count", KEEPALIVE["keepalives_count"]),
                        ("statement_timeout", STATEMENT_TIMEOUT_MS),
                    ):
                        self._conn.execute(text(f"SET {name} = {int(value)}"))
                if self._held:
                    self._conn.execute(text("SELECT 1"))  # the lock lives as long as this connection
                else:
                    taken = self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._lock_id}).scalar()
                    self._held = bool(taken)
                    if self._held:
                        _log.warning("this worker is now the cluster's leader")
                self._conn.commit()
            except SQLAlchemyError as exc:
                if self._held:
                    _log.error("leadership lost with the database connection: %s", exc)
                self._drop()
            return self._held

    def release(self) -> None:
        """Give the leadership up (closing the connection releases the lock)."""
        with self._mutex:
            self._release()
            self._engine.dispose()

    def _release(self) -> None:
        if self._held and self._conn is not None:
            try:  # at once; closing the connection would release it too, once the server notices
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._lock_id})
                self._conn.commit()
            except SQLAlchemyError:
                pass
        self._drop()

    def _drop(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back into the pool: the lock must die with it
                conn.close()
            except SQLAlchemyError:
                pass
