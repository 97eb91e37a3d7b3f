"""Child processes QFLARE starts itself: spawning, supervising and stopping them, and a device's command.

Every child is started with its output in a log file, in its own session, and with
``PR_SET_PDEATHSIG`` (Linux) so it never outlives the process that started it, even one killed by
SIGKILL.  Stopping is SIGTERM, a grace period, then SIGKILL (and the child is always reaped).
:class:`~qflare.server.process.ServerProcess` runs a coordinator this way; :func:`client_command` is the
``qflare client`` command line of one device of a federation, whose workload it reads from the
federation spec file (:meth:`~qflare.federation.FederationSpec.save`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from .config import MALLOC_ENV

__all__ = [
    "CHILD_ENV",
    "ChildProcesses",
    "child_environment",
    "client_command",
    "free_port",
    "log_tail",
    "spawn",
    "stop_processes",
]

CHILD_ENV: dict[str, str] = {
    # glibc: keep freed tensor memory in the process instead of returning it page by page (N processes
    # on a small machine spend much less time in mmap/munmap and page faults this way).
    **MALLOC_ENV,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
"""The environment of device processes sharing one machine (one torch thread each)."""

_NOT_INHERITED = ("QFLARE_DATABASE_URL", "QFLARE_ADMIN_TOKEN", "QFLARE_ENROLL_TOKEN")
"""A child gets its database, admin token and enrollment token from its launcher, never from ours."""


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without QFLARE's per-process secrets and settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when this process dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


_PREEXEC = _die_with_parent()


def spawn(argv: Sequence[str], log: IO[bytes], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr in ``log``, in its own session, dying with this process."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
        preexec_fn=_PREEXEC,
    )


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM each one still running, wait up to ``timeout_s`` in all, then SIGKILL (and reap) the rest."""
    chosen = list(procs)
    for p in chosen:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in chosen:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def log_tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ChildProcesses:
    """Named subprocesses with their output in log files; :meth:`close` leaves none behind."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        fh = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._files.append(fh)
        proc = spawn(argv, fh, env)
        self.procs[name], self.logs[name] = proc, log_path
        return proc

    def exited(self) -> dict[str, int]:
        return {n: rc for n, p in self.procs.items() if (rc := p.poll()) is not None}

    def tail(self, name: str, lines: int = 15) -> str:
        return log_tail(self.logs[name], lines)

    def wait(self, names: Sequence[str], timeout_s: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout_s
        out: dict[str, int | None] = {}
        for n in names:
            try:
                out[n] = self.procs[n].wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                out[n] = None
        return out

    def stop(self, names: Sequence[str] | None = None, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL whatever is left (and reap it)."""
        stop_processes([self.procs[n] for n in (names if names is not None else list(self.procs))], timeout_s)

    def close(self) -> None:
        self.stop()
        for fh in self._files:
            fh.close()
        self._files.clear()


def client_command(
    *,
    server_url: str,
    federation_file: Path,
    key_file: Path,
    state_dir: Path,
    index: int,
    threads: int = 1,
    poll_interval_s: float = 1.0,
    give_up_after_s: float | None = None,
    python: str = sys.executable,
) -> list[str]:
    """``qflare client`` for device ``index`` of the federation in ``federation_file``, pinned to the key
    id in ``key_file`` (the server's ``coordinator.keyid``).  The enrollment token goes in its environment
    (``QFLARE_ENROLL_TOKEN``), never on a command line."""
    argv = [
        python,
        "-m",
        "qflare",
        "client",
        "--federation",
        str(federation_file),
        "--server",
        server_url,
        "--server-key-file",
        str(key_file),
        "--state-dir",
        str(state_dir),
        "--index",
        str(index),
        "--threads",
        str(threads),
        "--poll-interval",
        f"{poll_interval_s:g}",
    ]
    return argv + (["--give-up-after", f"{give_up_after_s:g}"] if give_up_after_s is not None else [])
