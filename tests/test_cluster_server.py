"""``qflare server --workers N`` as real processes on one PostgreSQL database, devices over real HTTP.

The supervisor binds the port once; its N ``--cluster`` children accept connections from one shared
queue.  A worker stopped with SIGSTOP accepts nothing, so a new connection made while only worker W
runs is served by W: that is how these tests steer a request to a chosen worker (and read
``/v1/status``'s ``worker.pid`` in the same window to confirm it), how they find the leader, and how
they hold an upload in a worker they then kill.  tests/test_cluster.py covers the same machinery with
in-process workers.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from storage_fixtures import PG_ERROR
from typer.testing import CliRunner

from qflare.cli import app
from qflare.crypto import SigningKey
from qflare.device import DeviceClient, DeviceState, load_workload, pin_server_key
from qflare.errors import QflareError
from qflare.federation import FederationSpec
from qflare.models import create_model
from qflare.protocol import Device, Receipt, Route
from qflare.server.process import ServerProcess
from qflare.storage import Database, Store, blob_store_from_env
from qflare.storage.testing import postgres_admin_url, temporary_postgres_database
from qflare.training import TrainResult
from qflare.transport import HttpTransport, RetryPolicy
from qflare.wire import ParamLayout

_PG_DOWN = f"PostgreSQL not reachable at {postgres_admin_url(masked=True)}: {PG_ERROR}"
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(PG_ERROR is not None and not os.environ.get("CI"), reason=_PG_DOWN),
]

_READY_LINE = "Application startup complete."  # uvicorn logs it once per worker start
_LAYOUT = ParamLayout.from_module(create_model("mlp", (1, 8, 8), 10))


@pytest.fixture
def database_url() -> Iterator[str]:
    """A scratch PostgreSQL database; in CI an unreachable PostgreSQL fails instead of skipping."""
    if PG_ERROR is not None:
        pytest.fail(_PG_DOWN + " (CI must test PostgreSQL)")
    with temporary_postgres_database() as url:
        yield url


class Workers:
    """``qflare server --workers N`` on ``database_url`` (digits + MLP, no evaluation), and its workers."""

    def __init__(self, root: Path, database_url: str, workers: int, **workload: Any) -> None:
        spec = dict(dataset="digits", model="mlp", devices=3, rounds=1, per_round=3, round_timeout_s=120.0)
        self.spec = FederationSpec(**{**spec, **workload})
        self.n, self.database_url = workers, database_url
        self.server = ServerProcess(
            self.spec,
            data_dir=root / "server",
            database_url=database_url,
            ready_timeout_s=120.0,
            args=["--workers", str(workers), "--no-eval", "--rate", "100000", "--session-rate", "100000"],
        )
        self.url = self.server.url
        self.started: set[int] = set()  # every worker pid seen, restarts included
        self.killed: set[int] = set()

    def start(self) -> Workers:
        self.server.start()
        self.server.wait_ready()
        self.wait_all_ready()
        self.key, self.suite = pin_server_key(self.get("/v1/identity"), self.server.key_id())
        return self

    def close(self) -> None:
        for pid in self.pids():  # a stopped worker would sit out its graceful stop
            _signal(pid, signal.SIGCONT)
        self.server.close()

    # ------------------------------------------------------------------ the worker processes
    def pids(self) -> list[int]:
        """The supervisor's live children: the workers."""
        try:
            children = psutil.Process(self.server.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(
            p.pid
            for p in children
            if p.pid not in self.killed and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        )

    def wait_all_ready(self, timeout_s: float = 150.0) -> list[int]:
        """Until N workers run and every worker ever started has finished starting (its uvicorn serves)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids()
            self.started.update(pids)
            if len(pids) == self.n and self.log().count(_READY_LINE) >= len(self.started):
                return pids
            assert self.server.poll() is None, self.server.log_tail()
            time.sleep(0.1)
        raise AssertionError(f"workers not ready after {timeout_s} s:\n{self.server.log_tail()}")

    def log(self) -> str:
        return self.server.log_path.read_text(errors="replace")

    @contextmanager
    def only(self, pid: int) -> Iterator[None]:
        """Every other worker SIGSTOPped: new connections are accepted by ``pid`` alone."""
        others = [p for p in self.pids() if p != pid]
        for p in others:
            self.stop(p)
        try:
            yield
        finally:
            for p in others:
                self.resume(p)

    def stop(self, pid: int) -> None:
        _signal(pid, signal.SIGSTOP)

    def resume(self, pid: int) -> None:
        _signal(pid, signal.SIGCONT)

    def kill(self, pid: int) -> None:
        """kill -9 (no shutdown at all); the supervisor starts another worker in its place."""
        os.kill(pid, signal.SIGKILL)
        self.killed.add(pid)

    def status_of(self, pid: int) -> dict[str, Any]:
        """``/v1/status`` as worker ``pid`` answers it (the others stopped meanwhile)."""
        with self.only(pid):
            status = self.get("/v1/status")
        assert status["worker"]["pid"] == pid, (status["worker"], pid)
        return status

    def leader(self, timeout_s: float = 30.0) -> int:
        """The pid of the worker that says it leads (exactly one does)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leading = [pid for pid in self.wait_all_ready() if self.status_of(pid)["worker"]["leader"]]
            assert len(leading) <= 1, leading
            if leading:
                return leading[0]
            time.sleep(0.2)
        raise AssertionError(f"no worker leads after {timeout_s} s:\n{self.server.log_tail()}")

    # ------------------------------------------------------------------ HTTP and the database
    def fresh_client(self) -> httpx.Client:
        """An HTTP client that opens a new connection for every request (no keep-alive)."""
        return httpx.Client(base_url=self.url, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0))

    def get(self, path: str) -> Any:
        with self.fresh_client() as client:
            resp = client.get(path)
            resp.raise_for_status()
            return resp.json()

    def wait_status(self, pred: Any, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.get("/v1/status")
            if pred(status):
                return status
            time.sleep(0.1)  # real time: the workers are real processes
        raise AssertionError(f"status condition not met in {timeout_s} s; last {status}\n{self.server.log_tail()}")

    def wait_everywhere(self, pred: Any, timeout_s: float = 60.0) -> None:
        """Until every worker's own ``/v1/status`` satisfies ``pred`` (each follows the store at its steps)."""
        deadline = time.monotonic() + timeout_s
        for pid in self.wait_all_ready():
            while not pred(status := self.status_of(pid)):
                assert time.monotonic() < deadline, f"worker {pid}: {status}\n{self.server.log_tail()}"
                time.sleep(0.05)

    def device(self, transport: Any, identity: SigningKey | None = None) -> Device:
        return Device(
            transport=transport, identity=identity or SigningKey.generate(), server_key=self.key, layout=_LAYOUT
        )

    def transport(self, *, fresh: bool = False) -> HttpTransport:
        retry = RetryPolicy(attempts=6, initial_s=0.2, max_wait_s=2.0)
        client = self.fresh_client() if fresh else None
        return HttpTransport(self.url, timeout=30.0, retry=retry, client=client)

    @contextmanager
    def store(self) -> Iterator[Store]:
        db = Database(self.database_url)
        try:
            yield Store(db)
        finally:
            db.dispose()


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def _result(seed: int) -> TrainResult:
    delta = torch.randn(_LAYOUT.numel, generator=torch.Generator().manual_seed(seed)) * 1e-3
    return TrainResult(delta=delta, num_examples=10 + seed, mean_loss=1.0, duration_s=0.01, steps=1)


def _submit(dev: Device, seed: int) -> Receipt:
    task = dev.task()
    assert task.state == "open" and task.selected, task
    model = dev.fetch_model(task)
    return dev.submit(dev.prepare_update(task, model, _result(seed)))


def _check_published_once(cluster: Workers, rounds: int, per_round: int, acked: set[tuple[int, str, str]]) -> None:
    """Rounds 1..R closed, one model version per round, one ledger entry per round in one chain, and the
    updates table holding exactly the acknowledged updates (``acked``: round, device, hash), blobs intact."""
    blobs = blob_store_from_env(cluster.server.data_dir)
    with cluster.store() as store:
        assert [(r.round_number, r.state) for r in sorted(store.list_rounds(), key=lambda r: r.round_number)] == [
            (r, "closed") for r in range(1, rounds + 1)
        ]
        models = store.list_models()
        assert [(m.version, m.round_number) for m in models] == [(0, None)] + [(r, r) for r in range(1, rounds + 1)]
        entries = store.ledger_entries()
        round_entries = [e.round_number for e in entries if e.kind == "round"]
        assert round_entries == list(range(1, rounds + 1))
        for before, after in itertools.pairwise(entries):
            assert after.prev_hash == before.entry_hash  # one chain: no entry written by two leaders
        rows = [
            (u.round_number, u.device_id, u.update_hash)
            for r in range(1, rounds + 1)
            for u in store.updates_for_round(r)
        ]
    assert len(rows) == len(set(rows)) == rounds * per_round
    assert len({(r, d) for r, d, _ in rows}) == len(rows)  # one update per device and round
    assert set(rows) == acked  # none lost, none extra
    assert all(blobs.exists(h) for _, _, h in rows)


# ---------------------------------------------------------------------------------------------- tests
def test_a_session_made_on_one_worker_is_honoured_by_the_other(tmp_path: Path, database_url: str) -> None:
    cluster = Workers(tmp_path, database_url, 2, devices=1, per_round=1, rounds=1)
    try:
        cluster.start()
        a, b = cluster.pids()
        token = cluster.server.tokens(1)[0]
        served: list[tuple[Route, int]] = []
        frames: list[tuple[Route, bytes, str | None, int]] = []
        inner = cluster.transport(fresh=True)  # a new TCP connection for every request

        class Alternating:
            """Each request goes to the other worker than the previous one (the first to ``a``)."""

            def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
                pid = a if len(served) % 2 == 0 else b
                with cluster.only(pid):
                    assert cluster.get("/v1/status")["worker"]["pid"] == pid  # the same kind of connection
                    reply = inner.request(route, body, session_id)
                served.append((Route(route), pid))
                frames.append((Route(route), body, session_id, pid))
                return reply

        dev = cluster.device(Alternating())
        dev.enroll(token)  # a
        dev.connect()  # hello on b, finish on a: the pending handshake is shared too
        cluster.wait_everywhere(lambda s: s["state"] == "open")
        receipt = _submit(dev, 1)  # task on b, model on a, update on b
        assert served == [
            (Route.ENROLL, a),
            (Route.HELLO, b),
            (Route.FINISH, a),
            (Route.TASK, b),
            (Route.MODEL, a),
            (Route.UPDATE, b),
        ]
        assert receipt.round == 1 and not receipt.duplicate

        # The session's counters are shared: the task frame b accepted is a replay on a.
        route, body, sid, pid = frames[3]
        assert (route, pid) == (Route.TASK, b)
        with cluster.only(a), pytest.raises(QflareError) as refused:
            inner.request(route, body, sid)
        assert refused.value.code == "replay"

        final = cluster.wait_status(lambda s: s["state"] == "finished")
        assert final["model_version"] == 1
        _check_published_once(cluster, 1, 1, {(1, dev.device_id, receipt.update_hash)})
        inner.close()
    finally:
        cluster.close()


def test_three_workers_run_a_federation_to_the_end(tmp_path: Path, database_url: str) -> None:
    cluster = Workers(tmp_path, database_url, 3, devices=3, per_round=3, rounds=3)
    try:
        cluster.start()
        tokens = cluster.server.tokens(3)
        summaries: list[Any] = [None] * 3
        errors: list[BaseException] = []

        def run(i: int) -> None:  # the device loop of `qflare client`, in a thread
            try:
                with cluster.transport() as transport:
                    dc = DeviceClient(
                        transport=transport,
                        state=DeviceState(tmp_path / f"device-{i}"),
                        server_key=cluster.key,
                        workload=load_workload(cluster.spec, i),
                        suite=cluster.suite,
                    )
                    dc.ensure_enrolled(tokens[i], patience_s=60.0)
                    summaries[i] = (dc.device_id, dc.run(poll_interval=0.2, give_up_after_s=60.0), dc.state.receipts())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180.0)
        assert not errors, errors
        assert all(s is not None and s[1].reason == "finished" for s in summaries), summaries
        acked = {(r["round"], r["device_id"], r["update_hash"]) for _, _, receipts in summaries for r in receipts}
        assert {rnd for rnd, _, _ in acked} == {1, 2, 3}
        _check_published_once(cluster, 3, 3, acked)
        # every worker follows the same finished federation
        for pid in cluster.wait_all_ready():
            status = cluster.status_of(pid)
            assert (status["state"], status["model_version"]) == ("finished", 3)
    finally:
        cluster.close()


def test_kill_9_of_the_leader_around_the_close_publishes_every_round_once(tmp_path: Path, database_url: str) -> None:
    rounds = 3
    cluster = Workers(tmp_path, database_url, 2, devices=3, per_round=3, rounds=rounds)
    try:
        cluster.start()
        devices = [cluster.device(cluster.transport()) for _ in range(3)]
        for dev, token in zip(devices, cluster.server.tokens(3), strict=True):
            dev.enroll(token)
            dev.connect()
        acked: set[tuple[int, str, str]] = set()
        killed: list[int] = []
        seen_at_kill: list[str] = []
        for rnd in range(1, rounds + 1):
            cluster.wait_everywhere(lambda s, rnd=rnd: s["round"] == rnd and s["state"] == "open")
            leader = cluster.leader()
            assert leader not in killed
            for i, dev in enumerate(devices):
                receipt = _submit(dev, 10 * rnd + i)
                assert receipt.round == rnd and not receipt.duplicate
                acked.add((rnd, dev.device_id, receipt.update_hash))
            # the last update is acknowledged: kill the leader at once (round 1), as soon as the database
            # shows the close begun (round 2), or a little later (round 3)
            with cluster.store() as store:
                if rnd == 2:
                    deadline = time.monotonic() + 10.0
                    while store.get_round(rnd).state == "open" and time.monotonic() < deadline:  # type: ignore[union-attr]
                        time.sleep(0.001)
                elif rnd == 3:
                    time.sleep(0.1)
                cluster.kill(leader)
                killed.append(leader)
                seen_at_kill.append(store.get_round(rnd).state)  # type: ignore[union-attr]
            # another worker takes the lead and finishes what the dead one started
            assert cluster.leader() not in killed
        print("round states when the leader was killed:", seen_at_kill)

        final = cluster.wait_status(lambda s: s["state"] == "finished", 90.0)
        assert final["model_version"] == rounds
        for dev in devices:  # the devices see the finished federation through whichever worker answers
            assert dev.task().state == "finished"
        _check_published_once(cluster, rounds, 3, acked)
        log = cluster.log()
        for pid in killed:
            assert f"(pid {pid}) exited with status -9" in log
        assert len(cluster.wait_all_ready()) == 2  # the supervisor replaced them

        # the ledger exports and verifies offline: one entry per round, every update signed by its device
        out = tmp_path / "ledger.jsonl"
        runner = CliRunner()
        env = {"QFLARE_DATABASE_URL": database_url}
        export = ["ledger", "export", "--data-dir", str(cluster.server.data_dir), "--out", str(out)]
        exported = runner.invoke(app, export, env=env)
        assert exported.exit_code == 0, exported.output
        verified = runner.invoke(app, ["ledger", "verify", str(out), "--pin", cluster.server.key_id(), "--json"])
        assert verified.exit_code == 0, verified.output
        assert '"rounds": 3' in verified.stdout and '"device_signatures": 9' in verified.stdout, verified.stdout
    finally:
        cluster.close()


def test_kill_9_of_a_worker_holding_uploads_loses_nothing(tmp_path: Path, database_url: str) -> None:
    cluster = Workers(tmp_path, database_url, 2, devices=6, per_round=6, rounds=1)
    try:
        cluster.start()
        devices = [cluster.device(cluster.transport()) for _ in range(6)]
        for dev, token in zip(devices, cluster.server.tokens(6), strict=True):
            dev.enroll(token)
            dev.connect()
        cluster.wait_everywhere(lambda s: s["state"] == "open")
        leader = cluster.leader()
        victim = next(p for p in cluster.pids() if p != leader)
        receipts: dict[int, Receipt] = {}

        # With the leader stopped, every device's (keep-alive) connection goes to the victim.
        cluster.stop(leader)
        try:
            for dev in devices:
                dev.transport.close()  # type: ignore[attr-defined]
                dev.transport = cluster.transport()
            for i in range(3):  # acknowledged before the kill, by the victim
                receipts[i] = _submit(devices[i], i)
            held = {}
            for i in range(3, 6):
                task = devices[i].task()
                held[i] = devices[i].prepare_update(task, devices[i].fetch_model(task), _result(i))
            for i in range(3, 6):
                assert devices[i].task().state == "open"  # fresh use of the kept-alive connection
            cluster.stop(victim)
        finally:
            cluster.resume(leader)

        # Three uploads go out on connections the stopped victim holds, then it is killed.
        failures: list[BaseException] = []

        def upload(i: int) -> None:
            try:
                receipts[i] = devices[i].submit(held[i])
            except BaseException as exc:
                failures.append(exc)

        threads = {i: threading.Thread(target=upload, args=(i,)) for i in held}
        for th in threads.values():
            th.start()
        time.sleep(1.0)
        assert all(th.is_alive() for th in threads.values())  # held: the victim reads nothing
        cluster.kill(victim)
        for th in threads.values():
            th.join(60.0)
        assert not failures, failures
        # the held uploads were never processed by the victim: the retries were fresh acceptances
        assert all(not receipts[i].duplicate and receipts[i].round == 1 for i in range(6))

        final = cluster.wait_status(lambda s: s["state"] == "finished", 60.0)
        assert final["model_version"] == 1
        acked = {(1, devices[i].device_id, receipts[i].update_hash) for i in range(6)}
        _check_published_once(cluster, 1, 6, acked)
        with cluster.store() as store:
            assert store.list_models()[1].metrics.get("updates") == 6
        assert f"(pid {victim}) exited with status -9" in cluster.log()
        assert victim not in cluster.wait_all_ready()  # a new worker took its place
    finally:
        cluster.close()
