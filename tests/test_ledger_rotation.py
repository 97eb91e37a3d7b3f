"""Coordinator key rotations in the provenance ledger: key_rotation / key_revocation entries embed the
signed rotation records, the verifier follows them, and each record goes into the ledger exactly once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from ledger_fixtures import coordinator_key, h, round_entry
from protocol_fixtures import Federation

from qflare.crypto.identity import SigningKey
from qflare.crypto.rotation import GENESIS_HASH, ChainRecord, parse_record, sign_revocation, sign_rotation, verify_chain
from qflare.errors import QflareError
from qflare.ledger import (
    GENESIS_PREV,
    LedgerEntry,
    LedgerVerifyError,
    RoundUpdate,
    entry_line,
    header_line,
    key_record_entry,
    verify_export,
)
from qflare.protocol import Coordinator, RoundConfig
from qflare.protocol.key_ledger import catch_up, record_new
from qflare.protocol.provenance import entry_of, export_ledger
from qflare.storage import BlobStore
from qflare.strategy import fedavg

K0, K1, K2 = coordinator_key("k0"), coordinator_key("k1"), coordinator_key("k2")
T = 1_700_000_000


def _rotation(old: SigningKey, new: SigningKey, seq: int = 1, prev: bytes = GENESIS_HASH) -> ChainRecord:
    return sign_rotation(old, new, sequence=seq, prev_hash=prev, timestamp=T, reason="yearly")


class Builder:
    """Appends entries with the right seq/prev; writes the export."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self.model = h("model", 0)
        self.round = 0

    @property
    def prev(self) -> str:
        return self.entries[-1].entry_hash if self.entries else GENESIS_PREV

    def round_by(self, key: SigningKey) -> LedgerEntry:
        self.round += 1
        model = h("model", self.round)
        entry = round_entry(
            key,
            seq=len(self.entries) + 1,
            prev=self.prev,
            round_number=self.round,
            parent=self.model,
            model=model,
            updates=[RoundUpdate(h("dev", self.round), h("u", self.round), 5)],
        )
        self.model = model
        self.entries.append(entry)
        return entry

    def record(self, record: ChainRecord, *keys: SigningKey) -> LedgerEntry:
        entry = key_record_entry(record, seq=len(self.entries) + 1, prev_hash=self.prev, time=T, keys=keys)
        self.entries.append(entry)
        return entry

    def write(self, path: Path, keys: list[SigningKey]) -> Path:
        lines = [header_line(keys[0].public, [], len(self.entries), [k.public for k in keys])]
        lines += [entry_line(e, [None] * len(e.body.get("updates", []))) for e in self.entries]
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path


def _fails(path: Path, pin: str | None, entry: int | None, words: str) -> LedgerVerifyError:
    with pytest.raises(LedgerVerifyError) as info:
        verify_export(path, pin=pin, workers=1)
    assert info.value.seq == entry, str(info.value)
    assert words in str(info.value), str(info.value)
    return info.value


def test_a_rotation_mid_ledger_verifies_from_the_old_pin_and_from_the_new(tmp_path: Path) -> None:
    b = Builder()
    b.round_by(K0)
    rot = _rotation(K0, K1)
    b.record(rot, K0, K1)  # rotate-key: signed by both keys
    b.round_by(K1)
    rev = sign_revocation(K1, K0.key_id, sequence=2, prev_hash=rot.digest, timestamp=T, reason="compromised")
    b.record(rev, K1)
    b.round_by(K1)
    path = b.write(tmp_path / "l.jsonl", [K0, K1])
    report = verify_export(path, pin=K0.key_id, workers=1)
    assert (report.entries, report.rounds) == (5, 3)
    assert report.key_chain == (K0.key_id, K1.key_id) and report.revoked == (K0.key_id,)
    # a verifier who knows only the current key: K1 signed the rotation that names K0 as its predecessor
    assert verify_export(path, pin=K1.key_id, workers=2).key_chain == (K0.key_id, K1.key_id)
    _fails(path, K2.key_id, None, "not a coordinator key of this export")
    # the entry of a record a crash left out, appended at start-up: signed by the new key alone
    b2 = Builder()
    b2.round_by(K0)
    b2.record(rot, K1)
    b2.round_by(K1)
    assert verify_export(b2.write(tmp_path / "c.jsonl", [K0, K1]), pin=K0.key_id, workers=1).entries == 3


def test_after_a_rotation_the_old_key_signs_nothing(tmp_path: Path) -> None:
    b = Builder()
    b.round_by(K0)
    rot = _rotation(K0, K1)
    b.record(rot, K0, K1)
    b.round_by(K0)  # a server still running with the old key
    _fails(b.write(tmp_path / "a.jsonl", [K0, K1]), K0.key_id, 3, "rotated away")
    b = Builder()
    b.record(rot, K0, K1)
    b.record(sign_revocation(K1, K0.key_id, sequence=2, prev_hash=rot.digest, timestamp=T), K1)
    b.round_by(K0)
    _fails(b.write(tmp_path / "b.jsonl", [K0, K1]), K0.key_id, 3, "revoked")
    # before the rotation the new key is not trusted
    b = Builder()
    b.round_by(K1)
    b.record(rot, K0, K1)
    _fails(b.write(tmp_path / "c.jsonl", [K0, K1]), K0.key_id, 1, "not trusted")


def _forge_old_signature(record: ChainRecord) -> ChainRecord:
    """The rotation record with the old key's signature replaced by one of the new key (new key alone)."""
    from qflare.crypto.rotation import ROTATION_OLD_CONTEXT

    assert hasattr(record, "old_signature")
    fake = K1.sign(record.body, ROTATION_OLD_CONTEXT)
    raw = record.body + fake + record.raw[len(record.body) + len(fake) :]
    return parse_record(raw)


def test_a_rotation_signed_by_the_new_key_alone_fails(tmp_path: Path) -> None:
    forged = _forge_old_signature(_rotation(K0, K1))
    b = Builder()
    b.round_by(K0)
    b.record(forged, K1)
    b.round_by(K1)
    _fails(b.write(tmp_path / "f.jsonl", [K0, K1]), K0.key_id, 2, "not signed by its old key")
    # a rotation from a key that is not the trusted one (an attacker's K2 -> K1), signed by both
    b = Builder()
    b.round_by(K0)
    b.record(_rotation(K2, K1), K2, K1)
    _fails(b.write(tmp_path / "g.jsonl", [K0, K1, K2]), K0.key_id, 2, "not from the coordinator key trusted")
    # a genuine record, but the entry signed by a third key
    b = Builder()
    b.record(_rotation(K0, K1), K2)
    _fails(b.write(tmp_path / "h.jsonl", [K0, K1, K2]), K0.key_id, 1, "signed by its old or new key")
    # record #2 without #1 in the ledger: the chain is broken
    first = _rotation(K0, K1)
    b = Builder()
    b.record(_rotation(K1, K2, seq=2, prev=first.digest), K1, K2)
    _fails(b.write(tmp_path / "i.jsonl", [K1, K2]), K1.key_id, 1, "does not follow")


def test_a_body_that_disagrees_with_its_record_fails(tmp_path: Path) -> None:
    b = Builder()
    entry = b.record(_rotation(K0, K1), K0, K1)
    fields = {k: v for k, v in entry.body.items() if k not in {"v", "kind", "seq", "prev", "round", "time", "signers"}}
    for change in ({"new_key": K2.key_id}, {"record_seq": 2}, {"reason": "other"}, {"record": "zz"}):
        bad = LedgerEntry.create(
            "key_rotation", seq=1, prev_hash=GENESIS_PREV, round_number=None, time=T, fields=fields | change, keys=[K0]
        )
        b.entries = [bad]
        _fails(b.write(tmp_path / "x.jsonl", [K0, K1, K2]), K0.key_id, 1, "entry 1")


def _coordinator(fed: Federation, identity: SigningKey, blobs: BlobStore) -> Coordinator:
    """A coordinator restarted on the same store with ``identity`` (as after a rotation)."""
    import torch

    from qflare.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", (1, 8, 8), 10)
    return Coordinator(
        layout=fed.layout,
        initial_flat=fed.layout.module_to_flat(model),
        strategy=fedavg(),
        identity=identity,
        store=fed.store,
        rounds=RoundConfig(rounds=3, per_round=2, seed=0),
        blobs=blobs,
    )


def test_the_store_gets_each_record_once_and_the_export_verifies(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    fed = Federation(tmp_path, n=2, per_round=2, rounds=3, identity=K0, blobs=blobs)
    rounds = fed.coordinator.rounds
    rounds.open_next()
    for k, dev in enumerate(fed.selected()):
        dev.submit(fed.prepare(dev, seed=k))
    chain = verify_chain([_rotation(K0, K1)])
    rows = record_new(fed.store, chain, K0, K1)
    assert [(r.seq, r.kind) for r in rows] == [(2, "key_rotation")]
    assert list(entry_of(rows[0]).body["signers"]) == [K0.key_id, K1.key_id]
    assert record_new(fed.store, chain, K0, K1) == [] and catch_up(fed.store, chain, K1) == []  # exactly once
    rev = sign_revocation(K1, K0.key_id, sequence=2, prev_hash=chain.head_hash, timestamp=T)
    chain2 = verify_chain([*chain.records, rev])
    with pytest.raises(QflareError) as info:
        catch_up(fed.store, chain2, K2)  # a key that may not sign the missing revocation
    assert info.value.code == "rotation_incomplete"
    assert [r.kind for r in catch_up(fed.store, chain2, K1)] == ["key_revocation"]
    with pytest.raises(QflareError) as info:
        catch_up(fed.store, verify_chain([_rotation(K0, K2)]), K2)  # another history than the ledger's
    assert info.value.code == "rotation_incomplete"

    restarted = _coordinator(fed, K1, blobs)
    for dev in fed.devices:
        dev.server_key = K1.public
        dev.transport.inner.coordinator = restarted  # type: ignore[attr-defined]
        dev.reset_session()
    restarted.rounds.open_next()
    for k, dev in enumerate(fed.devices):
        if dev.device_id in restarted.rounds.current.selected:  # type: ignore[union-attr]
            dev.submit(fed.prepare(dev, seed=k))
    kinds = [(r.kind, entry_of(r).body["signers"]) for r in fed.store.ledger_entries()]
    assert kinds == [
        ("round", [K0.key_id]),
        ("key_rotation", [K0.key_id, K1.key_id]),
        ("key_revocation", [K1.key_id]),
        ("round", [K1.key_id]),
    ]
    out = tmp_path / "ledger.jsonl"
    summary = export_ledger(fed.store, K1.public, out, former_keys=[K0.public])
    assert (summary.entries, summary.rounds, summary.key_id, summary.keys) == (4, 2, K0.key_id, 2)
    report = verify_export(out, pin=K0.key_id, workers=1)
    assert report.key_chain == (K0.key_id, K1.key_id) and report.device_signatures == 4
    with pytest.raises(QflareError) as info:
        export_ledger(fed.store, K1.public, out)  # without the former key: entry 1 has an unknown signer
    assert info.value.code == "config_error"
    assert dataclasses.asdict(summary)["keys"] == 2


def test_rotate_key_with_the_ledger_crash_safe_and_never_next_to_a_running_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import qflare.server.rotation as rotation_module
    from qflare.server.credentials import load_or_create_identity
    from qflare.server.rotation import recover, rotate_key, server_lock
    from qflare.storage import Database, Store

    old = load_or_create_identity(tmp_path, None, "ML-DSA-65")[0]
    db = Database(f"sqlite:///{tmp_path}/qflare.db")
    db.upgrade()
    store = Store(db)
    fd = server_lock(tmp_path)  # a server runs on this data directory
    with pytest.raises(QflareError) as info:
        rotate_key(tmp_path, ledger=store)
    assert info.value.code == "rotation_incomplete" and "a server is running" in info.value.message
    os.close(fd)
    assert store.last_ledger_entry() is None and not (tmp_path / "rotations.jsonl").exists()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("killed after the commit point, before the ledger append")

    monkeypatch.setattr(rotation_module, "record_new", crash)
    with pytest.raises(OSError):
        rotate_key(tmp_path, ledger=store, revoke_old=True)
    monkeypatch.undo()
    assert store.last_ledger_entry() is None  # the rotation committed, the ledger has not heard of it
    chain = recover(tmp_path, None)
    new = SigningKey.load(tmp_path / "coordinator.key", None)
    assert chain.current == new.public != old.public
    rows = catch_up(store, chain, new)  # what the server does at start-up
    assert [(r.kind, list(entry_of(r).body["signers"])) for r in rows] == [
        ("key_rotation", [new.key_id]),
        ("key_revocation", [new.key_id]),
    ]
    assert catch_up(store, chain, new) == []  # once
    third = rotate_key(tmp_path, ledger=store)  # the next rotation: signed by both keys
    rows = store.ledger_entries()
    assert [r.kind for r in rows] == ["key_rotation", "key_revocation", "key_rotation"]
    assert list(entry_of(rows[2]).body["signers"]) == [new.key_id, third.new_key_id]
    out = tmp_path / "ledger.jsonl"
    final = recover(tmp_path, None)
    export_ledger(store, final.keys[-1], out, former_keys=final.keys[:-1])
    assert verify_export(out, pin=old.key_id, workers=1).key_chain == tuple(k.key_id for k in final.keys)
    db.dispose()
