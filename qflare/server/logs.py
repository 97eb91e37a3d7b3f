"""One logging configuration for the server process: QFLARE's and uvicorn's records in one format.

``uvicorn.Config(log_config=None)`` keeps uvicorn from installing its own handlers, so every record
(``qflare.*``, ``uvicorn.error``, ``uvicorn.access``) goes through the root handler configured here.
Alembic's per-migration INFO lines are hidden (warnings still show).  uvicorn's "Invalid HTTP request
received." warning does not name the peer; :class:`PeerLoggingProtocol` adds the peer address to every
record the connection's protocol logs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # httptools: a dependency

__all__ = ["LOG_FORMAT", "PeerLoggingProtocol", "configure_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QUIET = ("alembic", "alembic.runtime.migration")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as :data:`logging.lastResort` does), so
    a command run in-process with a replaced stderr (tests, embedding) never leaves a handler on a closed
    stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str = "info") -> None:
    """Route every logger to one stderr handler with :data:`LOG_FORMAT` at ``level``."""
    name = level.upper()
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")  # uvicorn's level below DEBUG (uvicorn names it the same way)
    if not isinstance(logging.getLevelName(name), int):
        from ..errors import ConfigError

        raise ConfigError(f"unknown log level {level!r}: use trace, debug, info, warning, error or critical")
    # Not logging.config.dictConfig: it shuts down every handler that exists (closing the streams of
    # foreign ones, e.g. absl's, which may be a test harness's capture), not only the root's.
    formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = _CurrentStderrHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(name)
    # uvicorn's own loggers: no handlers of their own, records reach the root handler
    for logger_name, logger_level in (
        *((n, name) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")),
        *((q, "WARNING") for q in _QUIET),
    ):
        logger = logging.getLogger(logger_name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.setLevel(logger_level)
        logger.propagate = True
        logger.disabled = False


class _PeerAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each message with the connection's peer address (read when the record is made)."""

    def __init__(self, logger: logging.Logger, protocol: Any) -> None:
        super().__init__(logger, {})
        self._protocol = protocol

    @property
    def level(self) -> int:  # uvicorn reads ``logger.level`` before its TRACE lines
        return self.logger.level

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        client = getattr(self._protocol, "client", None)
        if client and not str(msg).startswith("%s"):  # uvicorn's TRACE lines carry their own prefix
            return f"{client[0]}:{client[1]} - {msg}", kwargs
        return msg, kwargs


class PeerLoggingProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol whose warnings ("Invalid HTTP request received.") name the peer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger: Any = _PeerAdapter(logging.getLogger("uvicorn.error"), self)
