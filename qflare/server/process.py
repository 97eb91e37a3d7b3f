"""A coordinator as a child process: ``python -m qflare server`` on loopback, started, awaited and stopped.

:class:`ServerProcess` is the one launcher of the demo, the benchmarks and the HTTP tests.  It writes
the federation spec into the data directory (``federation.json``, which the server and its devices
read with ``--federation``), chooses the admin token (``QFLARE_ADMIN_TOKEN``), starts the server on
a free loopback port with its output in a log file, waits for ``/readyz``, and stops it with SIGTERM
(graceful: in-flight requests finish, the database is closed), then SIGKILL after a timeout.  The key
id devices pin is read out of band from ``DATA_DIR/coordinator.keyid``, never from the server's answer.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ..config import MALLOC_ENV
from ..errors import QflareError
from ..federation import FederationSpec
from ..processes import child_environment, free_port, log_tail, spawn, stop_processes
from ..storage.db import DATABASE_URL_ENV, SQLITE_FILENAME
from ..transport import HttpTransport, RetryPolicy
from .credentials import ADMIN_TOKEN_ENV, KEYID_FILE

__all__ = ["FEDERATION_FILE", "ServerProcess"]

FEDERATION_FILE = "federation.json"


class ServerProcess:
    """One ``qflare server`` child (see the module docstring); a context manager that always stops it.

    ``data_dir`` None: a temporary one, removed on :meth:`close`.  ``min_devices`` None: the whole
    federation (``federation.devices``) must enroll before the first round, so the server samples from
    all of it as the in-process simulation does.  ``args`` are further ``qflare server`` options of
    this process (``--no-eval``, ``--max-uploads N``, ...); ``env`` is added to its environment."""

    def __init__(
        self,
        federation: FederationSpec,
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        min_devices: int | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        admin_token: str | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 180.0,
        python: str = sys.executable,
        database_url: str | None = None,
    ) -> None:
        self.federation = federation
        self._database_url = database_url
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qflare-server-")
            data_dir = Path(self._tmp.name) / "server"
        self.data_dir = Path(data_dir).resolve()
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        self.min_devices = federation.devices if min_devices is None else min_devices
        self.args, self.env, self.python = list(args), dict(env or {}), python
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.api = HttpTransport(self.url, timeout=60.0, retry=RetryPolicy(attempts=3, initial_s=0.1, max_wait_s=1.0))

    # ------------------------------------------------------------------ files the server and devices share
    @property
    def federation_file(self) -> Path:
        return self.data_dir / FEDERATION_FILE

    @property
    def key_file(self) -> Path:
        """``coordinator.keyid``: what a device pins (``qflare client --server-key-file``)."""
        return self.data_dir / KEYID_FILE

    @property
    def database_url(self) -> str:
        """The server's database: the one given (``QFLARE_DATABASE_URL`` of the child), else its SQLite file."""
        return self._database_url or f"sqlite:///{self.data_dir / SQLITE_FILENAME}"

    def key_id(self) -> str:
        """The pin, read out of band from the server's data directory."""
        return self.key_file.read_text(encoding="ascii").strip()

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "qflare",
            "server",
            "--federation",
            str(self.federation_file),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--min-devices",
            str(self.min_devices),
            *self.args,
        ]

    def start(self) -> ServerProcess:
        """Start the server (not waiting for it: see :meth:`wait_ready`)."""
        if self.proc is not None:
            raise QflareError("this server process was already started; make a new ServerProcess to restart")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.federation.save(self.federation_file)
        extra = {**MALLOC_ENV, "PYTHONUNBUFFERED": "1", **self.env, ADMIN_TOKEN_ENV: self.admin_token}
        if self._database_url is not None:
            extra[DATABASE_URL_ENV] = self._database_url
        env = child_environment(extra)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = spawn(self.command(), self._log, env)
        return self

    @property
    def pid(self) -> int:
        return self._started().pid

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise QflareError("the server process has not been started")
        return self.proc

    def poll(self) -> int | None:
        return self._started().poll()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def wait_ready(self, timeout_s: float | None = None) -> ServerProcess:
        """Until ``/readyz`` answers 200; the server exiting first, or the timeout, is a QflareError."""
        proc, limit = self._started(), self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        with HttpTransport(self.url, timeout=5.0, retry=RetryPolicy(attempts=1)) as probe:
            while time.monotonic() < deadline:
                if (rc := proc.poll()) is not None:
                    raise QflareError(
                        f"the coordinator exited with status {rc}:\n{self.log_tail()}", code="server_exited"
                    )
                try:
                    probe.get_json("/readyz")
                    return self
                except QflareError:
                    probe.breaker.record_success()  # polling a server that is still starting is not a failure
                    time.sleep(0.1)
        raise QflareError(
            f"the coordinator was not ready after {limit:.0f} s:\n{self.log_tail()}", code="server_not_ready"
        )

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit status (None when never started).

        uvicorn re-raises the signal after a graceful shutdown, so a clean stop is 0 or -SIGTERM."""
        if self.proc is None:
            return None
        stop_processes([self.proc], timeout_s)
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL now, as a crash would (no shutdown at all); the exit status."""
        proc = self._started()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        return proc.wait()

    def close(self) -> None:
        """Stop the server, close the log and the API client, remove a temporary data directory."""
        try:
            self.stop()
        finally:
            self.api.close()
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ the admin and status API
    def status(self) -> dict[str, Any]:
        return dict(self.api.get_json("/v1/status"))

    def tokens(self, count: int, *, ttl_s: float = 3600.0, label: str = "launcher") -> list[str]:
        """``count`` one-time enrollment tokens from ``POST /v1/admin/tokens``."""
        body = self.api.post_json(
            "/v1/admin/tokens",
            {"count": count, "ttl_s": ttl_s, "label": label},
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        tokens = [t for t in body.get("tokens", []) if isinstance(t, str)]
        if len(tokens) != count:
            raise QflareError(f"asked the admin API for {count} enrollment tokens, got {len(tokens)}")
        return tokens
