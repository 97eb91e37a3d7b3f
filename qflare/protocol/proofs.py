"""Receipt proofs: after a round, the coordinator's signed ledger entry of the round and, for one device,
a Merkle inclusion proof that its update is in the entry's ``updates_root`` -- or the reason the entry
gives for leaving it out.  Sealed in the session as the PROOF frame (:mod:`qflare.crypto.payloads`).

The answer (PROOF plaintext; docs/protocol.md section 6.5)::

    offset  size  field
    0       4     n, the length of the entry line (u32, big-endian)
    4       n     the round's ledger entry as an export line (docs/provenance.md section 5) with
                  "envelopes": [] -- body, entry_hash, kind, round, seq, and the coordinator's signatures
    4+n     ...   canonical JSON {"device": <key id>, "left_out": null | [<update sha256> | null, <reason>],
                                  "proof": null | {"index": i, "size": n, "path": [<64 hex>, ...]}}

Exactly one of ``proof`` and ``left_out`` is set.  :func:`verify_answer` is what a device runs: the
entry must be a ``round`` entry of the round asked, signed by a coordinator key the device trusts (its
pinned key, or one it followed through a verified rotation, never a revoked one), and well formed
(its Merkle root is its updates'); then either the proof takes this device's own leaf (device key id,
update hash, example count) to ``updates_root``, or the entry's ``left_out`` lists this device with
this update and the stated reason.  Every failure is AuthError ``bad_inclusion_proof`` naming why.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..crypto.identity import VerifyKey
from ..errors import AuthError, ConfigError, ErrorCode, QflareError, RoundError
from ..ledger import InclusionProof, LedgerEntry, entry_line, parse_entry_line, verify_inclusion
from ..ledger import canonical as ledger_json
from ..ledger.merkle import inclusion_proof, update_leaf
from ..ledger.round_entry import round_leaves

__all__ = ["MAX_ANSWER_BYTES", "VerifiedProof", "answer_for", "encode_answer", "verify_answer"]

MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""The largest proof answer a device reads (a round entry of some 50 000 updates)."""
_LEN = struct.Struct(">I")
_TAIL_KEYS = frozenset({"device", "left_out", "proof"})


@dataclass(frozen=True)
class VerifiedProof:
    """What a verified answer establishes for this device and round."""

    round_number: int
    entry_hash: str
    entry_seq: int
    outcome: str
    """The round's outcome: ``closed`` (``model`` published) or ``failed``."""
    model: str | None
    included: bool
    """True: the update is a leaf of ``updates_root`` (combined into ``model`` when closed)."""
    reason: str | None
    """Why the entry leaves the update out (``not_combined``, a refusal code, ...), when not included."""
    proof: InclusionProof | None
    signers: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round_number,
            "entry_hash": self.entry_hash,
            "entry_seq": self.entry_seq,
            "outcome": self.outcome,
            "model": self.model,
            "included": self.included,
            "reason": self.reason,
            "proof": None if self.proof is None else self.proof.to_json(),
            "signers": list(self.signers),
        }


def encode_answer(
    entry: LedgerEntry, device_id: str, proof: InclusionProof | None, left_out: list[Any] | None
) -> bytes:
    line = entry_line(entry, ())
    tail = ledger_json.encode(
        {"device": device_id, "left_out": left_out, "proof": None if proof is None else proof.to_json()}
    )
    return _LEN.pack(len(line)) + line + tail


def answer_for(entry: LedgerEntry, device_id: str) -> bytes:
    """Coordinator: the answer for ``device_id`` about round ``entry`` (RoundError ``not_selected`` when
    the entry lists the device neither as combined nor as left out)."""
    if entry.kind != "round":
        raise ConfigError(f"entry {entry.seq} is not a round entry", code="bad_argument")
    updates, left = entry.body["updates"], entry.body["left_out"]
    for i, item in enumerate(updates):
        if item[0] == device_id:
            return encode_answer(entry, device_id, inclusion_proof(round_leaves(entry.body), i), None)
    for item in left:
        if item[0] == device_id:
            return encode_answer(entry, device_id, None, [item[1], item[2]])
    raise RoundError(
        f"the ledger entry of round {entry.round_number} does not list this device: it was not selected",
        code=ErrorCode.NOT_SELECTED,
    )


def _bad(msg: str) -> AuthError:
    return AuthError(msg, code=ErrorCode.BAD_INCLUSION_PROOF)


def _split(raw: bytes) -> tuple[LedgerEntry, dict[str, Any]]:
    if len(raw) > MAX_ANSWER_BYTES or len(raw) < _LEN.size:
        raise _bad(f"a proof answer of {len(raw)} bytes is out of range")
    (n,) = _LEN.unpack_from(raw)
    if n > len(raw) - _LEN.size:
        raise _bad("the proof answer's entry line is truncated")
    try:
        entry, _ = parse_entry_line(raw[_LEN.size : _LEN.size + n])
        tail = ledger_json.decode(raw[_LEN.size + n :])
    except QflareError as exc:
        raise _bad(f"the proof answer does not parse: {exc.message}") from None
    if not isinstance(tail, dict) or set(tail) != _TAIL_KEYS:
        raise _bad(f"the proof answer's last part has exactly the keys {sorted(_TAIL_KEYS)}")
    return entry, tail


def verify_answer(
    raw: bytes,
    *,
    round_number: int,
    device_id: str,
    update_hash: str,
    examples: int,
    keys: Mapping[str, VerifyKey],
    revoked: Collection[str] = (),
) -> VerifiedProof:
    """Device: check a proof answer about its update ``update_hash`` (``examples``) in ``round_number``
    (see the module docstring).  ``keys``: the coordinator keys it trusts by key id (pinned and former);
    ``revoked``: key ids it must never accept.  AuthError ``bad_inclusion_proof`` otherwise."""
    try:
        return _verify(bytes(raw), round_number, device_id, update_hash, examples, keys, frozenset(revoked))
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # total: a hostile answer is a refusal
        raise _bad(f"the proof answer is malformed: {type(exc).__name__}") from None


def _verify(
    raw: bytes,
    round_number: int,
    device_id: str,
    update_hash: str,
    examples: int,
    keys: Mapping[str, VerifyKey],
    revoked: frozenset[str],
) -> VerifiedProof:
    entry, tail = _split(raw)
    if entry.kind != "round" or entry.round_number != round_number:
        raise _bad(f"the entry is a {entry.kind} entry of round {entry.round_number}, not of round {round_number}")
    for key_id in entry.body["signers"]:
        if key_id in revoked:
            raise _bad(f"the entry is signed by the revoked coordinator key {key_id[:16]}...")
        if key_id not in keys:
            raise _bad(f"the entry is signed by key {key_id[:16]}..., not the pinned coordinator key")
    try:
        entry.verify(keys)
        entry.check_kind()  # well formed: among others, updates_root is the root of the listed updates
    except QflareError as exc:
        raise _bad(f"the round entry: {exc.message}") from None
    if tail["device"] != device_id:
        raise _bad("the proof answer is about another device")
    body = entry.body
    proof_json, left = tail["proof"], tail["left_out"]
    if (proof_json is None) == (left is None):
        raise _bad("a proof answer holds either an inclusion proof or a left-out reason")
    common = (round_number, entry.entry_hash, entry.seq, str(body["outcome"]), body["model"])
    signers = tuple(str(k) for k in body["signers"])
    if proof_json is not None:
        try:
            proof = InclusionProof.from_json(proof_json)
            leaf = update_leaf(device_id, update_hash, examples)
        except QflareError as exc:
            raise _bad(f"the inclusion proof: {exc.message}") from None
        if proof.size != len(body["updates"]):
            raise _bad(f"the proof is for a tree of {proof.size} leaves, the entry lists {len(body['updates'])}")
        if not verify_inclusion(leaf, proof, bytes.fromhex(body["updates_root"])):
            raise _bad(
                "the inclusion proof does not take this device's update (key id, update hash, examples) to the "
                "entry's updates_root"
            )
        return VerifiedProof(*common, True, None, proof, signers)
    listed = [item for item in body["left_out"] if item[0] == device_id]
    if not listed or left != listed[0][1:]:
        raise _bad("the left-out reason given is not the one the signed entry lists for this device")
    if listed[0][1] != update_hash:
        raise _bad(
            f"the entry lists this device as left out ({listed[0][2]}) with another update than the one the "
            "coordinator acknowledged"
        )
    return VerifiedProof(*common, False, str(listed[0][2]), None, signers)
