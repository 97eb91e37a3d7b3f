"""``qflare bench ingest``: its JSON contract, and the database check that counts lost and duplicated updates."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qflare.bench.ingest import check_database
from qflare.crypto import SigningKey
from qflare.protocol import Receipt
from qflare.storage import BlobStore, Store
from qflare.storage.testing import scratch_database

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _round_with_updates(tmp_path: Path, stored: int, acked: int) -> tuple[str, BlobStore, list[tuple[str, Receipt]]]:
    """A database with one open round where ``stored`` devices' updates are recorded (and their blobs
    written), and receipts for the first ``acked`` devices."""
    blobs = BlobStore(tmp_path / "blobs")
    with scratch_database("sqlite", tmp_path) as db:
        store = Store(db)
        keys = [SigningKey.generate() for _ in range(max(stored, acked))]
        tokens = store.create_tokens(len(keys), timedelta(hours=1))
        for key, token in zip(keys, tokens, strict=True):
            store.enroll_device(token, key.key_id, key.alg, key.public.raw, b"record")
        ids = [k.key_id for k in keys]
        store.open_round(1, "ab" * 32, ids, 1, len(ids), datetime.now(UTC) + timedelta(hours=1))
        hashes = []
        for i, device_id in enumerate(ids):
            digest, _ = blobs.put(f"update {i}".encode())
            hashes.append(digest)
            if i < stored:
                store.record_update(1, device_id, digest, "ab" * 32, 10, b"sig", {})
        url = db.url
    receipts = [(ids[i], Receipt(1, hashes[i], i + 1)) for i in range(acked)]
    return url, blobs, receipts


def test_check_counts_nothing_when_every_receipt_has_its_row(tmp_path: Path) -> None:
    url, blobs, receipts = _round_with_updates(tmp_path, stored=3, acked=3)
    check = check_database(url, blobs, receipts)
    assert (check.rows, check.lost, check.duplicated) == (3, 0, 0)


def test_check_counts_an_acknowledged_update_missing_from_the_table_as_lost(tmp_path: Path) -> None:
    url, blobs, receipts = _round_with_updates(tmp_path, stored=2, acked=3)
    assert check_database(url, blobs, receipts).lost == 1


def test_check_counts_a_missing_blob_as_lost(tmp_path: Path) -> None:
    url, blobs, receipts = _round_with_updates(tmp_path, stored=3, acked=3)
    assert blobs.delete(receipts[0][1].update_hash)
    assert check_database(url, blobs, receipts).lost == 1


def test_check_counts_a_receipt_that_counted_an_update_twice(tmp_path: Path) -> None:
    url, blobs, receipts = _round_with_updates(tmp_path, stored=3, acked=3)
    device_id, r = receipts[2]
    receipts[2] = (device_id, Receipt(r.round, r.update_hash, updates_in_round=2))  # the running count did not advance
    assert check_database(url, blobs, receipts).duplicated == 1
    # several workers each count what they have seen of the round: equal counts are no evidence there
    assert check_database(url, blobs, receipts, unique_counts=False).duplicated == 0
    receipts[2] = (
        device_id,
        Receipt(r.round, r.update_hash, updates_in_round=2, duplicate=True),
    )  # an idempotent retry
    assert check_database(url, blobs, receipts).duplicated == 0


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (make data installs it)")
def test_ingest_contract() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qflare", "bench", "ingest", "--devices", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "accepted",
        "lost",
        "duplicated",
        "mb_per_s",
        "updates_per_s",
        "p50_ms",
        "p99_ms",
        "server_peak_rss_mb",
        "server_rss_before_mb",
        "max_uploads",
        "devices",
    ):
        assert key in res, key
    assert res["devices"] == 10 and res["accepted"] == 10 and res["failed"] == 0
    assert res["lost"] == 0 and res["duplicated"] == 0
    assert res["rows"] == 10 and res["model_updates"] == 10
    assert res["server_state_after"] == "finished" and res["server_exit"] == 0
    assert res["mb_per_s"] > 0 and 0 < res["p50_ms"] <= res["p99_ms"]
    assert res["server_peak_rss_mb"] >= res["server_rss_before_mb"] > 0
