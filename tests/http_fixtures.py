"""A coordinator and devices as real subprocesses (``python -m qflare server`` / ``client``) for HTTP tests."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qflare.demo import CHILD_ENV, ChildProcesses, free_port
from qflare.errors import QflareError
from qflare.storage import Database, Store
from qflare.transport import HttpTransport, RetryPolicy

__all__ = ["Federation"]


class Federation:
    """One server data dir + port, and device state dirs under ``root`` (small digits/MLP by default)."""

    def __init__(
        self,
        root: Path,
        *,
        devices: int = 3,
        rounds: int = 2,
        per_round: int = 3,
        seed: int = 0,
        dataset: str = "digits",
        model: str = "mlp",
        partition: str = "iid",
    ) -> None:
        self.root, self.data_dir = root, root / "server"
        self.devices, self.rounds, self.per_round, self.seed = devices, rounds, per_round, seed
        self.dataset, self.model, self.partition = dataset, model, partition
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if k not in ("QFLARE_DATABASE_URL", "QFLARE_ADMIN_TOKEN")}
        self.env = {**env, **CHILD_ENV, "QFLARE_ADMIN_TOKEN": self.admin}
        self.children = ChildProcesses()
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.api = HttpTransport(self.url, timeout=10.0, retry=RetryPolicy(attempts=3, initial_s=0.1, max_wait_s=0.5))

    # ------------------------------------------------------------------ processes
    def start_server(self, name: str = "server") -> subprocess.Popen[bytes]:
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
            "--dataset",
            self.dataset,
            "--model",
            self.model,
            "--rounds",
            str(self.rounds),
            "--per-round",
            str(self.per_round),
            "--min-devices",
            str(self.devices),
            "--seed",
            str(self.seed),
            "--round-timeout",
            "120",
        ]
        return self.children.start(name, argv, self.root / "logs" / f"{name}.log", self.env)

    def wait_ready(self, name: str = "server", timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rc = self.children.procs[name].poll()
            assert rc is None, f"server exited with {rc}:\n{self.children.tail(name, 40)}"
            try:
                self.api.get_json("/readyz")
                return
            except QflareError:
                self.api.breaker.record_success()
                time.sleep(0.2)  # real time: the server is a real process
        raise AssertionError(f"server not ready after {timeout_s} s:\n{self.children.tail(name, 40)}")

    def state_dir(self, index: int) -> Path:
        return self.root / f"device-{index}"

    def start_device(self, index: int, token: str | None, *, poll_interval: float = 0.2) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "qflare",
            "client",
            "--server",
            self.url,
            "--server-key-file",
            str(self.data_dir / "coordinator.keyid"),
            "--state-dir",
            str(self.state_dir(index)),
            "--dataset",
            self.dataset,
            "--model",
            self.model,
            "--partition",
            self.partition,
            "--devices",
            str(self.devices),
            "--index",
            str(index),
            "--seed",
            str(self.seed),
            "--threads",
            "1",
            "--poll-interval",
            str(poll_interval),
            "--give-up-after",
            "60",
        ]
        env = {**self.env, "QFLARE_ENROLL_TOKEN": token} if token else self.env
        return self.children.start(f"device-{index}", argv, self.root / "logs" / f"device-{index}.log", env)

    # ------------------------------------------------------------------ admin and views
    def tokens_via_cli(self, count: int) -> list[str]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "qflare",
                "token",
                "create",
                "--data-dir",
                str(self.data_dir),
                "--expires",
                "1h",
                "--count",
                str(count),
                "--json",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        tokens = doc["tokens"] if isinstance(doc, dict) else doc
        assert len(tokens) == count and all(isinstance(t, str) for t in tokens)
        return list(tokens)

    def tokens_via_api(self, count: int) -> list[str]:
        doc = self.api.post_json(
            "/v1/admin/tokens",
            {"count": count, "ttl_s": 3600, "label": "test"},
            headers={"Authorization": f"Bearer {self.admin}"},
        )
        return list(doc["tokens"])

    def status(self) -> dict[str, Any]:
        return dict(self.api.get_json("/v1/status"))

    def wait_status(
        self, pred: Callable[[dict[str, Any]], bool], timeout_s: float, poll_s: float = 0.1
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if pred(status):
                return status
            time.sleep(poll_s)  # real time: the server and devices are real processes
        raise AssertionError(f"status condition not met in {timeout_s} s; last status {status}\n{self.logs_tail()}")

    def wait_exit(self, names: list[str], timeout_s: float) -> dict[str, int | None]:
        codes = self.children.wait(names, timeout_s)
        bad = [n for n, rc in codes.items() if rc != 0]
        assert not bad, f"exit codes {codes}\n" + "\n".join(f"--- {n}\n{self.children.tail(n, 30)}" for n in bad)
        return codes

    def assert_clean_shutdown(self, name: str) -> None:
        """SIGTERM the server: it must finish its shutdown in time.  uvicorn re-raises the signal after a
        graceful shutdown, so the status is 0 or -SIGTERM; the log shows the shutdown completed."""
        proc = self.children.procs[name]
        proc.terminate()
        rc = proc.wait(15)
        log = self.children.tail(name, 10)
        assert rc in (0, -signal.SIGTERM) and "shutdown complete" in log.lower(), f"exit {rc}:\n{log}"

    def logs_tail(self) -> str:
        return "\n".join(f"--- {n}\n{self.children.tail(n, 20)}" for n in self.children.procs)

    def store(self) -> tuple[Database, Store]:
        db = Database.from_env(self.data_dir, {})
        return db, Store(db)

    def receipts(self, index: int) -> list[dict[str, Any]]:
        path = self.state_dir(index) / "receipts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def close(self) -> None:
        self.api.close()
        self.children.close()
