"""Transports carry a device's request bytes to a coordinator: in-process here, HTTP in ``http``."""

from ..errors import CircuitOpenError, ServerUnavailableError, TransportError
from .http import CircuitBreaker, HttpTransport, RetryPolicy
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
