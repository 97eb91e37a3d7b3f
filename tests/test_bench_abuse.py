"""``qflare bench abuse``: its JSON contract on a short run (2 s per attacker), and the orphan-blob count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qflare.bench.abuse import ATTACKERS, count_orphan_blobs
from qflare.crypto import SigningKey
from qflare.storage import BlobStore, Store
from qflare.storage.testing import scratch_database

KEYS = {
    "honest_rounds_completed",
    "honest_handshake_p99_ms_baseline",
    "honest_handshake_p99_ms_under_attack",
    "honest_upload_p99_ms_under_attack",
    "server_peak_rss_mb",
    "http_5xx",
    "orphan_blobs",
    "attackers",
    "meets_targets",
}


def test_orphan_blobs_are_files_no_row_references(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    with scratch_database("sqlite", tmp_path) as db:
        store = Store(db)
        key = SigningKey.generate()
        (token,) = store.create_tokens(1, timedelta(hours=1))
        store.enroll_device(token, key.key_id, key.alg, key.public.raw, b"record")
        kept, _ = blobs.put(b"an update")
        store.open_round(1, "ab" * 32, [key.key_id], 1, 1, datetime.now(UTC) + timedelta(hours=1))
        store.record_update(1, key.key_id, kept, "ab" * 32, 10, b"sig", {})
        blobs.put(b"nobody's update")
        (blobs.root / ".tmp-abc.part").write_bytes(b"half")
        assert count_orphan_blobs(tmp_path, db.url) == {"blob_files": 2, "unreferenced": 1, "temp_files": 1}


@pytest.mark.slow
def test_abuse_bench_json_contract() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qflare",
            "bench",
            "abuse",
            "--json",
            "--duration-s",
            "2",
            "--devices",
            "3",
            "--rounds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= KEYS
    assert isinstance(result["meets_targets"], bool)
    # the honest federation made progress, and its handshakes were timed before and during the attacks
    assert result["honest_rounds_completed"] >= 1
    assert result["honest_handshakes_baseline"] > 0 and result["honest_handshakes_under_attack"] > 0
    assert result["honest_handshake_p99_ms_baseline"] > 0
    assert result["server_peak_rss_mb"] > 0
    attackers = result["attackers"]
    assert set(attackers) == set(ATTACKERS)
    for name, a in attackers.items():
        assert "error" not in a, (name, a)
        assert a["requests"] > 0 and a["bytes_sent"] > 0, (name, a)
    assert attackers["slow_uploads"]["connections_opened"] > 0
    assert len(attackers["handshake_flood"]["addresses"]) == 16
    # garbage tokens, malformed and oversized bodies are refused
    assert attackers["enroll_flood"]["refused_4xx"] > 0
    assert attackers["bad_bodies"]["refused_4xx"] > 0
    assert attackers["handshake_flood"]["statuses"], "the flood got no answer at all"
