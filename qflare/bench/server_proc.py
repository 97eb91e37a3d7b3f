"""A coordinator server as a subprocess of a benchmark: temp data dir, admin token, pinned key, clean stop.

:class:`ServerProcess` runs ``python -m qflare server`` on loopback with a fresh data directory (SQLite,
blobs, keys) and an admin token it chose (``QFLARE_ADMIN_TOKEN``).  A benchmark reads the coordinator's
key id from ``DATA_DIR/coordinator.keyid`` - the out-of-band pin an operator hands to devices - and
checks ``GET /v1/identity`` against it before any device talks to the server.
``--min-devices`` holds the first round until the whole federation has enrolled, so the server samples
from all of it, as the in-process simulation does.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..config import MALLOC_ENV
from ..crypto import VerifyKey
from ..errors import AuthError, QflareError
from ..server.credentials import KEYID_FILE
from ..storage.db import SQLITE_FILENAME
from ..transport import HttpTransport, RetryPolicy

__all__ = ["ServerProcess", "ServerSpec", "free_port", "pin_server_key"]

_UNLIMITED_RATE = 1_000_000.0
"""Every benchmark client shares 127.0.0.1, so the per-address rate limit would throttle the whole fleet."""


@dataclass(frozen=True)
class ServerSpec:
    """What the benchmark server runs (the ``qflare server`` options it is started with)."""

    dataset: str = "fashion-mnist"
    model: str = "fedavg-cnn"
    rounds: int = 1
    per_round: int = 10
    min_devices: int = 1
    seed: int = 0
    strategy: str = "fedavg"
    round_timeout_s: float = 3600.0
    max_uploads: int = 8
    data_root: str | None = None

    def cli_args(self) -> list[str]:
        args = [
            "--dataset",
            self.dataset,
            "--model",
            self.model,
            "--rounds",
            str(self.rounds),
            "--per-round",
            str(self.per_round),
            "--min-devices",
            str(self.min_devices),
            "--seed",
            str(self.seed),
            "--strategy",
            self.strategy,
            "--round-timeout",
            str(self.round_timeout_s),
            "--no-eval",
            "--max-uploads",
            str(self.max_uploads),
            "--rate",
            str(_UNLIMITED_RATE),
            "--session-rate",
            str(_UNLIMITED_RATE),
            "--log-level",
            "warning",
        ]
        return args + (["--data-root", self.data_root] if self.data_root else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_server_key(api: HttpTransport, key_id: str) -> VerifyKey:
    """The coordinator's public key from ``/v1/identity``, refused unless its key id is ``key_id``."""
    info = api.get_json("/v1/identity")
    key = VerifyKey.from_bytes(info["alg"], bytes.fromhex(info["public_key"]))
    if key.key_id != key_id or info.get("key_id") != key_id:
        raise AuthError(
            f"server key {key.key_id[:16]}... is not the pinned {key_id[:16]}...", code="server_key_mismatch"
        )
    return key


class ServerProcess:
    """One benchmark server (see the module docstring); a context manager that always stops it."""

    def __init__(self, spec: ServerSpec, *, ready_timeout_s: float = 180.0) -> None:
        self.spec, self.ready_timeout_s = spec, ready_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="qflare-bench-server-")
        self.data_dir = Path(self._tmp.name) / "server"
        self.log_path = Path(self._tmp.name) / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = HttpTransport(self.url, timeout=60.0, retry=RetryPolicy(attempts=3, initial_s=0.1, max_wait_s=1.0))

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / SQLITE_FILENAME}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "QFLARE_DATABASE_URL"}
        env.update(MALLOC_ENV, QFLARE_ADMIN_TOKEN=self.admin_token, PYTHONUNBUFFERED="1")
        argv = [
            sys.executable,
            "-m",
            "qflare",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.spec.cli_args(),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        """Until ``/readyz`` answers 200 (the server exiting first is an error)."""
        assert self.proc is not None, "server not started"
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if (rc := self.proc.poll()) is not None:
                raise QflareError(f"benchmark server exited with {rc}:\n{self.log_tail()}")
            try:
                self.api.get_json("/readyz")
                return
            except QflareError:
                self.api.breaker.record_success()
                time.sleep(0.1)
        raise QflareError(f"benchmark server not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def key_id(self) -> str:
        """The pin, read out of band from the server's data directory."""
        return (self.data_dir / KEYID_FILE).read_text(encoding="ascii").strip()

    def status(self) -> dict[str, object]:
        return dict(self.api.get_json("/v1/status"))

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish, the database is closed), SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self.api.close()
            self._tmp.cleanup()
