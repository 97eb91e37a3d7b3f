"""``qflare server --workers N``: N coordinator processes of one federation behind one listening socket.

The supervisor binds the port once and starts N ``qflare server --cluster`` children that inherit the
socket (``--listen-fd``); the kernel hands each new connection to one of them.  Every child is a full
worker of the cluster (:mod:`qflare.protocol.cluster`): they share the PostgreSQL database
(``QFLARE_DATABASE_URL``, required) and the blob store, and elect one leader among themselves.  The
supervisor holds no federation state: it restarts a worker that dies (a kill -9 loses nothing that was
acknowledged), waiting longer after each quick death (0.5 s doubling up to :data:`MAX_BACKOFF_S`: a
database or blob store outage must not become a restart storm), and, on SIGINT/SIGTERM, stops them all
gracefully.  Only at start -- before any worker has stayed up :data:`FAST_FAILURE_S` -- does a worker dying
quickly three times in a row (a configuration error) stop the supervisor instead.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from ..errors import ConfigError
from ..processes import stop_processes

__all__ = ["FAST_FAILURE_S", "MAX_BACKOFF_S", "bind_listener", "run_workers", "worker_command"]

_log = logging.getLogger("qflare.server")

FAST_FAILURE_S = 10.0
"""A worker that exits sooner than this after its start died quickly (backoff; at start, giving up)."""
MAX_BACKOFF_S = 30.0


def bind_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening TCP socket the workers share, inheritable by children."""
    try:
        sock = socket.create_server((host, port), backlog=backlog, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def worker_command(argv: Sequence[str], fd: int) -> list[str]:
    """The child's command line: this ``qflare server`` invocation (``argv``: what followed the program
    name) without ``--workers``, as a cluster worker serving the inherited descriptor ``fd``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "qflare", *out, "--cluster", "--listen-fd", str(fd)]


def run_workers(
    command: Sequence[str],
    workers: int,
    sock: socket.socket,
    *,
    graceful_timeout_s: float = 35.0,
    poll_s: float = 0.5,
    on_event: Callable[[str], None] | None = None,
) -> int:
    """Run ``workers`` children of ``command`` sharing ``sock`` until a signal or repeated fast failure;
    the exit status (0 after a requested stop)."""
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    say = on_event or (lambda message: _log.warning("%s", message))
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[subprocess.Popen[bytes] | None] = [None] * workers
    started = [0.0] * workers
    not_before = [0.0] * workers  # when a dead worker's slot may be started again
    fast_failures = [0] * workers
    settled = False  # some worker stayed up FAST_FAILURE_S: later quick deaths are outages, not set-up errors
    status = 0
    try:
        while not stopping:
            now = time.monotonic()
            for slot in range(workers):
                proc = children[slot]
                if proc is not None and proc.poll() is None:
                    settled = settled or now - started[slot] >= FAST_FAILURE_S
                    continue
                if proc is not None:  # it just died: note it, and when it may come back
                    lived = now - started[slot]
                    fast_failures[slot] = fast_failures[slot] + 1 if lived < FAST_FAILURE_S else 0
                    say(f"worker {slot} (pid {proc.pid}) exited with status {proc.returncode} after {lived:.1f} s")
                    if not settled and fast_failures[slot] >= 3:
                        say(f"worker {slot} failed three times in a row within {FAST_FAILURE_S:.0f} s: stopping")
                        stopping, status = True, 1
                        break
                    wait = (
                        min(MAX_BACKOFF_S, 0.5 * 2 ** max(fast_failures[slot] - 1, 0)) if fast_failures[slot] else 0.0
                    )
                    not_before[slot] = now + wait
                    children[slot] = None
                if now < not_before[slot]:
                    continue
                children[slot] = _start(command, sock.fileno())
                started[slot] = now
                if proc is not None or fast_failures[slot]:
                    say(f"worker {slot} restarted (pid {children[slot].pid})")  # type: ignore[union-attr]
            if not stopping:
                time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_processes([c for c in children if c is not None], graceful_timeout_s)
        sock.close()
    return status


def _start(command: Sequence[str], fd: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        pass_fds=(fd,),
        preexec_fn=_preexec(os.getpid()),
    )


def _preexec(parent: int) -> Callable[[], None]:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux), and its own
    process group (a Ctrl-C in the terminal reaches the supervisor, which stops the workers in order)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here, not in the forked child

    def preexec() -> None:
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the supervisor died before the request took effect
                os._exit(1)
        os.setpgrp()

    return preexec
