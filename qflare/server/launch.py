"""Serving the app with uvicorn, optionally over TLS (defence in depth), until SIGINT/SIGTERM.

The post-quantum guarantee of QFLARE comes from the application layer (ML-KEM + X25519 handshake,
ML-DSA signatures, AES-256-GCM channel), not from TLS.  When the OpenSSL that Python's ``ssl`` module
links offers the hybrid group ``X25519MLKEM768`` *and* Python exposes ``SSLContext.set_groups`` (added
after 3.13), the server prefers it; :func:`tls_report` says what this interpreter can do.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from ..errors import ConfigError
from .app import create_app
from .logs import PeerLoggingProtocol
from .runtime import ServerRuntime

__all__ = ["PQ_GROUPS", "TlsReport", "prefer_pq_groups", "serve", "tls_report"]

PQ_GROUPS = ("X25519MLKEM768", "X25519", "secp256r1", "secp384r1")
"""Key-exchange groups in order of preference (hybrid post-quantum first)."""


@dataclass(frozen=True)
class TlsReport:
    openssl: str
    set_groups_api: bool
    """Python's ssl module can set the TLS key-exchange groups (``SSLContext.set_groups``)."""
    pq_group: str | None
    """The hybrid group the server would negotiate first, or None when it cannot."""


def prefer_pq_groups(ctx: ssl.SSLContext) -> str | None:
    """Put ``X25519MLKEM768`` first in ``ctx``'s groups if possible; return it, else None (unchanged).

    Python <= 3.14 has only ``set_ecdh_curve``, which takes one classic EC curve name (it cannot even
    name X25519, and cannot name a list), so there the preference cannot be expressed.
    """
    set_groups = getattr(ctx, "set_groups", None)
    if set_groups is None:
        return None
    try:
        set_groups(":".join(PQ_GROUPS))
    except (ssl.SSLError, ValueError):  # the linked OpenSSL lacks the hybrid group (OpenSSL < 3.5)
        return None
    return PQ_GROUPS[0]


def tls_report() -> TlsReport:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return TlsReport(ssl.OPENSSL_VERSION, hasattr(ctx, "set_groups"), prefer_pq_groups(ctx))


def _context_factory(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    ctx = default()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    prefer_pq_groups(ctx)
    return ctx


def serve(
    runtime: ServerRuntime,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    log_level: str = "info",
    graceful_timeout_s: int = 30,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM: stop accepting, let in-flight requests finish (up to
    ``graceful_timeout_s``), then stop the round loop and evaluator and close the database.  ``sock``:
    an already listening socket to serve instead of binding ``host:port`` (a worker of
    ``qflare server --workers N``, :mod:`qflare.server.workers`)."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    config = uvicorn.Config(
        create_app(runtime),
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        ssl_context_factory=_context_factory if tls_cert else None,
        proxy_headers=False,  # rate limits and events use the TCP peer address, never a client's header
        server_header=False,
        log_level=log_level,
        log_config=None,  # qflare.server.logs.configure_logging owns the handlers: one format
        http=PeerLoggingProtocol,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout_s,
    )
    server = uvicorn.Server(config)
    sockets = None if sock is None else [sock]
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=sockets)
        return
    # uvicorn re-raises the signal that stopped it once shutdown is complete; answer it with exit status
    # 0, since the shutdown was the graceful one that was asked for.
    previous = {sig: signal.signal(sig, _exit_cleanly) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
