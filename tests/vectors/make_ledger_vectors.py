"""Generate tests/vectors/ledger_v1.json: provenance ledger v1 vectors (docs/provenance.md).

    .venv/bin/python tests/vectors/make_ledger_vectors.py            # (re)write the file
    .venv/bin/python tests/vectors/make_ledger_vectors.py --check    # recompute and compare

Contents: canonical JSON encodings (and encodings that must be refused), Merkle roots and inclusion
proofs, the 72-byte update leaf, a coordinator and two device keys from fixed seeds, a three-entry
chain (closed, failed, closed round) with its exact body bytes and entry hashes, the complete export
file of that chain with the devices' signed UPDATE envelopes, negative vectors (a change to the
export -> the entry the verifier must name), and a second export with a coordinator key rotation and a
revocation in the middle (``key_rotation`` / ``key_revocation`` entries).

ML-DSA signing is hedged (randomised), so signatures -- the entries' and the envelopes' -- and the
export lines that carry them are *recorded*: the test checks that they verify.  ``--check`` compares
only the deterministic parts (everything under "deterministic").
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qflare.crypto.envelope import Field, MsgType, SignedEnvelope, u64  # noqa: E402
from qflare.crypto.identity import SigningKey  # noqa: E402
from qflare.crypto.rotation import GENESIS_HASH, sign_revocation, sign_rotation  # noqa: E402
from qflare.crypto.suite import DEFAULT_SUITE  # noqa: E402
from qflare.ledger import (  # noqa: E402
    GENESIS_PREV,
    LedgerEntry,
    LeftOut,
    RoundRecord,
    RoundUpdate,
    canonical,
    entry_line,
    header_line,
    inclusion_proof,
    key_record_entry,
    merkle_root,
    update_leaf,
)

OUT = Path(__file__).with_name("ledger_v1.json")
T0 = 1_700_000_000


def seed(label: str) -> bytes:
    return hashlib.sha256(f"qflare-ledger-vector/{label}".encode()).digest()


def digest(label: str) -> str:
    return hashlib.sha256(f"qflare-ledger-vector/{label}".encode()).hexdigest()


def key(label: str) -> SigningKey:
    return SigningKey.from_seed("ML-DSA-65", seed(f"key/{label}"))


def canonical_vectors() -> dict[str, Any]:
    values = [
        {"b": 1, "a": [True, False, None], "c": {"z": "", "y": -7}},
        {"s": 'caf\u00e9 \U0001f600 "quoted" \\ \n'},
        {"n": 18446744073709551615},
    ]
    refused = [
        '{"b":1,"a":2}',
        '{"a": 1}',
        '{"a":1,"a":1}',
        '{"a":1.5}',
        '{"a":1e2}',
        '{"A":1}',
        '{"a":"\\u00E9"}',
        '{"a":"\\/"}',
    ]
    return {
        "encode": [{"value": v, "canonical": canonical.encode(v).decode("ascii")} for v in values],
        "refused": refused,
        "decimal": {repr(x): canonical.decimal(x) for x in (0.5, 1e-06, 3.0, 0.1)},
    }


def merkle_vectors() -> dict[str, Any]:
    out: dict[str, Any] = {"empty_root": merkle_root([]).hex(), "trees": []}
    for n in (1, 2, 3, 5, 7, 8):
        leaves = [f"leaf {i}".encode() for i in range(n)]
        proofs = [inclusion_proof(leaves, i).to_json() for i in range(n)]
        out["trees"].append({"leaves": [x.hex() for x in leaves], "root": merkle_root(leaves).hex(), "proofs": proofs})
    out["update_leaf"] = {
        "device": digest("device"),
        "update_hash": digest("update"),
        "examples": 300,
        "leaf": update_leaf(digest("device"), digest("update"), 300).hex(),
    }
    return out


def _record(
    r: int, outcome: str, parent: str, model: str | None, ups: list[RoundUpdate], left: list[LeftOut]
) -> RoundRecord:
    return RoundRecord(
        round_number=r,
        outcome=outcome,
        reason=None if outcome == "closed" else "quorum_not_reached",
        parent_model=parent,
        model=model,
        model_version=None if model is None else (1 if r == 1 else 2),
        updates=tuple(ups),
        left_out=tuple(left),
        quorum=2,
        min_participants=2,
        opened=T0 + 100 * r,
        closed=T0 + 100 * r + 50,
        pipeline={
            "checks": ["ShapeCheck()", "FiniteCheck()"],
            "combine": "ShareCappedMean(max_multiple=3.0, buffered=4)",
            "max_model_abs": "1000000.0",
            "noise": "GaussianNoise",
            "secure_aggregation": False,
            "server_opt": "ServerSGD(lr=1.0)",
            "transforms": ["ClipNorm(max_norm=1.0)"],
            "weighting": "Uniform()",
        },
        dp=None
        if outcome != "closed"
        else {
            "mechanism": "GaussianNoise",
            "clip_norm": "1.0",
            "noised_updates": len(ups),
            "accountant": None,
            "stddev": "0.5",
            "divide_by_count": True,
            "applied_stddev": canonical.decimal(0.5 / len(ups)),
        },
    )


def chain() -> tuple[SigningKey, list[SigningKey], list[RoundRecord]]:
    coordinator = key("coordinator")
    devices = [key("device-a"), key("device-b")]
    a, b = devices
    m0, m1, m2 = digest("model/0"), digest("model/1"), digest("model/2")
    records = [
        _record(
            1,
            "closed",
            m0,
            m1,
            [RoundUpdate(a.key_id, digest("u/1/a"), 10), RoundUpdate(b.key_id, digest("u/1/b"), 20)],
            [],
        ),
        _record(
            2, "failed", m1, None, [RoundUpdate(b.key_id, digest("u/2/b"), 20)], [LeftOut(a.key_id, None, "no_update")]
        ),
        _record(
            3,
            "closed",
            m1,
            m2,
            [RoundUpdate(a.key_id, digest("u/3/a"), 11), RoundUpdate(b.key_id, digest("u/3/b"), 21)],
            [],
        ),
    ]
    return coordinator, devices, records


def envelope(dev: SigningKey, r: int, parent: str, u: RoundUpdate) -> bytes:
    fields = {
        Field.DEVICE_KEY_ID: dev.key_id_bytes,
        Field.ROUND: u64(r),
        Field.BASE_MODEL_HASH: bytes.fromhex(parent),
        Field.UPDATE_HASH: bytes.fromhex(u.update_hash),
        Field.NUM_EXAMPLES: u64(u.examples),
        Field.PAYLOAD_SIZE: u64(1234),
    }
    return SignedEnvelope.sign(DEFAULT_SUITE, MsgType.UPDATE, fields, dev).raw


def build() -> dict[str, Any]:
    rotated = rotation_chain()
    coordinator, devices, records = chain()
    by_id = {d.key_id: d for d in devices}
    entries: list[dict[str, Any]] = []
    lines = [header_line(coordinator.public, [d.public for d in devices], len(records)).decode("ascii")]
    prev = GENESIS_PREV
    for rec in records:
        entry = LedgerEntry.create(
            "round",
            seq=rec.round_number,
            prev_hash=prev,
            round_number=rec.round_number,
            time=rec.closed,
            fields=rec.fields(),
            keys=[coordinator],
        )
        envs: list[bytes | None] = [
            envelope(by_id[u.device], rec.round_number, rec.parent_model, u) for u in rec.updates
        ]
        entries.append(
            {
                "body": entry.raw.decode("ascii"),
                "entry_hash": entry.entry_hash,
                "updates_root": entry.body["updates_root"],
            }
        )
        lines.append(entry_line(entry, envs).decode("ascii"))
        prev = entry.entry_hash
    return {
        "format": "qflare-ledger-vectors",
        "version": 1,
        "deterministic": {
            "canonical_json": canonical_vectors(),
            "merkle": merkle_vectors(),
            "context": "qflare/v1/ledger-entry",
            "genesis_prev": GENESIS_PREV,
            "keys": {
                "alg": "ML-DSA-65",
                "coordinator_seed": seed("key/coordinator").hex(),
                "coordinator_public": coordinator.public.raw.hex(),
                "coordinator_key_id": coordinator.key_id,
                "device_seeds": [seed(f"key/device-{x}").hex() for x in ("a", "b")],
                "device_key_ids": [d.key_id for d in devices],
            },
            "header_line": lines[0],
            "entries": entries,
            "negative": [
                {"change": "delete line 3 (entry 2)", "names_entry": 2},
                {"change": "swap lines 2 and 3 (entries 1 and 2)", "names_entry": 1},
                {"change": "flip the last hex digit of entry 3's updates_root", "names_entry": 3},
                {"change": "delete line 4 (entry 3, the last)", "names_entry": 3},
                {"change": "pin another key id", "names_entry": None},
            ],
            "rotation": rotated["deterministic"],
        },
        "recorded": {"export": "\n".join(lines) + "\n", "rotation_export": rotated["export"]},
    }


def rotation_chain() -> dict[str, Any]:
    """A ledger with a key rotation in the middle: round 1 signed by the coordinator key, the rotation to a
    second key (entry signed by both), round 2 signed by the new key, the old key's revocation (signed by
    the new key).  Record bodies (the signed part) are deterministic; signatures are recorded."""
    old, new = key("coordinator"), key("coordinator-2")
    (dev,) = [key("device-a")]
    rotation = sign_rotation(old, new, sequence=1, prev_hash=GENESIS_HASH, timestamp=T0 + 150, reason="yearly")
    revocation = sign_revocation(
        new, old.key_id, sequence=2, prev_hash=rotation.digest, timestamp=T0 + 260, reason="compromised"
    )
    m0, m1, m2 = digest("model/0"), digest("model/1"), digest("model/2")
    rec1 = _record(1, "closed", m0, m1, [RoundUpdate(dev.key_id, digest("r/1/a"), 10)], [])
    rec2 = _record(2, "closed", m1, m2, [RoundUpdate(dev.key_id, digest("r/2/a"), 12)], [])
    entries: list[LedgerEntry] = []

    def add(make: Any) -> None:
        prev = entries[-1].entry_hash if entries else GENESIS_PREV
        entries.append(make(len(entries) + 1, prev))

    def round_of(rec: RoundRecord, signer: SigningKey) -> Any:
        return lambda seq, prev: LedgerEntry.create(
            "round", seq=seq, prev_hash=prev, round_number=rec.round_number, time=rec.closed,
            fields=rec.fields(), keys=[signer],
        )  # fmt: skip

    add(round_of(rec1, old))
    add(lambda seq, prev: key_record_entry(rotation, seq=seq, prev_hash=prev, time=T0 + 200, keys=[old, new]))
    add(round_of(rec2, new))
    add(lambda seq, prev: key_record_entry(revocation, seq=seq, prev_hash=prev, time=T0 + 300, keys=[new]))
    header = header_line(old.public, [dev.public], len(entries), [old.public, new.public])
    lines = [header] + [entry_line(e, [None] * len(e.body.get("updates", []))) for e in entries]
    deterministic = {
        "new_key_seed": seed("key/coordinator-2").hex(),
        "new_key_id": new.key_id,
        "rotation_signed_part": rotation.body.hex(),
        # its signed part names the rotation record's hash, which covers (randomised) signatures
        "revocation": {
            "sequence": revocation.sequence,
            "revoked_key_id": revocation.revoked_key_id,
            "signer_key_id": revocation.signer_key_id,
            "reason": revocation.reason,
        },
        "kinds": [e.kind for e in entries],
        "signers": [list(e.body["signers"]) for e in entries],
        "header_line": header.decode("ascii"),
        "negative": [
            {"change": "entry 3 (round 2) signed by the old key instead of the new one", "names_entry": 3},
            {"change": "entry 2's record with the old key's signature replaced by the new key's", "names_entry": 2},
        ],
    }
    return {"deterministic": deterministic, "export": b"\n".join(lines).decode("ascii") + "\n"}


def main(argv: list[str]) -> int:
    fresh = build()
    if "--check" in argv:
        stored = json.loads(OUT.read_text())
        if stored["deterministic"] != fresh["deterministic"] or stored["format"] != fresh["format"]:
            print("ledger_v1.json differs from the current implementation", file=sys.stderr)
            return 1
        print("deterministic parts match")
        return 0
    OUT.write_text(json.dumps(fresh, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
