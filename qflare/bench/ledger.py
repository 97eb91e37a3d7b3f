"""``qflare bench ledger``: offline verification speed of a provenance ledger export.

Builds a synthetic export of ``rounds`` round entries with ``updates`` updates each (random update
hashes and device key ids, one ML-DSA-65 coordinator key, a real hash chain and real signatures),
then times :func:`qflare.ledger.verify_export` on it: chain, every coordinator signature, every Merkle
root.  Device signatures are not in that file (an export of 10,000 rounds with 100 envelopes each
would be ~7 GB); their cost is measured on a separate sample of ``envelope_rounds`` entries that carry
real signed UPDATE envelopes of 100 distinct device keys.  Target: 10,000 rounds of 100 updates in
5 s or less.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..crypto.envelope import Field, MsgType, SignedEnvelope, u64
from ..crypto.identity import SigningKey, VerifyKey
from ..crypto.suite import DEFAULT_SUITE
from ..ledger import (
    GENESIS_PREV,
    LedgerEntry,
    RoundRecord,
    RoundUpdate,
    canonical,
    entry_line,
    header_line,
    verify_export,
)
from ..ledger.entry import CONTEXT
from ..ledger.verify import default_workers

__all__ = ["TARGET_S_PER_10000", "run_ledger_bench"]

TARGET_S_PER_10000 = 5.0
_SIGN_CHUNK = 200


def _digest(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _synthetic(r: int, updates: int, devices: list[str]) -> tuple[RoundUpdate, ...]:
    return tuple(RoundUpdate(devices[j % len(devices)], _digest("update", r, j), 10 + j % 90) for j in range(updates))


def _record(r: int, ups: tuple[RoundUpdate, ...], parent: str) -> RoundRecord:
    return RoundRecord(
        round_number=r,
        outcome="closed",
        reason=None,
        parent_model=parent,
        model=_digest("model", r),
        model_version=r,
        updates=ups,
        left_out=(),
        quorum=max(1, len(ups)),
        min_participants=max(1, len(ups)),
        opened=1_700_000_000 + 60 * r,
        closed=1_700_000_000 + 60 * r + 30,
        pipeline={"combine": "ShareCappedMean(max_multiple=3.0, buffered=4)", "server_opt": "ServerSGD(lr=1.0)"},
    )


def _bodies(rounds: int, updates: int, key_id: str) -> Iterator[bytes]:
    """The canonical bodies of a chain (sequential: each names the previous one's hash)."""
    prev, parent = GENESIS_PREV, _digest("model", 0)
    devices = [_digest("device", d) for d in range(max(1, updates))]
    for r in range(1, rounds + 1):
        record = _record(r, _synthetic(r, updates, devices), parent)
        body = {
            **record.fields(),
            "v": 1,
            "kind": "round",
            "seq": r,
            "prev": prev,
            "round": r,
            "time": record.closed,
            "signers": [key_id],
        }
        raw = canonical.encode(body)
        yield raw
        prev, parent = hashlib.sha256(raw).hexdigest(), _digest("model", r)


def _sign_lines(seed: bytes, raws: list[bytes]) -> bytes:
    """Worker: sign each body and return the export lines."""
    key = SigningKey.from_seed("ML-DSA-65", seed)
    out = bytearray()
    for raw in raws:
        entry = LedgerEntry.parse(raw, [(key.key_id, key.sign(raw, CONTEXT))])
        out += entry_line(entry, [None] * len(entry.body["updates"])) + b"\n"
    return bytes(out)


def _chunks(it: Iterator[bytes], n: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_export(path: Path, rounds: int, updates: int, *, workers: int = 1) -> SigningKey:
    """Write a synthetic export (no envelopes) to ``path``; the coordinator key it is signed with."""
    seed = os.urandom(32)
    key = SigningKey.from_seed("ML-DSA-65", seed)
    with path.open("wb") as fh:
        fh.write(header_line(key.public, [], rounds) + b"\n")
        chunks = _chunks(_bodies(rounds, updates, key.key_id), _SIGN_CHUNK)
        if workers <= 1:
            for chunk in chunks:
                fh.write(_sign_lines(seed, chunk))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for lines in pool.map(_sign_lines, itertools.repeat(seed), chunks):
                    fh.write(lines)
    return key


def _envelope_sample(path: Path, rounds: int, updates: int) -> tuple[SigningKey, int]:
    """An export of ``rounds`` entries whose ``updates`` updates carry envelopes signed by distinct devices."""
    key = SigningKey.generate("ML-DSA-65")
    devices = [SigningKey.generate("ML-DSA-65") for _ in range(updates)]
    prev, parent = GENESIS_PREV, _digest("model", 0)
    lines = [header_line(key.public, [d.public for d in devices], rounds)]
    for r in range(1, rounds + 1):
        ups: list[RoundUpdate] = []
        envelopes: list[bytes | None] = []
        for j, dev in enumerate(devices):
            digest = _digest("update", r, j)
            fields = {
                Field.DEVICE_KEY_ID: dev.key_id_bytes,
                Field.ROUND: u64(r),
                Field.BASE_MODEL_HASH: bytes.fromhex(parent),
                Field.UPDATE_HASH: bytes.fromhex(digest),
                Field.NUM_EXAMPLES: u64(10 + j),
                Field.PAYLOAD_SIZE: u64(1000),
            }
            envelopes.append(SignedEnvelope.sign(DEFAULT_SUITE, MsgType.UPDATE, fields, dev).raw)
            ups.append(RoundUpdate(dev.key_id, digest, 10 + j))
        record = _record(r, tuple(ups), parent)
        entry = LedgerEntry.create(
            "round", seq=r, prev_hash=prev, round_number=r, time=record.closed, fields=record.fields(), keys=[key]
        )
        lines.append(entry_line(entry, envelopes))
        prev, parent = entry.entry_hash, str(entry.body["model"])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return key, rounds * updates


def _mldsa_verify_ms(samples: int = 200) -> float:
    """Median ML-DSA-65 verification time here and now (context for the figures: this machine's load)."""
    key = SigningKey.generate("ML-DSA-65")
    public: VerifyKey = key.public
    msg = b"x" * 20_000
    sig = key.sign(msg, CONTEXT)
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        public.verify(sig, msg, CONTEXT)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def run_ledger_bench(
    rounds: int = 10_000, updates: int = 100, *, workers: int | None = None, envelope_rounds: int = 3
) -> dict[str, Any]:
    """Build and verify a synthetic export; the figures (see the module docstring)."""
    used = default_workers(workers)
    scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="qflare-bench-ledger-", dir=scratch_root) as tmp:
        path = Path(tmp) / "ledger.jsonl"
        t = time.perf_counter()
        key = build_export(path, rounds, updates, workers=used)
        build_s = time.perf_counter() - t
        size = path.stat().st_size
        t = time.perf_counter()
        report = verify_export(path, pin=key.key_id, workers=used)
        verify_s = time.perf_counter() - t
        if report.entries != rounds:  # pragma: no cover - the verifier and the builder disagree
            raise RuntimeError(f"verified {report.entries} entries of {rounds}")
        sample: dict[str, Any] | None = None
        if envelope_rounds > 0 and updates > 0:
            epath = Path(tmp) / "envelopes.jsonl"
            ekey, signatures = _envelope_sample(epath, envelope_rounds, updates)
            t = time.perf_counter()
            ereport = verify_export(epath, pin=ekey.key_id, workers=1)
            es = time.perf_counter() - t
            sample = {
                "rounds": envelope_rounds,
                "device_signatures": ereport.device_signatures,
                "verify_s": round(es, 4),
                "ms_per_device_signature": round(es * 1000 / max(1, signatures), 4),
                "workers": 1,
            }
    per_1000 = verify_s * 1000 / rounds
    return {
        "rounds": rounds,
        "updates_per_round": updates,
        "workers": used,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "file_mb": round(size / 1e6, 2),
        "build_s": round(build_s, 3),
        "verify_s": round(verify_s, 3),
        "verify_s_per_1000_entries": round(per_1000, 4),
        "projected_s_for_10000": round(per_1000 * 10, 3),
        "target_s_for_10000": TARGET_S_PER_10000,
        "meets_target": per_1000 * 10 <= TARGET_S_PER_10000,
        "mldsa65_verify_ms_median": round(_mldsa_verify_ms(), 4),
        "envelope_sample": sample,
    }
