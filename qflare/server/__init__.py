"""QFLARE coordinator server: runtime, HTTP API v1 (FastAPI), storage, metrics.

The public names are imported lazily: :mod:`qflare.protocol` imports :mod:`qflare.server.storage`, which
loads this package first, and the server modules in turn import the protocol.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServerConfig", "ServerRuntime", "HttpLimits", "create_app", "serve", "tls_report"]

_WHERE = {
    "ServerConfig": ".runtime",
    "ServerRuntime": ".runtime",
    "HttpLimits": ".limits",
    "create_app": ".app",
    "serve": ".launch",
    "tls_report": ".launch",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
