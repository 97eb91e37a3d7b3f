"""Database connection: SQLAlchemy 2 engine, sessions and programmatic Alembic migrations.

Two back ends are supported:

* **SQLite** (the embedded default, a single file): WAL journal, ``foreign_keys=ON``,
  ``synchronous=FULL`` (a committed transaction survives power loss) and a busy timeout.  pysqlite's
  own transaction handling is switched off and we emit ``BEGIN`` ourselves, so write transactions
  start with ``BEGIN IMMEDIATE``: writers queue on the busy timeout instead of failing with
  "database is locked" when a read lock cannot be upgraded, and DDL is transactional.
* **PostgreSQL** through psycopg 3, with a connection pool (``pool_size``, ``max_overflow``,
  ``pool_pre_ping``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from qflare.errors import ConfigError

__all__ = ["DATABASE_URL_ENV", "MIGRATIONS_DIR", "SQLITE_FILENAME", "Database"]

DATABASE_URL_ENV = "QFLARE_DATABASE_URL"
SQLITE_FILENAME = "qflare.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_BEGIN_OPTION = "qflare_sqlite_begin"
_MIGRATION_LOCK_ID = 0x51F1A4E  # pg_advisory_xact_lock key serialising concurrent upgrades


def _normalise_url(raw: str) -> URL:
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL: {exc}") from exc
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "sqlite":
        if driver != "pysqlite":
            raise ConfigError(f"unsupported SQLite driver {driver!r}; use sqlite:///PATH")
        if url.database in (None, "", ":memory:") or (url.database or "").startswith("file::memory:"):
            raise ConfigError("an in-memory SQLite database is not durable; give a file path")
        return url
    if backend == "postgresql":
        if url.drivername == "postgresql":  # no driver named: use psycopg 3, the one we ship
            return url.set(drivername="postgresql+psycopg")
        if driver != "psycopg":
            raise ConfigError(f"unsupported PostgreSQL driver {driver!r}; use postgresql+psycopg://")
        return url
    raise ConfigError(f"unsupported database back end {backend!r}: use sqlite or postgresql")


class Database:
    """An engine plus session factories for one database URL."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        max_overflow: int = 10,
        pool_timeout: float = 30.0,
        busy_timeout_ms: int = 30_000,
        echo: bool = False,
    ) -> None:
        self._url = _normalise_url(url)
        self.dialect: str = self._url.get_backend_name()
        if self.dialect == "sqlite":
            Path(self._url.database or "").resolve().parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                self._url,
                echo=echo,
                connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=pool_timeout,
            )
            _install_sqlite_hooks(self.engine, busy_timeout_ms)
        else:
            self.engine = create_engine(
                self._url,
                echo=echo,
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=pool_timeout,
                pool_pre_ping=True,
                pool_recycle=1800,
            )
        self._write_engine = self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        self._read_sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(bind=self._write_engine, expire_on_commit=False)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, data_dir: Path | str, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Database:
        """``$QFLARE_DATABASE_URL`` if set, else SQLite at ``data_dir/qflare.db``."""
        env = os.environ if environ is None else environ
        url = env.get(DATABASE_URL_ENV, "").strip()
        if not url:
            path = Path(data_dir).expanduser().resolve() / SQLITE_FILENAME
            url = f"sqlite:///{path}"
        return cls(url, **kwargs)

    @property
    def url(self) -> str:
        """The URL with any password masked (safe to log)."""
        return self._url.render_as_string(hide_password=True)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def __repr__(self) -> str:
        return f"Database({self.url!r})"

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """A session inside one transaction: committed on normal exit, rolled back on error.

        ``write=False`` starts a deferred (shared) transaction on SQLite, which does not block
        writers; on PostgreSQL both kinds are identical.
        """
        factory = self._write_sessions if write else self._read_sessions
        with factory() as session, session.begin():
            yield session

    @contextmanager
    def connect(self, *, write: bool = True) -> Iterator[Connection]:
        """A Core connection inside one transaction (commit on exit, rollback on error)."""
        engine = self._write_engine if write else self.engine
        with engine.begin() as conn:
            yield conn

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- migrations ---------------------------------------------------------------------------

    def alembic_config(self) -> Config:
        """An Alembic ``Config`` built in code: no ``alembic.ini`` is needed in the CWD."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("path_separator", "os")
        return cfg

    def _run_alembic(self, fn: Any, revision: str) -> None:
        cfg = self.alembic_config()
        with self.connect(write=True) as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
            cfg.attributes["connection"] = conn
            fn(cfg, revision)

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema up to ``revision`` (default: the newest), in one transaction."""
        self._run_alembic(command.upgrade, revision)

    def downgrade(self, revision: str = "base") -> None:
        """Migrate the schema down to ``revision`` (default: empty), in one transaction."""
        self._run_alembic(command.downgrade, revision)

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at, ``None`` for an unmigrated database."""
        with self.connect(write=False) as conn:
            return MigrationContext.configure(conn).get_current_revision()


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
