"""Crash drill: kill -9 the coordinator while it closes a round, at the two points that matter -- inside the
transaction that publishes the model and appends its ledger entry (after both rows are written, before the
commit), and right after that commit -- then restart it on the same database and blobs.  Either way the
ledger holds exactly one entry per round, each naming the model version stored with it, and the export
verifies.  On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from storage_fixtures import BACKENDS, scratch

from qflare.crypto import SigningKey
from qflare.ledger import verify_export
from qflare.models import create_model
from qflare.protocol import Coordinator, RoundConfig
from qflare.protocol.provenance import entry_of, export_ledger
from qflare.storage import BlobStore, Store
from qflare.strategy import fedavg
from qflare.wire import ParamLayout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from protocol_fixtures import Federation
    from qflare.crypto import SigningKey
    from qflare.storage import BlobStore, Database
    import qflare.storage.training as training

    tmp = Path({tmp!r})
    identity = SigningKey.from_seed("ML-DSA-65", bytes.fromhex({seed!r}))
    fed = Federation(
        tmp, n=2, per_round=2, rounds=3, blobs=BlobStore(tmp / "blobs"), database=Database({url!r}),
        identity=identity,
    )
    rounds = fed.coordinator.rounds

    def submit_all():
        for k, dev in enumerate(fed.selected()):
            task = dev.task()
            dev.submit(dev.prepare_update(task, dev.fetch_model(task), fed.result(seed=k)))

    rounds.open_next()
    submit_all()  # round 1 closes normally
    rounds.open_next()

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if {point!r} == "in_transaction":
        real_insert = training.insert_ledger

        def insert_then_die(*a, **k):
            real_insert(*a, **k)  # the model row and the ledger row are flushed, not committed
            die()

        training.insert_ledger = insert_then_die
    else:
        real_publish = fed.store.publish_model

        def publish_then_die(*a, **k):
            real_publish(*a, **k)  # committed; the process dies before it knows
            die()

        fed.store.publish_model = publish_then_die
    print("closing", flush=True)
    submit_all()  # the second update closes round 2: killed in the middle
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("point", ["in_transaction", "after_commit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_during_round_close_leaves_ledger_and_models_consistent(
    tmp_path: Path, backend: str, point: str
) -> None:
    seed = os.urandom(32)
    with scratch(backend, tmp_path) as db:
        url = db.engine.url.render_as_string(hide_password=False)
        code = _CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), seed=seed.hex(), url=url, point=point)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
        assert child.returncode == -9 and "closing" in child.stdout and "survived" not in child.stdout, child.stderr

        store = Store(db)
        committed = point == "after_commit"
        assert store.get_round(2).state == ("closed" if committed else "aggregating")
        assert len(store.ledger_entries()) == (2 if committed else 1)

        identity = SigningKey.from_seed("ML-DSA-65", seed)
        blobs = BlobStore(tmp_path / "blobs")
        layout = ParamLayout.from_module(create_model("mlp", (1, 8, 8), 10))  # the child's model
        Coordinator(  # the restart
            layout=layout,
            initial_flat=torch.zeros(layout.numel),
            strategy=fedavg(),
            identity=identity,
            store=store,
            rounds=RoundConfig(rounds=3, per_round=2, seed=0),
            blobs=blobs,
            clock=time.time,
        )
        rows = store.ledger_entries()
        assert [(r.seq, r.round_number) for r in rows] == [(1, 1), (2, 2)]  # exactly one entry per round
        for row in rows:
            body = entry_of(row).body
            model = store.get_model(body["model_version"])
            assert body["outcome"] == "closed" and model is not None and model.model_hash == body["model"]
            assert model.round_number == row.round_number
        assert store.latest_model().version == 2 and store.get_round(2).state == "closed"

        out = tmp_path / "ledger.jsonl"
        export_ledger(store, identity.public, out)
        report = verify_export(out, pin=identity.key_id, workers=1)
        assert (report.entries, report.device_signatures, report.missing_envelopes) == (2, 4, 0)
        model_file = tmp_path / "v2.safetensors"
        model_file.write_bytes(blobs.get(store.get_model(2).model_hash))
        found = verify_export(out, model=model_file, workers=1).model
        assert found is not None and found.seq == 2


_ROTATE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from protocol_fixtures import Federation
    from qflare.server.credentials import load_or_create_identity
    from qflare.storage import BlobStore, Database
    import qflare.server.rotation as rotation
    import qflare.storage.ledger as ledger_rows

    tmp = Path({tmp!r})
    server = tmp / "server"
    server.mkdir()
    identity = load_or_create_identity(server, None, "ML-DSA-65")[0]
    fed = Federation(
        tmp, n=2, per_round=2, rounds=3, blobs=BlobStore(tmp / "blobs"), database=Database({url!r}),
        identity=identity,
    )
    fed.coordinator.rounds.open_next()
    for k, dev in enumerate(fed.selected()):
        task = dev.task()
        dev.submit(dev.prepare_update(task, dev.fetch_model(task), fed.result(seed=k)))  # round 1 closes

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    if {point!r} == "in_ledger_transaction":
        real_insert = ledger_rows.insert_ledger

        def insert_then_die(*a, **k):
            real_insert(*a, **k)  # the key_rotation row is flushed, not committed
            die()

        ledger_rows.insert_ledger = insert_then_die
    else:
        rotation._install_key = die  # rotations.jsonl is committed; neither the key files nor the ledger
    print("rotating", flush=True)
    rotation.rotate_key(server, ledger=fed.store)
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("point", ["in_ledger_transaction", "after_log_commit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_during_rotate_key_leaves_the_rotation_in_the_ledger_once(
    tmp_path: Path, backend: str, point: str
) -> None:
    from qflare.protocol.key_ledger import catch_up
    from qflare.server.rotation import recover

    with scratch(backend, tmp_path) as db:
        url = db.engine.url.render_as_string(hide_password=False)
        code = _ROTATE_CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), url=url, point=point)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
        assert child.returncode == -9 and "rotating" in child.stdout and "survived" not in child.stdout, child.stderr

        store = Store(db)
        assert [r.kind for r in store.ledger_entries()] == ["round"]  # the rotation's entry never committed
        server = tmp_path / "server"
        chain = recover(server, None)  # what the next server start does first ...
        old, new = chain.keys
        assert SigningKey.load(server / "coordinator.key", None).public == new
        current = SigningKey.load(server / "coordinator.key", None)
        rows = catch_up(store, chain, current)  # ... then this, before the round manager recovers
        assert [(r.seq, r.kind, list(entry_of(r).body["signers"])) for r in rows] == [(2, "key_rotation", [new.key_id])]
        assert catch_up(store, chain, current) == []  # exactly once

        out = tmp_path / "ledger.jsonl"
        export_ledger(store, new, out, former_keys=[old])
        report = verify_export(out, pin=old.key_id, workers=1)
        assert (report.entries, report.rounds, report.key_chain) == (2, 1, (old.key_id, new.key_id))
