"""Shared test setup: every test leaves the global registries and the logging set-up as it found them.

The test order is random (pytest-randomly), so a name one test registers (a model, strategy, data set,
selector or aggregator) must not leak into another test's view of the registries (e.g. the CLI's help
listing every registered model), and a command run in process that configures logging for what it takes
to be its own process (``qflare server``: a root handler on the current stderr at INFO) must not put log
lines into a later test's captured CLI output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from qflare.data import sources
from qflare.models import _REGISTRY as MODELS
from qflare.protocol import selection
from qflare.strategy import aggregators, pipeline

_REGISTRIES = (MODELS, pipeline._REGISTRY, sources._REGISTRY, selection._REGISTRY, aggregators._REGISTRY)


@pytest.fixture(autouse=True)
def _registries_restored() -> Iterator[None]:
    saved = [(registry, registry.snapshot()) for registry in _REGISTRIES]
    yield
    for registry, state in saved:
        registry.restore(state)


def _from_pytest(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, [h for h in root.handlers if not _from_pytest(h)]
    loggers = logging.root.manager.loggerDict
    levels = {name: lg.level for name, lg in loggers.items() if isinstance(lg, logging.Logger)}
    yield
    for h in list(root.handlers):
        if not _from_pytest(h) and h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    for name, lg in list(loggers.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))
