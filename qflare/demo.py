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

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DemoError
from .federation import FederationSpec
from .processes import CHILD_ENV, ChildProcesses, child_environment, client_command
from .server.process import ServerProcess

__all__ = ["DEMO_FEDERATION", "DemoConfig", "DemoError", "DemoResult", "run_demo"]

DEMO_FEDERATION = FederationSpec(devices=10, per_round=5, rounds=5, round_timeout_s=300.0)
"""The demo's default workload: Fashion-MNIST, the FedAvg CNN, 10 Dirichlet(0.5) devices, 5 per round."""


@dataclass(frozen=True)
class DemoConfig:
    """The federation the demo runs and how it runs it on this machine."""

    federation: FederationSpec = DEMO_FEDERATION
    port: int | None = None
    data_dir: Path | None = None
    startup_timeout_s: float = 120.0
    timeout_s: float = 1800.0
    poll_interval_s: float = 0.5
    python: str = sys.executable

    def __post_init__(self) -> None:
        spec = self.federation
        if not isinstance(spec, FederationSpec) or spec.per_round > spec.devices:
            raise DemoError("need devices >= 1, rounds >= 1 and 1 <= per-round <= devices", code="config_error")
        spec.build_strategy()  # a strategy that cannot aggregate per_round updates is refused here


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


def run_demo(
    cfg: DemoConfig,
    *,
    on_message: Callable[[str], None] = lambda m: None,
    on_status: Callable[[dict[str, Any]], None] = lambda s: None,
) -> DemoResult:
    """Run the demo federation to its last evaluated round (see the module docstring)."""
    t0 = time.perf_counter()
    spec = cfg.federation
    data_dir = (cfg.data_dir or Path(tempfile.mkdtemp(prefix="qflare-demo-"))).resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(
        spec,
        data_dir=data_dir,
        port=cfg.port,
        env=CHILD_ENV,
        log_path=logs / "server.log",
        ready_timeout_s=cfg.startup_timeout_s,
        python=cfg.python,
    )
    children = ChildProcesses()
    try:
        server.start()
        on_message(f"coordinator starting at {server.url} (data {data_dir}, log {server.log_path})")
        server.wait_ready()
        keyid = server.key_id()
        on_message(
            f"coordinator ready; ML-DSA key id {keyid[:16]}... (pinned by every device); metrics at {server.url}/metrics"
        )
        tokens = server.tokens(spec.devices, label="demo")
        names = [f"device-{i}" for i in range(spec.devices)]
        env = child_environment(CHILD_ENV)
        for i, (name, token) in enumerate(zip(names, tokens, strict=True)):
            argv = client_command(
                server_url=server.url,
                federation_file=server.federation_file,
                key_file=server.key_file,
                state_dir=data_dir / "devices" / name,
                index=i,
                poll_interval_s=cfg.poll_interval_s,
                python=cfg.python,
            )
            children.start(name, argv, logs / f"{name}.log", {**env, "QFLARE_ENROLL_TOKEN": token})
        on_message(f"{spec.devices} device processes started; their logs: {logs}/device-*.log")
        history = _follow(cfg, server, children, on_status, t0)
        on_message("federation finished; waiting for the devices to exit")
        codes = children.wait(names, 60.0)
        bad = {n: rc for n, rc in codes.items() if rc != 0}
        if bad:
            first = next(iter(bad))
            raise DemoError(f"device processes did not exit cleanly: {bad}\n{first}: {children.tail(first)}")
        server.stop(timeout_s=15.0)
        paths = [server.log_path, *children.logs.values()]
        return DemoResult(server.url, data_dir, history, time.perf_counter() - t0, paths)
    finally:
        children.close()
        server.close()


def _follow(
    cfg: DemoConfig,
    server: ServerProcess,
    children: ChildProcesses,
    on_status: Callable[[dict[str, Any]], None],
    t0: float,
) -> list[dict[str, Any]]:
    """Poll /v1/status until the last round's model is evaluated; fail fast when a process dies."""
    finished_at: float | None = None
    while True:
        if time.perf_counter() - t0 > cfg.timeout_s:
            raise DemoError(f"the federation did not finish within {cfg.timeout_s:.0f} s")
        status = server.status()
        on_status(status)
        history = list(status.get("history") or [])
        if status.get("state") == "finished":
            version = int(status.get("model_version") or 0)
            if version == 0:
                raise DemoError(
                    f"every one of the {cfg.federation.rounds} rounds failed: no model was published "
                    f"(the reason is in {server.log_path})",
                    code="all_rounds_failed",
                )
            # the last published model evaluated (a failed last round publishes nothing)
            if any(int(h.get("model_version", -1)) >= version for h in history):
                return history
            finished_at = finished_at or time.monotonic()
            if time.monotonic() - finished_at > 120.0:
                raise DemoError("the last global model was not evaluated within 120 s")
        if (rc := server.poll()) is not None:
            raise DemoError(f"the coordinator exited with status {rc}:\n{server.log_tail(15)}")
        for name, rc in children.exited().items():
            if rc != 0:
                raise DemoError(f"{name} exited with status {rc}:\n{children.tail(name)}")
        time.sleep(cfg.poll_interval_s)
