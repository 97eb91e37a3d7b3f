"""Backends for the storage tests: SQLite always, PostgreSQL on 127.0.0.1:5432 (required in CI)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qflare.storage import Database
from qflare.storage.testing import postgres_admin_url, postgres_unreachable, scratch_database

PG_ERROR = postgres_unreachable()
_PG_DOWN = f"PostgreSQL not reachable at {postgres_admin_url(masked=True)}: {PG_ERROR}"
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(PG_ERROR is not None and not os.environ.get("CI"), reason=_PG_DOWN),
        ],
    ),
]


@contextmanager
def scratch(backend: str, tmp_path: Path, *, migrate: bool = True) -> Iterator[Database]:
    """A throw-away database of ``backend``; in CI an unreachable PostgreSQL fails instead of skipping."""
    if backend == "postgresql" and PG_ERROR is not None:
        pytest.fail(_PG_DOWN + " (CI must test PostgreSQL)")
    with scratch_database(backend, tmp_path, migrate=migrate) as database:
        yield database


def race(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run ``fn(i)`` in ``n`` threads released together; return each result or the exception it raised."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return results
