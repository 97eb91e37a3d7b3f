"""The provenance ledger format and its offline verifier: canonical JSON, Merkle proofs, entries, and every
kind of tampering with an export (altered, deleted, inserted, reordered entries; a changed model byte)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ledger_fixtures import chain, coordinator_key, h, round_entry, write_export
from typer.testing import CliRunner

from qflare.cli import app
from qflare.errors import ConfigError, MalformedError
from qflare.ledger import (
    GENESIS_PREV,
    InclusionProof,
    LedgerEntry,
    LedgerVerifyError,
    RoundUpdate,
    canonical,
    inclusion_proof,
    merkle_root,
    update_leaf,
    verify_export,
    verify_inclusion,
)
from qflare.ledger.merkle import EMPTY_ROOT, leaf_hash

KEY = coordinator_key()


# ------------------------------------------------------------------------------------------ canonical JSON
@pytest.mark.parametrize(
    "text",
    [
        b'{"b":1,"a":2}',  # key order
        b'{"a": 1}',  # whitespace
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":1.0}',  # float
        b'{"a":1e3}',
        b'{"a":NaN}',
        b'{"A":1}',  # key outside [a-z0-9_]
        b'{"a":"\\u00E9"}',  # uppercase escape
        '{"a":"é"}'.encode(),  # raw non-ASCII
        b'{"a":"\\/"}',  # needless escape
        b"[1,2",
        b"",
    ],
)
def test_canonical_decode_refuses_every_other_encoding(text: bytes) -> None:
    with pytest.raises(MalformedError):
        canonical.decode(text)


def test_canonical_round_trip_and_encode_refusals() -> None:
    value = {"z": [1, -2, None, True, "é\U0001f600"], "a": {"k_1": "x"}}
    raw = canonical.encode(value)
    assert raw == b'{"a":{"k_1":"x"},"z":[1,-2,null,true,"\\u00e9\\ud83d\\ude00"]}'
    assert canonical.decode(raw) == value
    for bad in ({"a": 0.5}, {"a": (1,)}, {1: 1}, {"a": float("inf")}, {"a": object()}):
        with pytest.raises(ConfigError):
            canonical.encode(bad)
    assert canonical.decimal(1e-06) == "1e-06" and canonical.decimal(3) == "3.0"


# ------------------------------------------------------------------------------------------ Merkle trees
def test_merkle_root_matches_rfc6962_definition() -> None:
    def mth(leaves: list[bytes]) -> bytes:  # the recursive definition, written out
        if not leaves:
            return hashlib.sha256(b"").digest()
        if len(leaves) == 1:
            return hashlib.sha256(b"\x00" + leaves[0]).digest()
        k = 1 << ((len(leaves) - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()

    for n in range(0, 20):
        leaves = [bytes([i]) * (i + 1) for i in range(n)]
        assert merkle_root(leaves) == mth(leaves)
    assert merkle_root([]) == EMPTY_ROOT
    assert leaf_hash(b"") != hashlib.sha256(b"\x01").digest()  # domain separation


def test_inclusion_proofs_verify_and_reject() -> None:
    for n in range(1, 18):
        leaves = [b"leaf-%d" % i for i in range(n)]
        root = merkle_root(leaves)
        for i in range(n):
            proof = inclusion_proof(leaves, i)
            assert verify_inclusion(leaves[i], proof, root)
            assert InclusionProof.from_json(json.loads(json.dumps(proof.to_json()))) == proof
            assert not verify_inclusion(leaves[i] + b"x", proof, root)
            assert not verify_inclusion(leaves[i], proof, hashlib.sha256(root).digest())
            if n > 1:
                assert not verify_inclusion(leaves[(i + 1) % n], proof, root)
                assert not verify_inclusion(leaves[i], InclusionProof((i + 1) % n, n, proof.path), root)
            if proof.path:
                assert not verify_inclusion(leaves[i], InclusionProof(i, n, proof.path[:-1]), root)
    with pytest.raises(ConfigError):
        inclusion_proof([b"a"], 1)
    for bad in ({"index": 2, "size": 2, "path": []}, {"index": 0, "size": 1, "path": ["zz"]}, [], {"index": 0}):
        with pytest.raises(MalformedError):
            InclusionProof.from_json(bad)


def test_update_leaf_layout() -> None:
    leaf = update_leaf(h("d"), h("u"), 300)
    assert leaf == bytes.fromhex(h("d")) + bytes.fromhex(h("u")) + (300).to_bytes(8, "big") and len(leaf) == 72
    with pytest.raises(ConfigError):
        update_leaf("zz", h("u"), 1)


# ------------------------------------------------------------------------------------------ entries
def test_entry_signature_binds_body_and_context() -> None:
    entry = chain(KEY, 1)[0]
    assert entry.entry_hash == hashlib.sha256(entry.raw).hexdigest() and entry.prev_hash == GENESIS_PREV
    again = LedgerEntry.parse(entry.raw, entry.signatures)
    again.verify({KEY.key_id: KEY.public})
    other = coordinator_key("other")
    with pytest.raises(MalformedError):
        again.verify({other.key_id: other.public})
    forged = entry.raw.replace(b'"round":1', b'"round":2')
    with pytest.raises(Exception) as info:
        LedgerEntry.parse(forged, entry.signatures).verify({KEY.key_id: KEY.public})
    assert getattr(info.value, "code", None) == "bad_signature"
    foreign = KEY.sign(entry.raw, b"qflare/v1/update")  # a signature made for another purpose
    with pytest.raises(Exception) as info:
        LedgerEntry.parse(entry.raw, [(KEY.key_id, foreign)]).verify({KEY.key_id: KEY.public})
    assert getattr(info.value, "code", None) == "bad_signature"


def test_entry_create_refuses_bad_fields() -> None:
    with pytest.raises(ConfigError):
        round_entry(KEY, seq=0, prev=GENESIS_PREV, round_number=1, parent=h("m"), model=h("n"))
    with pytest.raises(ConfigError):
        round_entry(KEY, seq=1, prev="xyz", round_number=1, parent=h("m"), model=h("n"))
    with pytest.raises(ConfigError):
        LedgerEntry.create("no_such_kind", seq=1, prev_hash=GENESIS_PREV, round_number=1, time=0, fields={}, keys=[KEY])


# ------------------------------------------------------------------------------------------ verify
def _export(tmp_path: Path, rounds: int = 6, **kw: object) -> tuple[Path, list[LedgerEntry]]:
    entries = chain(KEY, rounds, failed=(3,), **kw)  # type: ignore[arg-type]
    return write_export(tmp_path / "ledger.jsonl", KEY, entries), entries


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _fails(path: Path, seq: int | None, *, pin: str | None = None, model: Path | None = None) -> LedgerVerifyError:
    with pytest.raises(LedgerVerifyError) as info:
        verify_export(path, pin=pin, model=model, workers=1)
    assert info.value.seq == seq, str(info.value)
    assert info.value.code == "ledger_invalid"
    return info.value


def test_an_intact_export_verifies(tmp_path: Path) -> None:
    path, entries = _export(tmp_path)
    for workers in (1, 3):
        report = verify_export(path, pin=KEY.key_id, workers=workers)
        assert (report.entries, report.rounds, report.pinned, report.head) == (6, 6, True, entries[-1].entry_hash)
    assert not verify_export(path, workers=1).pinned


@pytest.mark.parametrize("victim", [1, 2, 4, 6])
def test_altering_any_entry_is_caught_and_named(tmp_path: Path, victim: int) -> None:
    path, _ = _export(tmp_path)
    lines = _lines(path)
    body = json.loads(lines[victim])
    body["body"]["updates"][0][2] += 1  # one example count, everything else re-encoded canonically
    lines[victim] = canonical.encode(body)
    err = _fails(_write(path, lines), victim)
    assert f"entry {victim} (round {victim}" in str(err)


def test_altering_a_byte_anywhere_in_an_entry_line_is_caught(tmp_path: Path) -> None:
    path, _ = _export(tmp_path, rounds=3)
    original = _lines(path)
    line = original[2]
    for pos in range(0, len(line), max(1, len(line) // 97)):
        lines = list(original)
        changed = bytearray(line)
        changed[pos] = changed[pos] ^ 0x01
        lines[2] = bytes(changed)
        try:
            verify_export(_write(path, lines), workers=1)
        except LedgerVerifyError as exc:
            assert exc.seq == 2, (pos, str(exc))
        else:
            raise AssertionError(f"flipping byte {pos} of entry 2 went unnoticed")


def test_a_consistently_resigned_entry_needs_the_pinned_key(tmp_path: Path) -> None:
    """Rebuilding the whole chain under another key verifies only when nobody pins the real key."""
    forger = coordinator_key("forger")
    forged = chain(forger, 4)
    path = write_export(tmp_path / "forged.jsonl", forger, forged)
    verify_export(path, workers=1)  # trusting the key in the file: consistent
    err = _fails(path, None, pin=KEY.key_id)
    assert "header" in str(err) and "pinned" in str(err)
    # the real header with a forged entry spliced in
    real, _ = _export(tmp_path, rounds=4)
    lines = _lines(real)
    lines[3] = _lines(path)[3]
    _fails(_write(real, lines), 3)


def test_deleting_inserting_and_reordering_are_caught(tmp_path: Path) -> None:
    path, entries = _export(tmp_path)
    lines = _lines(path)
    err = _fails(_write(path, [*lines[:3], *lines[4:]]), 3)  # entry 3 deleted: entry 4 sits at seq 3
    assert "seq is 4, expected 3" in str(err)
    _fails(_write(path, [lines[0], *lines[2:]]), 1)  # the first entry deleted
    _fails(_write(path, lines[:-1]), 6)  # the last one deleted: the header's count names it
    _fails(_write(path, [*lines[:3], lines[2], *lines[3:]]), 3)  # entry 2 duplicated after itself
    _fails(_write(path, [lines[0], lines[1], lines[3], lines[2], *lines[4:]]), 2)  # 2 and 3 swapped
    extra = round_entry(KEY, seq=7, prev=entries[-1].entry_hash, round_number=7, parent=h("model", 6), model=h("x"))
    from qflare.ledger import entry_line

    _fails(_write(path, [*lines, entry_line(extra, [])]), None)  # appended beyond the header's count
    # a validly signed entry inserted in the middle, chained correctly to its predecessor
    inserted = round_entry(KEY, seq=3, prev=entries[1].entry_hash, round_number=3, parent=h("model", 2), model=None)
    _fails(_write(path, [*lines[:3], entry_line(inserted, []), *lines[3:]]), 4)


def test_lineage_and_round_order_are_checked(tmp_path: Path) -> None:
    e1 = chain(KEY, 1)[0]
    bad_parent = round_entry(KEY, seq=2, prev=e1.entry_hash, round_number=2, parent=h("elsewhere"), model=h("m2"))
    err = _fails(write_export(tmp_path / "a.jsonl", KEY, [e1, bad_parent]), 2)
    assert "parent_model" in str(err)
    back = round_entry(KEY, seq=2, prev=e1.entry_hash, round_number=1, parent=h("model", 1), model=h("m2"))
    assert "does not come after" in str(_fails(write_export(tmp_path / "b.jsonl", KEY, [e1, back]), 2))


def test_merkle_root_mismatch_is_named(tmp_path: Path) -> None:
    ups = [RoundUpdate(h("d", i), h("u", i), 5) for i in range(3)]
    entry = round_entry(KEY, seq=1, prev=GENESIS_PREV, round_number=1, parent=h("m0"), model=h("m1"), updates=ups)
    body = dict(entry.body)
    body["updates_root"] = merkle_root([u.leaf() for u in ups[:2]]).hex()
    raw = canonical.encode(body)
    forged = LedgerEntry.parse(raw, [(KEY.key_id, KEY.sign(raw, b"qflare/v1/ledger-entry"))])  # signed, but wrong
    err = _fails(write_export(tmp_path / "m.jsonl", KEY, [forged]), 1)
    assert "Merkle root" in str(err)


def _model_file(path: Path, version: int, payload: bytes) -> Path:
    header = json.dumps({"__metadata__": {"version": str(version)}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + payload)
    return path


def test_model_file_is_matched_and_a_changed_byte_names_its_entry(tmp_path: Path) -> None:
    m1 = _model_file(tmp_path / "v1.safetensors", 1, b"weights-1")
    m2 = _model_file(tmp_path / "v2.safetensors", 2, b"weights-2")
    e1 = round_entry(KEY, seq=1, prev=GENESIS_PREV, round_number=1, parent=h("m0"), model=_sha(m1))
    e2 = round_entry(KEY, seq=2, prev=e1.entry_hash, round_number=2, parent=_sha(m1), model=_sha(m2))
    path = write_export(tmp_path / "l.jsonl", KEY, [e1, e2])
    report = verify_export(path, model=m2, workers=1)
    assert report.model is not None and (report.model.seq, report.model.model_version) == (2, 2)
    data = bytearray(m2.read_bytes())
    data[-1] ^= 0xFF
    m2.write_bytes(bytes(data))
    err = _fails(path, 2, model=m2)
    assert "entry 2 (round 2)" in str(err) and "model version 2" in str(err)
    (tmp_path / "junk").write_bytes(b"not a model")
    assert _fails(path, None, model=tmp_path / "junk").where == "model"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"not json\n", b'{"format":"qflare-ledger"}\n', b"\xff\xfe\n", b"[]\n" * 3, b'{"a":' * 5000],
)
def test_garbage_files_fail_cleanly(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(content)
    with pytest.raises(LedgerVerifyError):
        verify_export(path, workers=1)


def test_garbage_entry_lines_fail_cleanly(tmp_path: Path) -> None:
    path, _ = _export(tmp_path, rounds=2)
    header = _lines(path)[0]
    for junk in (b"{}", b"[]", b"null", b'{"body":{}}', b'{"a":' * 3000, b"\x00" * 10):
        _fails(_write(path, [header, junk]), 1)


def test_cli_verify_reports_one_line_and_exit_status(tmp_path: Path) -> None:
    path, _ = _export(tmp_path, rounds=3)
    runner = CliRunner()
    ok = runner.invoke(app, ["ledger", "verify", str(path), "--pin", KEY.key_id, "--workers", "1"])
    assert ok.exit_code == 0 and "pinned" in ok.output and "NOT pinned" not in ok.output, ok.output
    unpinned = runner.invoke(app, ["ledger", "verify", str(path), "--workers", "1"])
    assert unpinned.exit_code == 0 and "NOT pinned" in unpinned.output
    lines = _lines(path)
    _write(path, [lines[0], lines[1], lines[3]])
    bad = runner.invoke(app, ["ledger", "verify", str(path), "--workers", "1"])
    assert bad.exit_code == 1 and "entry 2" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    usage = runner.invoke(app, ["ledger", "verify", str(path), "--pin", "nothex"])
    assert usage.exit_code == 2 and "Traceback" not in usage.output


def test_ledger_package_imports_no_storage_or_server() -> None:
    code = "import sys, json, qflare.ledger, qflare.ledger.verify; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert not [
        m for m in loaded if m.startswith(("sqlalchemy", "alembic", "fastapi", "qflare.storage", "qflare.server"))
    ]


def test_random_damage_is_reported_never_raised_otherwise(tmp_path: Path) -> None:
    import random

    path, _ = _export(tmp_path, rounds=3)
    data = path.read_bytes()
    rng = random.Random(7)
    damaged = tmp_path / "damaged.jsonl"
    for _ in range(150):
        d = bytearray(data)
        j = rng.randrange(len(d) - 1)  # never only the final newline
        op = rng.randrange(3)
        if op == 0:
            d[j] = (d[j] + rng.randrange(1, 256)) % 256
        elif op == 1:
            d[j:j] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        else:
            del d[j : j + rng.randrange(1, 200)]
        damaged.write_bytes(bytes(d))
        with pytest.raises(LedgerVerifyError):
            verify_export(damaged, workers=1)
