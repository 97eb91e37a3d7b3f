"""The round manager writes the provenance ledger: one signed entry per closed or failed round, in the round's
own transaction, with the updates combined, the ones left out and why, and the devices' signed envelopes;
exported and verified offline."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from ledger_fixtures import chain
from protocol_fixtures import FakeClock, Federation

from qflare.errors import QflareError, StorageFullError
from qflare.ledger import LedgerVerifyError, canonical, verify_export
from qflare.protocol import Coordinator, RoundConfig
from qflare.protocol.provenance import entry_of, export_ledger
from qflare.storage import BlobStore
from qflare.strategy import fedavg, krum
from qflare.strategy.noise import GaussianNoise
from qflare.strategy.transforms import ClipNorm


def submit(fed: Federation, devices: list, *, scale: float = 0.01) -> None:
    for k, dev in enumerate(devices):
        task = dev.task()
        model = dev.fetch_model(task)
        dev.submit(dev.prepare_update(task, model, fed.result(seed=k, scale=scale)))


def bodies(fed: Federation) -> list[dict]:
    return [dict(entry_of(r).body) for r in fed.store.ledger_entries()]


def test_closed_and_failed_rounds_are_chained_exported_and_verified(tmp_path: Path) -> None:
    clock = FakeClock()
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=3, per_round=2, rounds=3, blobs=blobs, clock=clock, round_timeout_s=60)
    rounds = fed.coordinator.rounds
    rounds.open_next()
    submit(fed, fed.selected())  # round 1 closes at quorum
    rounds.open_next()
    late = fed.selected()[1].device_id
    submit(fed, fed.selected()[:1])  # round 2: one of two, then the deadline
    clock.advance(61)
    rounds.tick()
    rounds.open_next()
    submit(fed, fed.selected())  # round 3 closes
    b1, b2, b3 = bodies(fed)
    assert [(b["round"], b["outcome"], b["model_version"]) for b in (b1, b2, b3)] == [
        (1, "closed", 1),
        (2, "failed", None),
        (3, "closed", 2),
    ]
    assert b2["reason"] == "quorum_not_reached" and b2["left_out"] == [[late, None, "no_update"]]
    assert len(b2["updates"]) == 1 and b2["parent_model"] == b1["model"] == b3["parent_model"]
    v2 = fed.store.get_model(2)
    assert v2 is not None and b3["model"] == v2.model_hash
    assert b1["pipeline"]["combine"].startswith("ShareCappedMean(") and b1["dp"] is None

    out = tmp_path / "ledger.jsonl"
    summary = export_ledger(fed.store, fed.identity.public, out)
    assert (summary.entries, summary.rounds) == (3, 3)
    report = verify_export(out, pin=fed.identity.key_id, workers=1)
    assert (report.entries, report.device_signatures, report.missing_envelopes) == (3, 5, 0)

    model_file = tmp_path / "v2.safetensors"
    model_file.write_bytes(blobs.get(v2.model_hash))
    found = verify_export(out, model=model_file, workers=1).model
    assert found is not None and (found.seq, found.round_number, found.model_version) == (3, 3, 2)
    initial = tmp_path / "v0.safetensors"
    initial.write_bytes(blobs.get(b1["parent_model"]))
    parent = verify_export(out, model=initial, workers=1).model
    assert parent is not None and parent.role == "parent" and parent.seq == 1

    # a device signature that does not verify names the entry (the envelope is the device's own bytes)
    lines = out.read_bytes().splitlines()
    line = json.loads(lines[1])
    env = bytearray.fromhex(line["envelopes"][0])
    env[-5] ^= 0x01
    line["envelopes"][0] = env.hex()
    lines[1] = canonical.encode(line)
    out.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(LedgerVerifyError) as info:
        verify_export(out, workers=1)
    assert info.value.seq == 1 and "device signature" in str(info.value)
    assert verify_export(out, check_envelopes=False, workers=1).missing_envelopes == 5


def test_refused_and_not_combined_updates_are_left_out_with_their_reason(tmp_path: Path) -> None:
    clock = FakeClock()
    fed = Federation(tmp_path, n=3, per_round=3, rounds=2, clock=clock, round_timeout_s=60, min_participants=1)
    fed.coordinator.rounds.open_next()
    bad, *good = fed.selected()
    with pytest.raises(QflareError) as info:
        submit(fed, [bad], scale=1e6)  # beyond MaxAbsBound: refused after the device signed it
    submit(fed, good)
    clock.advance(61)
    fed.coordinator.rounds.tick()
    (body,) = bodies(fed)
    assert body["outcome"] == "closed" and len(body["updates"]) == 2
    ((device, update_hash, reason),) = body["left_out"]
    assert (device, reason) == (bad.device_id, str(info.value.code)) and len(update_hash) == 64

    k = Federation(tmp_path / "krum", n=3, per_round=3, rounds=1, strategy=krum(f=0, m=1))
    k.coordinator.rounds.open_next()
    submit(k, k.selected())
    (kb,) = bodies(k)
    assert len(kb["updates"]) == 1 and sorted(x[2] for x in kb["left_out"]) == ["not_combined", "not_combined"]
    assert {x[0] for x in kb["left_out"]} | {kb["updates"][0][0]} == {d.device_id for d in k.devices}
    out = tmp_path / "krum.jsonl"
    export_ledger(k.store, k.identity.public, out)
    assert verify_export(out, workers=1).device_signatures == 1


def test_dp_parameters_are_recorded_without_the_noise_seed(tmp_path: Path) -> None:
    strategy = fedavg(transforms=(ClipNorm(1.0),), noise=GaussianNoise(0.5, seed=1234))
    fed = Federation(tmp_path, n=2, per_round=2, rounds=1, strategy=strategy)
    fed.coordinator.rounds.open_next()
    submit(fed, fed.selected())
    (body,) = bodies(fed)
    assert body["dp"] == {
        "mechanism": "GaussianNoise",
        "clip_norm": "1.0",
        "noised_updates": 2,
        "accountant": None,
        "stddev": "0.5",
        "divide_by_count": True,
        "applied_stddev": "0.25",
    }
    assert "1234" not in json.dumps(body)


def test_a_round_left_aggregating_gets_exactly_one_entry_after_restart(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, rounds=2, blobs=blobs)
    rounds = fed.coordinator.rounds
    rounds.open_next()
    real = fed.store.publish_model

    def full(*a: object, **k: object) -> object:
        raise StorageFullError("disk full (drill)")

    fed.store.publish_model = full  # type: ignore[method-assign]
    submit(fed, fed.selected())
    assert fed.store.get_round(1).state == "aggregating" and fed.store.ledger_entries() == []
    fed.store.publish_model = real  # type: ignore[method-assign]
    again = Coordinator(  # a restart on the same database and blobs
        layout=fed.layout,
        initial_flat=torch.zeros(fed.layout.numel),
        strategy=fedavg(),
        identity=fed.identity,
        store=fed.store,
        rounds=RoundConfig(rounds=2, per_round=2, seed=0),
        blobs=blobs,
        clock=time.time,
    )
    assert fed.store.get_round(1).state == "closed"
    rows = fed.store.ledger_entries()
    assert [(r.seq, r.round_number) for r in rows] == [(1, 1)]
    again.rounds.tick()  # the first coordinator's retry would now find the round closed
    assert len(fed.store.ledger_entries()) == 1
    assert entry_of(rows[0]).body["model"] == fed.store.get_model(1).model_hash


def test_ledger_entry_and_model_commit_together(tmp_path: Path) -> None:
    """A ledger entry the store refuses (a moved head) rolls the publication back with it."""
    fed = Federation(tmp_path, n=2, per_round=2, rounds=2)
    rounds = fed.coordinator.rounds
    rounds.open_next()
    real = fed.store.last_ledger_entry
    stale = [None]  # the head the round manager reads first: stale

    def head() -> object:
        return stale.pop() if stale else real()

    fed.store.last_ledger_entry = head  # type: ignore[method-assign]
    fed.store.append_ledger(chain(fed.identity, 1)[0])  # another writer's entry is the head now
    submit(fed, fed.selected())  # the round's entry claims seq 1: refused, and the round fails ...
    assert fed.store.latest_model().version == 0  # ... without a model v1 written
    rows = fed.store.ledger_entries()
    assert [r.round_number for r in rows] == [1, 1] and fed.store.get_round(1).state == "failed"
    assert entry_of(rows[1]).body["outcome"] == "failed"
    assert hashlib.sha256(rows[1].body).hexdigest() == rows[1].entry_hash
