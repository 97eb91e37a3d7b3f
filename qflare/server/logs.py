"""One logging configuration for the server process: QFLARE's and uvicorn's records in one format.

``uvicorn.Config(log_config=None)`` keeps uvicorn from installing its own handlers, so every record
(``qflare.*``, ``uvicorn.error``, ``uvicorn.access``) goes through the root handler configured here.
Alembic's per-migration INFO lines are hidden (warnings still show).  uvicorn's "Invalid HTTP request
received." warning does not name the peer; :class:`PeerLoggingProtocol` adds the peer address to every
record the connection's protocol logs.

Two formats: ``text`` (:data:`LOG_FORMAT`) and ``json`` (one JSON object a line, :class:`JsonFormatter`),
which adds the request id (:func:`bind_request`, also answered in ``X-Request-Id``) and the round a
record is about (:func:`bind_round`; for a request, the round open when it arrived), both held in
context variables, so a record made in a worker thread serving the request carries them too.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # httptools: a dependency

__all__ = [
    "LOG_FORMAT",
    "LOG_FORMATS",
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "PeerLoggingProtocol",
    "bind_request",
    "bind_round",
    "configure_logging",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
REQUEST_ID_HEADER = b"x-request-id"
"""The response header naming the request id its log records carry (ASGI: lower-case bytes)."""
_QUIET = ("alembic", "alembic.runtime.migration")
_REQUEST_ID: ContextVar[str | None] = ContextVar("qflare_request_id", default=None)
_ROUND: ContextVar[int | None] = ContextVar("qflare_round", default=None)


def bind_request(open_round: int | None) -> tuple[str, Callable[[], None]]:
    """A new request id (16 hex digits, made here: a client's own ``X-Request-Id`` is never taken) and
    ``open_round`` bound to the current context; returns the id and the function that unbinds both."""
    request_id = secrets.token_hex(8)
    id_token, round_token = _REQUEST_ID.set(request_id), _ROUND.set(open_round)

    def reset() -> None:
        _ROUND.reset(round_token)
        _REQUEST_ID.reset(id_token)

    return request_id, reset


def bind_round(number: int | None) -> Callable[[], None]:
    """Bind the round the following records are about to the current context; returns the unbinder."""
    token = _ROUND.set(number)
    return lambda: _ROUND.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, then
    ``request_id`` and ``round`` when bound, ``client``/``method``/``path``/``status`` for uvicorn's access
    records, and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := _REQUEST_ID.get()) is not None:
            out["request_id"] = request_id
        if (number := _ROUND.get()) is not None:
            out["round"] = number
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _version, status = record.args
            out.update(client=str(client), method=str(method), path=str(path), status=status)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


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


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Route every logger to one stderr handler at ``level``, in format ``fmt`` (:data:`LOG_FORMATS`)."""
    from ..errors import ConfigError

    name = level.upper()
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")  # uvicorn's level below DEBUG (uvicorn names it the same way)
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(f"unknown log level {level!r}: use trace, debug, info, warning, error or critical")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}: use {' or '.join(LOG_FORMATS)}")
    # Not logging.config.dictConfig: it shuts down every handler that exists (closing the streams of
    # foreign ones, e.g. absl's, which may be a test harness's capture), not only the root's.
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT)
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
