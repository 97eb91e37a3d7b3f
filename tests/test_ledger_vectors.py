"""Known-answer tests against tests/vectors/ledger_v1.json (docs/provenance.md, "Test vectors")."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qflare.crypto.identity import SigningKey, key_id_of
from qflare.errors import MalformedError
from qflare.ledger import (
    InclusionProof,
    LedgerEntry,
    LedgerVerifyError,
    canonical,
    merkle_root,
    update_leaf,
    verify_export,
    verify_inclusion,
)

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "ledger_v1.json").read_text())
D = VECTORS["deterministic"]


def test_format() -> None:
    assert VECTORS["format"] == "qflare-ledger-vectors" and VECTORS["version"] == 1
    assert D["context"] == "qflare/v1/ledger-entry" and D["genesis_prev"] == "0" * 64


def test_canonical_json() -> None:
    for case in D["canonical_json"]["encode"]:
        assert canonical.encode(case["value"]).decode("ascii") == case["canonical"]
        assert canonical.decode(case["canonical"].encode("ascii")) == case["value"]
    for text in D["canonical_json"]["refused"]:
        with pytest.raises(MalformedError):
            canonical.decode(text.encode())
    for given, want in D["canonical_json"]["decimal"].items():
        assert canonical.decimal(float(given)) == want


def test_merkle() -> None:
    m = D["merkle"]
    assert merkle_root([]).hex() == m["empty_root"] == hashlib.sha256(b"").hexdigest()
    for tree in m["trees"]:
        leaves = [bytes.fromhex(x) for x in tree["leaves"]]
        assert merkle_root(leaves).hex() == tree["root"]
        for i, proof in enumerate(tree["proofs"]):
            assert verify_inclusion(leaves[i], InclusionProof.from_json(proof), bytes.fromhex(tree["root"]))
    u = m["update_leaf"]
    assert update_leaf(u["device"], u["update_hash"], u["examples"]).hex() == u["leaf"]


def test_keys_from_seeds() -> None:
    k = D["keys"]
    coordinator = SigningKey.from_seed(k["alg"], bytes.fromhex(k["coordinator_seed"]))
    assert coordinator.public.raw.hex() == k["coordinator_public"]
    assert key_id_of(bytes.fromhex(k["coordinator_public"])) == k["coordinator_key_id"]
    assert [SigningKey.from_seed(k["alg"], bytes.fromhex(s)).key_id for s in k["device_seeds"]] == k["device_key_ids"]


def test_entries_and_recorded_export(tmp_path: Path) -> None:
    export = VECTORS["recorded"]["export"].encode("ascii")
    lines = export.splitlines()
    assert lines[0].decode() == D["header_line"]
    for i, entry in enumerate(D["entries"], start=1):
        body = entry["body"].encode("ascii")
        assert hashlib.sha256(body).hexdigest() == entry["entry_hash"]
        assert canonical.decode(body)["updates_root"] == entry["updates_root"]
        line = json.loads(lines[i])
        parsed = LedgerEntry.parse(body, [(k, bytes.fromhex(s)) for k, s in line["sigs"]])
        assert parsed.entry_hash == line["entry_hash"] == entry["entry_hash"]
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(export)
    report = verify_export(path, pin=D["keys"]["coordinator_key_id"], workers=1)
    assert (report.entries, report.rounds, report.device_signatures) == (3, 3, 5)


def _mutations(lines: list[bytes]) -> list[tuple[list[bytes], str | None]]:
    flipped = json.loads(lines[3])
    root = flipped["body"]["updates_root"]
    flipped["body"]["updates_root"] = root[:-1] + ("0" if root[-1] != "0" else "1")
    return [
        ([lines[0], lines[1], lines[3]], None),
        ([lines[0], lines[2], lines[1], lines[3]], None),
        ([lines[0], lines[1], lines[2], canonical.encode(flipped)], None),
        (lines[:3], None),
        (lines, "0" * 64),
    ]


def test_negative_vectors(tmp_path: Path) -> None:
    lines = VECTORS["recorded"]["export"].encode("ascii").splitlines()
    path = tmp_path / "ledger.jsonl"
    for (changed, pin), want in zip(_mutations(lines), D["negative"], strict=True):
        path.write_bytes(b"\n".join(changed) + b"\n")
        with pytest.raises(LedgerVerifyError) as info:
            verify_export(path, pin=pin, workers=1)
        assert info.value.seq == want["names_entry"], (want["change"], str(info.value))


def test_generator_check_passes() -> None:
    script = Path(__file__).parent / "vectors" / "make_ledger_vectors.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_rotation_vectors(tmp_path: Path) -> None:
    from qflare.crypto.rotation import ROTATION_OLD_CONTEXT, KeyRevocation, KeyRotation, parse_record

    r = D["rotation"]
    k = D["keys"]
    new = SigningKey.from_seed(k["alg"], bytes.fromhex(r["new_key_seed"]))
    assert new.key_id == r["new_key_id"]
    export = VECTORS["recorded"]["rotation_export"].encode("ascii")
    lines = export.splitlines()
    assert lines[0].decode() == r["header_line"]
    bodies = [json.loads(x)["body"] for x in lines[1:]]
    assert [b["kind"] for b in bodies] == r["kinds"] and [b["signers"] for b in bodies] == r["signers"]
    rotation = parse_record(bytes.fromhex(bodies[1]["record"]))
    revocation = parse_record(bytes.fromhex(bodies[3]["record"]))
    assert isinstance(rotation, KeyRotation) and isinstance(revocation, KeyRevocation)
    assert rotation.body.hex() == r["rotation_signed_part"] and rotation.verify()
    assert bodies[1]["record_sha256"] == hashlib.sha256(rotation.raw).hexdigest()
    assert (revocation.sequence, revocation.revoked_key_id, revocation.signer_key_id, revocation.reason) == tuple(
        r["revocation"].values()
    )
    path = tmp_path / "rotated.jsonl"
    path.write_bytes(export)
    report = verify_export(path, pin=k["coordinator_key_id"], workers=1)
    assert report.key_chain == (k["coordinator_key_id"], new.key_id) and report.revoked == (k["coordinator_key_id"],)
    # negative 1: round 2 re-signed by the old key; negative 2: the record's old signature made by the new key
    old = SigningKey.from_seed(k["alg"], bytes.fromhex(k["coordinator_seed"]))
    entry = LedgerEntry.parse(
        canonical.encode(bodies[2]), [(new.key_id, bytes.fromhex(json.loads(lines[3])["sigs"][0][1]))]
    )
    body = dict(entry.body) | {"signers": [old.key_id]}
    resigned = json.loads(lines[3]) | {"body": body}
    raw = canonical.encode(body)
    resigned |= {
        "entry_hash": hashlib.sha256(raw).hexdigest(),
        "sigs": [[old.key_id, old.sign(raw, b"qflare/v1/ledger-entry").hex()]],
    }
    fake = rotation.body + new.sign(rotation.body, ROTATION_OLD_CONTEXT) + rotation.new_signature
    forged = json.loads(lines[2])
    forged["body"] |= {"record": fake.hex(), "record_sha256": hashlib.sha256(fake).hexdigest()}
    raw = canonical.encode(forged["body"])
    forged |= {
        "entry_hash": hashlib.sha256(raw).hexdigest(),
        "sigs": [[key.key_id, key.sign(raw, b"qflare/v1/ledger-entry").hex()] for key in (old, new)],
    }
    for index, line, want in ((3, resigned, r["negative"][0]), (2, forged, r["negative"][1])):
        changed = list(lines)
        changed[index] = canonical.encode(line)
        path.write_bytes(b"\n".join(changed) + b"\n")
        with pytest.raises(LedgerVerifyError) as info:
            verify_export(path, pin=k["coordinator_key_id"], workers=1)
        assert info.value.seq == want["names_entry"], (want["change"], str(info.value))
