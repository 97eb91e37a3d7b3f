"""Transports carry a device's request bytes to a coordinator: in-process here, HTTP in ``http``."""

from .inprocess import InProcessTransport

__all__ = ["InProcessTransport"]
