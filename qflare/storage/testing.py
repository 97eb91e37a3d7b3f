"""Scratch databases for tests (of this package and of code built on it).

``scratch_database("sqlite", tmp_dir)`` gives a file database under ``tmp_dir``;
``scratch_database("postgresql", tmp_dir)`` creates a uniquely named PostgreSQL database
(``qflare_test_<random>``) through the admin URL and drops it afterwards, so concurrent test runs
never share state.  The admin URL is ``$QFLARE_TEST_POSTGRES_URL`` (as ``.ci/run`` sets it) or
the local default.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from qflare.storage.db import Database

__all__ = [
    "ADMIN_URL_ENV",
    "DEFAULT_POSTGRES_ADMIN_URL",
    "postgres_admin_url",
    "postgres_unreachable",
    "scratch_database",
    "temporary_postgres_database",
]

ADMIN_URL_ENV = "QFLARE_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_admin_url(*, masked: bool = False) -> str:
    """``$QFLARE_TEST_POSTGRES_URL`` or the local default; ``masked`` hides any password."""
    url = os.environ.get(ADMIN_URL_ENV, "").strip() or DEFAULT_POSTGRES_ADMIN_URL
    return make_url(url).render_as_string(hide_password=True) if masked else url


def postgres_unreachable(admin_url: str | None = None) -> str | None:
    """``None`` if we can connect to ``admin_url``, else the error text (for a skip message)."""
    engine = create_engine(admin_url or postgres_admin_url(), poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except SQLAlchemyError as exc:
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


@contextmanager
def temporary_postgres_database(admin_url: str | None = None, prefix: str = "qflare_test_") -> Iterator[str]:
    """Create a uniquely named empty database, yield its URL, drop it (forcibly) afterwards."""
    admin_url = admin_url or postgres_admin_url()
    name = f"{prefix}{secrets.token_hex(6)}"
    admin = create_engine(
        admin_url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 3},
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def scratch_database(backend: str, tmp_dir: Path, *, migrate: bool = True) -> Iterator[Database]:
    """A fresh :class:`Database` of ``backend`` ("sqlite" or "postgresql"), upgraded to head."""
    if backend == "sqlite":
        db = Database(f"sqlite:///{Path(tmp_dir).resolve() / 'qflare.db'}")
        try:
            if migrate:
                db.upgrade()
            yield db
        finally:
            db.dispose()
    elif backend == "postgresql":
        with temporary_postgres_database() as url:
            db = Database(url)
            try:
                if migrate:
                    db.upgrade()
                yield db
            finally:
                db.dispose()
    else:
        raise ValueError(f"unknown backend {backend!r}")
