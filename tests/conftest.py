"""Shared test setup: every test leaves the global registries as it found them.

The test order is random (pytest-randomly), so a name one test registers (a model, strategy, data set,
selector or aggregator) must not leak into another test's view of the registries (e.g. the CLI's help
listing every registered model).
"""

from __future__ import annotations

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
