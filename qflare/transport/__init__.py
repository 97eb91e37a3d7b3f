"""Transports carry a device's request bytes to a coordinator: in-process here, HTTP in ``http``."""

from .http import CircuitBreaker, CircuitOpenError, HttpTransport, RetryPolicy, ServerUnavailableError, TransportError
from .inprocess import InProcessTransport

__all__ = [
    "CircuitBreaker",
    "CircuitOpenError",
    "HttpTransport",
    "InProcessTransport",
    "RetryPolicy",
    "ServerUnavailableError",
    "TransportError",
]
