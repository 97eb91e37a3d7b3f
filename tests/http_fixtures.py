"""A coordinator and devices as real subprocesses (``python -m qflare server`` / ``client``) for HTTP tests."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qflare.federation import FederationSpec
from qflare.processes import CHILD_ENV, ChildProcesses, child_environment, client_command, free_port
from qflare.server.process import ServerProcess
from qflare.storage import Database, Store
from qflare.transport import HttpTransport

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
        strategy: str = "fedavg",
    ) -> None:
        self.root, self.data_dir = root, root / "server"
        self.spec = FederationSpec(
            dataset=dataset,
            model=model,
            devices=devices,
            rounds=rounds,
            per_round=per_round,
            seed=seed,
            partition=partition,
            strategy=strategy,
            round_timeout_s=120.0,
        )
        self.port = free_port()
        self.admin = secrets.token_urlsafe(24)
        self.env = child_environment({**CHILD_ENV, "QFLARE_ADMIN_TOKEN": self.admin})
        self.children = ChildProcesses()
        self.servers: dict[str, ServerProcess] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ processes
    def start_server(self, name: str = "server", args: Sequence[str] = ()) -> ServerProcess:
        """A server on this federation's data dir and port (a restart after a crash reuses both);
        ``args`` are further ``qflare server`` options."""
        server = ServerProcess(
            self.spec,
            args=args,
            data_dir=self.data_dir,
            port=self.port,
            admin_token=self.admin,
            env=self.env,  # what the test set (e.g. a plugin on PYTHONPATH) reaches the server too
            log_path=self.root / "logs" / f"{name}.log",
            ready_timeout_s=60.0,
        )
        self.servers[name] = server
        return server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> HttpTransport:
        return self._server().api

    def _server(self) -> ServerProcess:
        assert self.servers, "no server started"
        return list(self.servers.values())[-1]

    def wait_ready(self, name: str = "server") -> None:
        self.servers[name].wait_ready()

    def state_dir(self, index: int) -> Path:
        return self.root / f"device-{index}"

    def start_device(self, index: int, token: str | None, *, poll_interval: float = 0.2) -> subprocess.Popen[bytes]:
        server = self._server()
        argv = client_command(
            server_url=self.url,
            federation_file=server.federation_file,
            key_file=server.key_file,
            state_dir=self.state_dir(index),
            index=index,
            poll_interval_s=poll_interval,
            give_up_after_s=60.0,
        )
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
        return self._server().tokens(count, label="test")

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
        server = self.servers[name]
        rc = server.stop(timeout_s=15.0)
        log = server.log_tail(10)
        assert rc in (0, -signal.SIGTERM) and "shutdown complete" in log.lower(), f"exit {rc}:\n{log}"

    def logs_tail(self) -> str:
        logs = [(n, s.log_tail(20)) for n, s in self.servers.items()]
        logs += [(n, self.children.tail(n, 20)) for n in self.children.procs]
        return "\n".join(f"--- {n}\n{text}" for n, text in logs)

    def store(self) -> tuple[Database, Store]:
        db = Database.from_env(self.data_dir, {})
        return db, Store(db)

    def receipts(self, index: int) -> list[dict[str, Any]]:
        path = self.state_dir(index) / "receipts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def close(self) -> None:
        self.children.close()
        for server in self.servers.values():
            server.close()
