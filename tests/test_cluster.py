"""A coordinator of several workers on one PostgreSQL database (qflare.protocol.cluster).

The workers here are Coordinator objects in this process, each with its own engine (so its own
connections and advisory locks), store, blob store view and leadership claim -- what separate processes
have, minus the process boundary (tests/test_cluster_server.py runs real `qflare server` workers).
Devices keep their session on one worker; their uploads are spread over the workers.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch
from storage_fixtures import scratch

from qflare.crypto import SigningKey
from qflare.errors import ConfigError, QflareError
from qflare.models import create_model
from qflare.protocol import Coordinator, CoordinatorConfig, Device, RoundConfig
from qflare.storage import AdvisoryLeadership, BlobStore, Database, Store
from qflare.strategy import fedavg
from qflare.training import TrainResult
from qflare.transport import InProcessTransport
from qflare.wire import ParamLayout

pytestmark = pytest.mark.postgres


class Killed(BaseException):
    """Stands for kill -9 in the middle of a call: nothing after it runs in that worker."""


class Cluster:
    def __init__(
        self,
        db: Database,
        tmp: Path,
        workers: int,
        *,
        devices: int = 6,
        per_round: int = 4,
        rounds: int = 3,
        min_participants: int | None = None,
    ):
        torch.manual_seed(0)
        model = create_model("mlp", (1, 8, 8), 10)
        self.layout = ParamLayout.from_module(model)
        self.identity = SigningKey.generate()
        self.rounds, self.min_participants = rounds, min_participants
        self.workers: list[Coordinator] = []
        self.dbs: list[Database] = []
        for _ in range(workers):
            self.add_worker(db.engine.url.render_as_string(hide_password=False), tmp, model, per_round)
        self.store = Store(self.dbs[0])
        self.devices: list[Device] = []
        self.home: list[int] = []
        for i, token in enumerate(self.workers[0].create_tokens(devices, ttl_s=600)):
            worker = i % workers
            dev = Device(
                transport=InProcessTransport(self.workers[worker]),
                identity=SigningKey.generate(),
                server_key=self.identity.public,
                layout=self.layout,
            )
            dev.enroll(token)
            dev.connect()
            self.devices.append(dev)
            self.home.append(worker)

    def add_worker(self, url: str, tmp: Path, model: torch.nn.Module, per_round: int) -> Coordinator:
        db = Database(url)
        self.dbs.append(db)
        coordinator = Coordinator(
            layout=self.layout,
            initial_flat=self.layout.module_to_flat(model),
            strategy=fedavg(),
            identity=self.identity,
            store=Store(db, shared=True),
            rounds=RoundConfig(
                rounds=self.rounds,
                per_round=per_round,
                seed=0,
                round_timeout_s=600.0,
                min_participants=self.min_participants,
            ),
            config=CoordinatorConfig(liveness_window_s=None, shared_sessions=True),
            blobs=BlobStore(tmp / "blobs"),
            leadership=AdvisoryLeadership(db),
        )
        self.workers.append(coordinator)
        return coordinator

    def step(self, live: list[int] | None = None) -> None:
        for i, worker in enumerate(self.workers):
            if live is None or i in live:
                worker.rounds.step()

    def result(self, index: int, round_number: int) -> TrainResult:
        """Devices 0 and 1 send large opposite deltas, the others small ones: floating-point sums of these
        depend on the order of the terms, so only a fixed order of aggregation gives the same bits."""
        g = torch.Generator().manual_seed(1000 * round_number + max(index, 1))
        if index < 2:
            delta = torch.randn(self.layout.numel, generator=g).clamp(-1, 1) * (9e3 if index == 0 else -9e3)
        else:
            delta = torch.randn(self.layout.numel, generator=g) * 1e-6
        return TrainResult(delta=delta, num_examples=5, mean_loss=1.0, duration_s=0.01, steps=1)

    def upload(self, index: int) -> int:
        """Device ``index`` trains (a seeded fake result) and uploads; the round number it uploaded for."""
        dev = self.devices[index]
        task = dev.task()
        model = dev.fetch_model(task)
        dev.submit(dev.prepare_update(task, model, self.result(index, task.round)))
        return task.round

    def selected(self) -> list[int]:
        row = self.store.current_round()
        assert row is not None and row.state == "open"
        ids = [d.device_id for d in self.devices]
        return [ids.index(d) for d in row.selected_devices]

    def close(self) -> None:
        for worker in self.workers:
            if worker.rounds._leadership is not None:
                worker.rounds._leadership.release()
        for db in self.dbs:
            db.dispose()


def _model_hashes(store: Store) -> list[str]:
    return [m.model_hash for m in store.list_models()]


def _run(tmp: Path, workers: int, order_seed: int) -> list[str]:
    with scratch("postgresql", tmp) as db:
        cluster = Cluster(db, tmp, workers, devices=4, per_round=4)
        try:
            shuffle = random.Random(order_seed)
            for _ in range(cluster.rounds):
                cluster.step()
                chosen = cluster.selected()
                shuffle.shuffle(chosen)  # arrival order differs from run to run
                for index in chosen:
                    cluster.upload(index)
                cluster.step()
            row = cluster.store.current_round()
            assert row is not None and row.round_number == cluster.rounds and row.state == "closed"
            assert all(w.rounds.finished for w in cluster.workers)
            return _model_hashes(cluster.store)
        finally:
            cluster.close()


def test_one_two_and_three_workers_publish_bit_identical_models(tmp_path):
    one = _run(tmp_path / "one", 1, order_seed=1)
    two = _run(tmp_path / "two", 2, order_seed=2)
    three = _run(tmp_path / "three", 3, order_seed=3)
    assert len(one) == 4  # the initial model and one per round
    assert one == two == three


def test_exactly_one_worker_leads_and_another_takes_over(tmp_path):
    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 3)
        try:
            leaders = [w.rounds._leadership.leading() for w in cluster.workers]  # type: ignore[union-attr]
            assert leaders.count(True) == 1
            first = leaders.index(True)
            cluster.workers[first].rounds._leadership.release()  # type: ignore[union-attr]
            again = [w.rounds._leadership.leading() for i, w in enumerate(cluster.workers) if i != first]  # type: ignore[union-attr]
            assert again.count(True) == 1
        finally:
            cluster.close()


def test_updates_accepted_by_any_worker_and_a_leader_killed_mid_close_publishes_once(tmp_path):
    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 2)
        try:
            cluster.step()
            leader = next(i for i, w in enumerate(cluster.workers) if w.rounds._leadership.held)  # type: ignore[union-attr]
            chosen = cluster.selected()
            assert {cluster.home[i] for i in chosen} == {0, 1}  # both workers take uploads
            for index in chosen:
                cluster.upload(index)
            acked = {cluster.devices[i].device_id for i in chosen}

            def killed(rnd):  # after open -> aggregating, before anything is published
                raise Killed

            cluster.workers[leader].rounds._gather = killed  # type: ignore[method-assign]
            with pytest.raises(Killed):
                cluster.workers[leader].rounds.step()
            assert cluster.store.current_round().state == "aggregating"  # type: ignore[union-attr]
            cluster.workers[leader].rounds._leadership.release()  # type: ignore[union-attr]  # its connection died
            survivor = 1 - leader
            cluster.step(live=[survivor])
            row = cluster.store.get_round(1)
            assert row is not None and row.state == "closed"
            assert [m.version for m in cluster.store.list_models()] == [0, 1]
            entry = cluster.store.ledger_entry_for_round(1)
            assert entry is not None
            assert {u.device_id for u in cluster.store.updates_for_round(1)} == acked
            # the round's next step opens round 2 on the published model; nothing is published twice
            cluster.step(live=[survivor])
            assert [m.version for m in cluster.store.list_models()] == [0, 1]
            assert cluster.store.current_round().round_number == 2  # type: ignore[union-attr]
        finally:
            cluster.close()


def test_a_late_update_on_a_follower_is_refused_once_the_round_closes(tmp_path):
    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 2, devices=6, per_round=4)
        try:
            cluster.step()
            chosen = cluster.selected()
            tasks = {}
            for index in chosen:  # every device fetches its task before the round closes
                dev = cluster.devices[index]
                task = dev.task()
                tasks[index] = (task, dev.fetch_model(task))
            late = chosen[-1]
            for index in chosen[:-1]:
                dev = cluster.devices[index]
                task, model = tasks[index]
                dev.submit(dev.prepare_update(task, model, cluster.result(index, task.round)))
            # the deadline passes with 3 of 4 (min_participants default = all: the round fails) -- move it
            for worker in cluster.workers:
                worker.rounds._clock = lambda: time.time() + 10_000  # type: ignore[method-assign]
            cluster.step()
            assert cluster.store.get_round(1).state == "failed"  # type: ignore[union-attr]
            dev = cluster.devices[late]
            task, model = tasks[late]
            with pytest.raises(QflareError):
                dev.submit(dev.prepare_update(task, model, cluster.result(late, task.round)))
            assert cluster.store.count_updates(1) == 3
        finally:
            cluster.close()


def test_a_follower_that_has_not_followed_the_round_yet_takes_its_updates(tmp_path):
    """A worker follows the rounds at its steps; an update for a round it has not seen open yet (the
    device's task came from the leader) is taken after it catches up, not refused ``wrong_round`` --
    which a device answers by dropping its update, and it trains once per round."""
    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 2, devices=4, per_round=4, rounds=2)
        try:
            leader = next(i for i, w in enumerate(cluster.workers) if w.rounds._leadership.leading())  # type: ignore[union-attr]
            follower = 1 - leader
            for rnd in (1, 2):
                cluster.step(live=[leader])  # opens the round (round 2: closes round 1 first); the follower sleeps
                for index in cluster.selected():
                    dev = cluster.devices[index]
                    dev.transport = InProcessTransport(cluster.workers[leader])
                    task = dev.task()
                    model = dev.fetch_model(task)
                    dev.transport = InProcessTransport(cluster.workers[follower])
                    receipt = dev.submit(dev.prepare_update(task, model, cluster.result(index, task.round)))
                    assert (receipt.round, receipt.duplicate) == (rnd, False)
            cluster.step(live=[leader])
            assert sorted((r.round_number, r.state) for r in cluster.store.list_rounds()) == [
                (1, "closed"),
                (2, "closed"),
            ]
            assert [m.version for m in cluster.store.list_models()] == [0, 1, 2]
        finally:
            cluster.close()


def test_a_cluster_refuses_sqlite_and_secure_aggregation(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(ConfigError, match="PostgreSQL"):
        AdvisoryLeadership(db)
    db.dispose()


def test_a_round_past_its_deadline_with_enough_updates_is_published_from_what_was_recorded(tmp_path):
    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 2, devices=6, per_round=4, min_participants=3)
        try:
            cluster.step()
            chosen = cluster.selected()
            for index in chosen[:3]:
                cluster.upload(index)
            for worker in cluster.workers:
                worker.rounds._clock = lambda: time.time() + 10_000  # type: ignore[method-assign]
            cluster.step()
            assert cluster.store.get_round(1).state == "closed"  # type: ignore[union-attr]
            assert [m.version for m in cluster.store.list_models()] == [0, 1]
            assert cluster.store.list_models()[1].metrics["updates"] == 3
        finally:
            cluster.close()


def test_the_leaders_garbage_collection_spares_blobs_being_written_by_other_workers(tmp_path):
    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 2)
        try:
            cluster.step()
            leader = next(w for w in cluster.workers if w.rounds._leadership.held)  # type: ignore[union-attr]
            follower = next(w for w in cluster.workers if w is not leader)
            blobs = BlobStore(tmp_path / "blobs")
            old, _ = blobs.put(b"an orphan from long ago")
            past = time.time() - 3600
            os.utime(blobs.path_for(old), (past, past))
            rewritten, _ = blobs.put(b"an orphan whose bytes are uploaded again")
            os.utime(blobs.path_for(rewritten), (past, past))
            assert follower.rounds.collect_garbage() == []  # only the leader collects
            assert leader.rounds.collect_garbage() == []  # first sighting: suspects only
            blobs.delete(rewritten)
            blobs.put(b"an orphan whose bytes are uploaded again")  # a retry writes the same bytes anew
            fresh, _ = blobs.put(b"written since the last pass")
            assert leader.rounds.collect_garbage() == [old]
            assert blobs.exists(rewritten) and blobs.exists(fresh)
            assert all(blobs.exists(m.model_hash) for m in cluster.store.list_models())
        finally:
            cluster.close()


def test_a_worker_with_another_coordinator_key_is_refused(tmp_path):
    from qflare.server.runtime import _check_cluster_key

    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 1)
        try:
            _check_cluster_key(cluster.store, cluster.identity)  # the federation's own key
            with pytest.raises(ConfigError, match=r"same coordinator\.key"):
                _check_cluster_key(cluster.store, SigningKey.generate())
            for _ in range(2):  # and once the ledger has entries, its head's signer decides
                cluster.step()
                for index in cluster.selected():
                    cluster.upload(index)
                cluster.step()
            assert cluster.store.last_ledger_entry() is not None
            _check_cluster_key(cluster.store, cluster.identity)
            with pytest.raises(ConfigError, match=r"same coordinator\.key"):
                _check_cluster_key(cluster.store, SigningKey.generate())
        finally:
            cluster.close()


def test_a_blob_store_outage_at_close_delays_the_round_and_loses_nothing(tmp_path):
    from qflare.errors import StorageFullError

    with scratch("postgresql", tmp_path) as db:
        cluster = Cluster(db, tmp_path, 2)
        try:
            cluster.step()
            leader = next(w for w in cluster.workers if w.rounds._leadership.held)  # type: ignore[union-attr]
            for index in cluster.selected():
                cluster.upload(index)
            real_get = leader.rounds._blobs.get  # type: ignore[union-attr]

            def unavailable(digest: str) -> bytes:
                raise StorageFullError("the blob store is unreachable", code="storage_unavailable")

            leader.rounds._blobs.get = unavailable  # type: ignore[union-attr,method-assign]
            cluster.step()
            assert cluster.store.get_round(1).state == "aggregating"  # type: ignore[union-attr]
            leader.rounds._blobs.get = real_get  # type: ignore[union-attr,method-assign]
            cluster.step()
            assert cluster.store.get_round(1).state == "closed"  # type: ignore[union-attr]
            assert cluster.store.list_models()[1].metrics["updates"] == 4
        finally:
            cluster.close()
