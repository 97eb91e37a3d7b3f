"""``qflare server rotate-key`` / ``revoke-key``: files, records, crash safety and the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qflare.server.rotation as rotation_module
from qflare.cli import app
from qflare.crypto import SigningKey
from qflare.crypto.rotation import KeyRevocation, KeyRotation, ledger_embedding
from qflare.errors import QflareError
from qflare.server.credentials import load_or_create_identity
from qflare.server.rotation import LOG_FILE, NEXT_KEY_FILE, load_chain, recover, revoke_key, rotate_key


def _setup(tmp_path: Path, passphrase: bytes | None = None) -> SigningKey:
    return load_or_create_identity(tmp_path, passphrase, "ML-DSA-65")[0]


def _files(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".rotate.lock"}


def test_rotate_replaces_the_key_and_records_it(tmp_path: Path) -> None:
    old = _setup(tmp_path)
    result = rotate_key(tmp_path, reason="scheduled")
    new = SigningKey.load(tmp_path / "coordinator.key", None)
    assert result.old_key_id == old.key_id and result.new_key_id == new.key_id != old.key_id
    assert (tmp_path / "coordinator.keyid").read_text().strip() == new.key_id
    assert (tmp_path / "coordinator.pub").read_text().strip() == new.public.raw.hex()
    assert stat.S_IMODE(os.stat(tmp_path / "coordinator.key").st_mode) == 0o600
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    assert (tmp_path / "retired-keys" / f"{old.key_id}.pub").read_text().strip() == old.public.raw.hex()
    old_pem = old.to_pem(None)
    assert not any(old_pem in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())  # private key gone
    chain = load_chain(tmp_path)
    assert chain.keys == (old.public, new.public) and chain.revoked == frozenset()
    (rec,) = chain.records
    assert isinstance(rec, KeyRotation) and rec.reason == "scheduled"
    line = json.loads((tmp_path / LOG_FILE).read_text())
    assert line == {"sequence": 1, "kind": "key_rotation", "sha256": rec.digest.hex(), "record": rec.raw.hex()}
    assert ledger_embedding(bytes.fromhex(line["record"])).sha256 == line["sha256"]


def test_rotate_with_revoke_then_revoke_an_earlier_key(tmp_path: Path) -> None:
    k0 = _setup(tmp_path)
    r1 = rotate_key(tmp_path)
    r2 = rotate_key(tmp_path, revoke_old=True, revoke_reason="compromised")
    assert [type(r) for r in r2.records] == [KeyRotation, KeyRevocation]
    assert load_chain(tmp_path).revoked == {r1.new_key_id}
    r3 = revoke_key(tmp_path, k0.key_id.upper(), reason="retired for good")
    chain = load_chain(tmp_path)
    assert chain.revoked == {k0.key_id, r1.new_key_id} and chain.next_sequence == 5
    assert r3.new_key_id == r2.new_key_id == chain.current.key_id  # type: ignore[union-attr]
    before = _files(tmp_path)
    for bad in (r2.new_key_id, k0.key_id, "ab" * 32, "zz"):  # current, already revoked, unknown, not hex
        with pytest.raises(QflareError):
            revoke_key(tmp_path, bad)
        assert _files(tmp_path) == before


def test_passphrase_is_kept_for_the_new_key(tmp_path: Path) -> None:
    _setup(tmp_path, b"secret words")
    rotate_key(tmp_path, b"secret words")
    with pytest.raises(QflareError) as info:
        SigningKey.load(tmp_path / "coordinator.key", None)
    assert info.value.code == "passphrase_required"
    SigningKey.load(tmp_path / "coordinator.key", b"secret words")
    with pytest.raises(QflareError) as info:
        rotate_key(tmp_path, b"wrong")
    assert info.value.code == "bad_passphrase"


@pytest.mark.parametrize("step", ["_write_log", "_install_key"])
def test_a_crash_mid_rotation_never_splits_key_and_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    old = _setup(tmp_path)
    real = getattr(rotation_module, step)

    def crash(*args: object) -> None:
        raise OSError("injected crash")

    monkeypatch.setattr(rotation_module, step, crash)
    with pytest.raises(OSError):
        rotate_key(tmp_path)
    monkeypatch.setattr(rotation_module, step, real)
    pending = SigningKey.load(tmp_path / NEXT_KEY_FILE, None)
    stale = tmp_path / f".{NEXT_KEY_FILE}.123.abcd.tmp"  # as a save killed mid-write leaves it
    stale.write_bytes(b"partial")
    chain = recover(tmp_path, None)  # what the next start (or rotate-key) does
    key = SigningKey.load(tmp_path / "coordinator.key", None)
    if step == "_write_log":  # before the commit point: the rotation never happened
        assert key.key_id == old.key_id and chain.records == () and not (tmp_path / LOG_FILE).exists()
    else:  # after it: the rotation is finished
        assert key.key_id == pending.key_id == chain.current.key_id  # type: ignore[union-attr]
        assert (tmp_path / "coordinator.keyid").read_text().strip() == key.key_id
    assert not (tmp_path / NEXT_KEY_FILE).exists() and not stale.exists()
    rotate_key(tmp_path)  # and rotating again works from there
    assert recover(tmp_path, None).current == SigningKey.load(tmp_path / "coordinator.key", None).public


def test_a_key_that_does_not_match_the_log_is_refused(tmp_path: Path) -> None:
    old = _setup(tmp_path)
    old_pem = (tmp_path / "coordinator.key").read_bytes()
    rotate_key(tmp_path)
    (tmp_path / "coordinator.key").unlink()
    (tmp_path / "coordinator.key").write_bytes(old_pem)  # an operator restores a backup of the old key
    os.chmod(tmp_path / "coordinator.key", 0o600)
    before = _files(tmp_path)
    for call in (lambda: recover(tmp_path, None), lambda: rotate_key(tmp_path)):
        with pytest.raises(QflareError) as info:
            call()
        assert info.value.code == "rotation_incomplete"
    assert _files(tmp_path) == before
    (tmp_path / "coordinator.key").unlink()
    with pytest.raises(QflareError) as info:
        recover(tmp_path, None)  # a log without its key: the server must not generate a fresh one
    assert info.value.code == "rotation_incomplete"
    assert old.key_id != load_chain(tmp_path).current.key_id  # type: ignore[union-attr]


def test_a_damaged_log_is_refused(tmp_path: Path) -> None:
    _setup(tmp_path)
    rotate_key(tmp_path)
    log = tmp_path / LOG_FILE
    good = json.loads(log.read_text())
    for bad in ("not json\n", json.dumps(good | {"sha256": "00" * 32}) + "\n", json.dumps({"record": 5}) + "\n"):
        log.write_text(bad)
        with pytest.raises(QflareError) as info:
            load_chain(tmp_path)
        assert info.value.code == "bad_rotation_record"


def test_cli_rotate_key(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["server", "rotate-key", "--data-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "key_file_missing" in missing.output and "Traceback" not in missing.output
    old = _setup(tmp_path)
    out = runner.invoke(
        app, ["server", "rotate-key", "--data-dir", str(tmp_path), "--reason", "yearly", "--revoke-old", "--json"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    new_id = (tmp_path / "coordinator.keyid").read_text().strip()
    assert doc["old_key_id"] == old.key_id and doc["new_key_id"] == new_id
    assert [(r["sequence"], r["kind"], r["reason"]) for r in doc["records"]] == [
        (1, "key_rotation", "yearly"),
        (2, "key_revocation", "compromised"),
    ]
    assert [r.digest.hex() for r in load_chain(tmp_path).records] == [r["sha256"] for r in doc["records"]]
    bad = runner.invoke(app, ["server", "rotate-key", "--data-dir", str(tmp_path), "--reason", "tab\there"])
    assert bad.exit_code == 2 and "bad_argument" in bad.output
    revoked = runner.invoke(app, ["server", "revoke-key", "--data-dir", str(tmp_path), "--key-id", old.key_id])
    assert revoked.exit_code == 2 and "rotation_chain_broken" in revoked.output  # already revoked
