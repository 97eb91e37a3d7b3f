"""Receipt proofs a device keeps next to its receipts: ``proofs.jsonl`` in its state directory.

One line per round whose proof the device asked for, after its receipt (``receipts.jsonl``)::

    {"round": r, "update_hash": h, "examples": n, "answer": <hex of the PROOF answer>,
     "included": bool, "reason": str | null, "entry_hash": h, "outcome": "closed" | "failed"}

or, when the coordinator's answer did not verify or it refused one (``bad_inclusion_proof``,
``not_selected``, ``no_ledger_entry``)::

    {"round": r, "update_hash": h, "examples": n, "error": "[code] message"}

The answer is the exact bytes the coordinator sent (its signed ledger entry of the round and the
Merkle proof, :mod:`qflare.protocol.proofs`), so :func:`verify_proofs` (``qflare client
verify-receipts``) re-checks every line offline against the pinned key and the keys the device followed
through verified rotations, and checks that it concerns an update a stored receipt acknowledges.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto import VerifyKey
from ..errors import AuthError, ErrorCode, MalformedError, QflareError, Retry
from ..protocol import Device
from ..protocol.proofs import VerifiedProof, verify_answer
from .state import DeviceState, ReceiptCheck

__all__ = [
    "PROOFS_FILE",
    "Awaiting",
    "append_proof",
    "append_proof_error",
    "awaiting_proof",
    "collect",
    "verify_proofs",
]

PROOFS_FILE = "proofs.jsonl"
log = logging.getLogger("qflare.client")


@dataclass(frozen=True)
class Awaiting:
    """The update of a round whose proof this device has not asked for yet."""

    round: int
    update_hash: str
    examples: int


def _path(state: DeviceState) -> Path:
    return state.dir / PROOFS_FILE


def _append(state: DeviceState, line: Mapping[str, Any]) -> None:
    fd = os.open(_path(state), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(dict(line), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _lines(state: DeviceState) -> list[tuple[int, str]]:
    path = _path(state)
    if not path.exists():
        return []
    return [(n, t) for n, t in enumerate(path.read_text().splitlines(), 1) if t.strip()]


def append_proof(state: DeviceState, awaiting: Awaiting, verified: VerifiedProof, answer: bytes) -> None:
    """Store a verified proof answer."""
    _append(
        state,
        {
            "round": awaiting.round,
            "update_hash": awaiting.update_hash,
            "examples": awaiting.examples,
            "answer": answer.hex(),
            "included": verified.included,
            "reason": verified.reason,
            "entry_hash": verified.entry_hash,
            "outcome": verified.outcome,
        },
    )


def append_proof_error(state: DeviceState, awaiting: Awaiting, error: QflareError) -> None:
    """Record that the coordinator gave no verifiable proof for this update (verify-receipts fails it)."""
    _append(
        state,
        {
            "round": awaiting.round,
            "update_hash": awaiting.update_hash,
            "examples": awaiting.examples,
            "error": f"[{error.code}] {error.message}"[:2000],
        },
    )


def awaiting_proof(state: DeviceState) -> Awaiting | None:
    """The last acknowledged update whose proof was not asked for yet (None: none, or a receipt from
    before example counts were kept)."""
    receipts = state.receipts()
    if not receipts:
        return None
    last = receipts[-1]
    rnd, digest, examples = last.get("round"), last.get("update_hash"), last.get("examples")
    if not isinstance(rnd, int) or not isinstance(digest, str) or not isinstance(examples, int):
        return None
    for _, text in _lines(state):
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("round") == rnd and doc.get("update_hash") == digest:
            return None
    return Awaiting(rnd, digest, examples)


def collect(device: Device, state: DeviceState, awaiting: Awaiting) -> VerifiedProof | None:
    """Fetch and verify the proof of ``awaiting`` (:meth:`Device.fetch_proof`, with the keys the device
    followed through verified rotations and never a revoked one) and keep it; None when the coordinator
    refused it or it did not verify (logged as a security event and recorded, so ``verify-receipts`` fails
    it).  ``round_not_closed``, transient and unauthenticated failures are raised: asked again later."""
    chain = state.rotation_chain()
    try:
        verified, answer = device.fetch_proof(
            awaiting.round,
            awaiting.update_hash,
            awaiting.examples,
            former_keys={k.key_id: k for k in chain.keys[:-1]},
            revoked=chain.revoked,
        )
    except QflareError as exc:
        if exc.code == ErrorCode.ROUND_NOT_CLOSED or exc.retry is Retry.TRANSIENT or exc.unauthenticated:
            raise
        log.error(
            "event=%s: round %d: no verified receipt proof for update %s...: %s",
            exc.code,
            awaiting.round,
            awaiting.update_hash[:12],
            exc,
        )
        append_proof_error(state, awaiting, exc)
        return None
    append_proof(state, awaiting, verified, answer)
    if verified.proof is not None:
        log.info(
            "round %d: inclusion proof verified: update %s... is leaf %d of %d of the signed entry (round %s)",
            awaiting.round,
            awaiting.update_hash[:12],
            verified.proof.index,
            verified.proof.size,
            verified.outcome,
        )
    else:
        log.warning(
            "round %d: the signed ledger entry leaves update %s... out: %s",
            awaiting.round,
            awaiting.update_hash[:12],
            verified.reason,
        )
    return verified


def verify_proofs(
    state: DeviceState,
    server_key: VerifyKey,
    device_id: str,
    *,
    former: Sequence[VerifyKey] = (),
    revoked: Sequence[str] = (),
) -> list[ReceiptCheck]:
    """Re-verify every line of ``proofs.jsonl`` (see the module docstring); a line that records an error
    fails too (the coordinator never proved that update)."""
    keys = {k.key_id: k for k in (*former, server_key)}
    acked = {(r.get("round"), r.get("update_hash")) for r in state.receipts()}
    checks = []
    for n, text in _lines(state):
        rnd = digest = None
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise MalformedError("not a JSON object")
            rnd, digest, examples = doc.get("round"), doc.get("update_hash"), doc.get("examples")
            if not isinstance(rnd, int) or not isinstance(digest, str) or not isinstance(examples, int):
                raise MalformedError("round, update_hash or examples missing")
            if "error" in doc:
                raise AuthError(f"no verified proof: {doc['error']}", code="bad_inclusion_proof")
            if (rnd, digest) not in acked:
                raise AuthError("no stored receipt acknowledges this update", code="bad_inclusion_proof")
            verified = verify_answer(
                bytes.fromhex(str(doc.get("answer"))),
                round_number=rnd,
                device_id=device_id,
                update_hash=digest,
                examples=examples,
                keys=keys,
                revoked=revoked,
            )
            if (verified.included, verified.reason, verified.entry_hash) != (
                doc.get("included"),
                doc.get("reason"),
                doc.get("entry_hash"),
            ):
                raise AuthError("the line says something its proof does not show", code="bad_inclusion_proof")
        except QflareError as exc:
            checks.append(_failed(n, rnd, digest, f"[{exc.code}] {exc}"))
            continue
        except ValueError as exc:
            checks.append(_failed(n, rnd, digest, f"unreadable: {exc}"))
            continue
        what = "included" if verified.included else f"left out: {verified.reason}"
        checks.append(ReceiptCheck(n, True, rnd, digest, f"proof ({what}, round {verified.outcome})", "proof"))
    return checks


def _failed(n: int, rnd: object, digest: object, reason: str) -> ReceiptCheck:
    return ReceiptCheck(
        n, False, rnd if isinstance(rnd, int) else None, digest if isinstance(digest, str) else None, reason, "proof"
    )
