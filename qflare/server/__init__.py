"""QFLARE coordinator server: runtime, HTTP API v1 (FastAPI), metrics.  Storage is :mod:`qflare.storage`."""

from .app import create_app
from .launch import serve, tls_report
from .limits import HttpLimits
from .runtime import ServerConfig, ServerRuntime

__all__ = ["HttpLimits", "ServerConfig", "ServerRuntime", "create_app", "serve", "tls_report"]
