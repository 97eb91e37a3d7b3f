"""``qflare demo``: a whole federation on this machine - one coordinator and N device processes - over HTTP.

The demo is a real deployment in miniature: ``qflare server`` runs as a subprocess on SQLite in a data
directory, N one-time enrollment tokens are minted through the admin API, and N ``qflare client``
processes (own state directories, one torch thread each) enroll, run the post-quantum handshake, and
train the FedAvg CNN on their Dirichlet shards of Fashion-MNIST, with signed models, sealed and signed
updates and the coordinator's defences all on.  Progress is read from ``GET /v1/status``.

Children are started in their own session with ``PR_SET_PDEATHSIG`` (Linux), so they never outlive the
demo: on Ctrl-C, SIGTERM, an error or the normal end, the devices then the server are terminated,
waited for, and killed if they do not exit in time.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .config import MALLOC_ENV
from .errors import DemoError, QflareError
from .transport import HttpTransport, RetryPolicy, TransportError

__all__ = ["CHILD_ENV", "ChildProcesses", "DemoConfig", "DemoError", "DemoResult", "free_port", "run_demo"]

CHILD_ENV: dict[str, str] = {
    # glibc: keep freed tensor memory in the process instead of returning it page by page (N processes
    # on a small machine spend much less time in mmap/munmap and page faults this way).
    **MALLOC_ENV,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 10
    per_round: int = 5
    rounds: int = 5
    port: int | None = None
    data_dir: Path | None = None
    dataset: str = "fashion-mnist"
    model: str = "fedavg-cnn"
    seed: int = 0
    partition: str = "dirichlet"
    alpha: float = 0.5
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    data_root: str | None = None
    round_timeout_s: float = 300.0
    startup_timeout_s: float = 120.0
    timeout_s: float = 1800.0
    poll_interval_s: float = 0.5
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.devices < 1 or self.rounds < 1 or not 1 <= self.per_round <= self.devices:
            raise DemoError("need devices >= 1, rounds >= 1 and 1 <= per-round <= devices", code="config_error")


@dataclass
class DemoResult:
    url: str
    data_dir: Path
    history: list[dict[str, Any]]
    wall_s: float
    logs: list[Path] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return float(self.history[-1]["accuracy"])


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


class ChildProcesses:
    """Subprocesses with their output in log files; :meth:`stop` leaves none behind."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[IO[bytes]] = []
        self._preexec = _die_with_parent()

    def start(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        fh = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._files.append(fh)
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            preexec_fn=self._preexec,
        )
        self.procs[name], self.logs[name] = proc, log_path
        return proc

    def exited(self) -> dict[str, int]:
        return {n: rc for n, p in self.procs.items() if (rc := p.poll()) is not None}

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

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
        chosen = [self.procs[n] for n in (names if names is not None else list(self.procs))]
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

    def close(self) -> None:
        self.stop()
        for fh in self._files:
            fh.close()
        self._files.clear()


def _wait_ready(url: str, server: subprocess.Popen[bytes], children: ChildProcesses, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with HttpTransport(url, timeout=5.0, retry=RetryPolicy(attempts=1)) as probe:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise DemoError(f"the coordinator exited with status {server.returncode}:\n{children.tail('server')}")
            try:
                probe.get_json("/readyz")
                return
            except (TransportError, QflareError):
                probe.breaker.record_success()  # polling a server that is still starting is not a failure
                time.sleep(0.25)
    raise DemoError(f"the coordinator was not ready after {timeout_s:.0f} s:\n{children.tail('server')}")


def _server_argv(cfg: DemoConfig, port: int, data_dir: Path) -> list[str]:
    argv = [
        cfg.python,
        "-m",
        "qflare",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--dataset",
        cfg.dataset,
        "--model",
        cfg.model,
        "--rounds",
        str(cfg.rounds),
        "--per-round",
        str(cfg.per_round),
        "--min-devices",
        str(cfg.devices),
        "--seed",
        str(cfg.seed),
        "--round-timeout",
        f"{cfg.round_timeout_s:g}",
    ]
    return argv + (["--data-root", cfg.data_root] if cfg.data_root else [])


def _client_argv(cfg: DemoConfig, url: str, data_dir: Path, index: int) -> list[str]:
    argv = [
        cfg.python,
        "-m",
        "qflare",
        "client",
        "--server",
        url,
        "--server-key-file",
        str(data_dir / "coordinator.keyid"),
        "--state-dir",
        str(data_dir / "devices" / f"device-{index}"),
        "--dataset",
        cfg.dataset,
        "--model",
        cfg.model,
        "--partition",
        cfg.partition,
        "--alpha",
        str(cfg.alpha),
        "--devices",
        str(cfg.devices),
        "--index",
        str(index),
        "--seed",
        str(cfg.seed),
        "--epochs",
        str(cfg.epochs),
        "--batch-size",
        str(cfg.batch_size),
        "--lr",
        str(cfg.lr),
        "--threads",
        "1",
        "--poll-interval",
        str(cfg.poll_interval_s),
    ]
    return argv + (["--data-root", cfg.data_root] if cfg.data_root else [])


def run_demo(
    cfg: DemoConfig,
    *,
    on_message: Callable[[str], None] = lambda m: None,
    on_status: Callable[[dict[str, Any]], None] = lambda s: None,
) -> DemoResult:
    """Run the demo federation to its last evaluated round (see the module docstring)."""
    t0 = time.perf_counter()
    data_dir = (cfg.data_dir or Path(tempfile.mkdtemp(prefix="qflare-demo-"))).resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = cfg.port or free_port()
    url = f"http://127.0.0.1:{port}"
    admin = secrets.token_urlsafe(32)
    env = {**os.environ, **CHILD_ENV}
    children = ChildProcesses()
    try:
        server = children.start(
            "server", _server_argv(cfg, port, data_dir), logs / "server.log", {**env, "QFLARE_ADMIN_TOKEN": admin}
        )
        on_message(f"coordinator starting at {url} (data {data_dir}, log {logs / 'server.log'})")
        _wait_ready(url, server, children, cfg.startup_timeout_s)
        keyid = (data_dir / "coordinator.keyid").read_text().strip()
        on_message(
            f"coordinator ready; ML-DSA key id {keyid[:16]}... (pinned by every device); metrics at {url}/metrics"
        )
        with HttpTransport(url, timeout=30.0) as api:
            minted = api.post_json(
                "/v1/admin/tokens",
                {"count": cfg.devices, "ttl_s": 3600, "label": "demo"},
                headers={"Authorization": f"Bearer {admin}"},
            )
            tokens = minted["tokens"]
            if len(tokens) != cfg.devices:
                raise DemoError(f"asked for {cfg.devices} enrollment tokens, got {len(tokens)}")
            names = [f"device-{i}" for i in range(cfg.devices)]
            for i, (name, token) in enumerate(zip(names, tokens, strict=True)):
                children.start(
                    name,
                    _client_argv(cfg, url, data_dir, i),
                    logs / f"{name}.log",
                    {**env, "QFLARE_ENROLL_TOKEN": token},
                )
            on_message(f"{cfg.devices} device processes started; their logs: {logs}/device-*.log")
            history = _follow(cfg, api, children, names, on_status, t0)
        on_message("federation finished; waiting for the devices to exit")
        codes = children.wait(names, 60.0)
        bad = {n: rc for n, rc in codes.items() if rc != 0}
        if bad:
            first = next(iter(bad))
            raise DemoError(f"device processes did not exit cleanly: {bad}\n{first}: {children.tail(first)}")
        children.stop(["server"], timeout_s=15.0)
        return DemoResult(url, data_dir, history, time.perf_counter() - t0, [children.logs[n] for n in children.logs])
    finally:
        children.close()


def _follow(
    cfg: DemoConfig,
    api: HttpTransport,
    children: ChildProcesses,
    names: list[str],
    on_status: Callable[[dict[str, Any]], None],
    t0: float,
) -> list[dict[str, Any]]:
    """Poll /v1/status until the last round's model is evaluated; fail fast when a process dies."""
    finished_at: float | None = None
    while True:
        if time.perf_counter() - t0 > cfg.timeout_s:
            raise DemoError(f"the federation did not finish within {cfg.timeout_s:.0f} s")
        status = api.get_json("/v1/status")
        on_status(status)
        history = list(status.get("history") or [])
        if status.get("state") == "finished":
            if any(int(h.get("round", -1)) >= cfg.rounds for h in history):
                return history
            finished_at = finished_at or time.monotonic()
            if time.monotonic() - finished_at > 120.0:
                raise DemoError("the last global model was not evaluated within 120 s")
        for name, rc in children.exited().items():
            if name == "server":
                raise DemoError(f"the coordinator exited with status {rc}:\n{children.tail('server')}")
            if rc != 0:
                raise DemoError(f"{name} exited with status {rc}:\n{children.tail(name)}")
        time.sleep(cfg.poll_interval_s)
