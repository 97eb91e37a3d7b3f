"""Offline verification of a ledger export (``qflare ledger verify``), needing nothing but the file.

For every entry, in file order: the line parses strictly; ``seq`` is the previous entry's + 1 (the
first is 1) and ``prev`` is the previous entry's hash (the first: 64 zeros); every signature verifies
under a coordinator key trusted at that point (the header's first key until a ``key_rotation`` entry
moves the trust to its new key; ``pin`` must be one of the keys trusted along the way); the
kind's own check passes (for a round: the Merkle root equals the listed updates', the round numbers
increase, the parent model is the model the previous closed round published); and each update's
signed envelope, where the export carries one, is the device's signature over exactly that update in
exactly that round on exactly that parent model.  Then the number of entries equals the header's, and
a given model file is the one an entry names.  The first failure stops the walk and names the entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing as mp
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qflare.crypto.envelope import Field, MsgType, SignedEnvelope
from qflare.crypto.identity import VerifyKey
from qflare.errors import ErrorCode, QflareError, ValidationError

from .entry import GENESIS_PREV, LedgerEntry, TrustState, apply_kind, check_trusted
from .export import ExportHeader, parse_entry_line

__all__ = [
    "MAX_LINE",
    "LedgerVerifyError",
    "ModelMatch",
    "VerifyReport",
    "default_workers",
    "verify_export",
    "verify_file",
]

MAX_LINE = 64 * 1024 * 1024
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class LedgerVerifyError(ValidationError):
    """The export fails verification; ``seq`` names the first bad entry (None: header or file level)."""

    code = ErrorCode.LEDGER_INVALID

    def __init__(self, where: str, reason: str, *, seq: int | None = None, line: int | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.seq, self.line = where, reason, seq, line


@dataclass(frozen=True)
class ModelMatch:
    """The entry that names a model: as the model it published, or (``role="parent"``) as the model the
    ledger's first round trained on."""

    seq: int
    round_number: int | None
    model_version: int | None
    sha256: str
    role: str = "published"


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    rounds: int
    coordinator_key_id: str
    pinned: bool
    device_signatures: int
    """Device signatures (UPDATE envelopes) checked."""
    missing_envelopes: int
    """Listed updates whose envelope the export does not carry (their device signature was not checked)."""
    head: str | None
    """The last entry's hash (None for an empty ledger)."""
    model: ModelMatch | None = None
    key_chain: tuple[str, ...] = ()
    """The coordinator key ids trusted along the ledger, in order (more than one after a rotation)."""
    revoked: tuple[str, ...] = ()
    """Coordinator key ids revoked by a key_revocation entry."""


def _check_envelopes(entry: LedgerEntry, envelopes: Sequence[bytes | None], state: TrustState) -> tuple[int, int]:
    updates = entry.body["updates"]
    if len(envelopes) != len(updates):
        raise ValueError(f"{len(envelopes)} envelopes for {len(updates)} updates")
    checked = missing = 0
    for i, (env_bytes, (device, update_hash, examples)) in enumerate(zip(envelopes, updates, strict=True)):
        if env_bytes is None:
            missing += 1
            continue
        who = f"update {i} (device {device[:16]}...)"
        env = SignedEnvelope.parse(env_bytes, expected_type=MsgType.UPDATE)
        if (
            env.get_key_id(Field.DEVICE_KEY_ID) != device
            or env.get_key_id(Field.UPDATE_HASH) != update_hash
            or env.get_int(Field.NUM_EXAMPLES) != examples
            or env.get_int(Field.ROUND) != entry.round_number
            or env.get_key_id(Field.BASE_MODEL_HASH) != entry.body["parent_model"]
        ):
            raise ValueError(f"{who}: the signed envelope is for another device, update, count, round or model")
        key = state.device_keys.get(device)
        if key is None:
            raise ValueError(f"{who}: the device's public key is not listed in the header")
        try:
            env.verify(key)
        except QflareError:
            raise ValueError(f"{who}: the device signature does not verify") from None
        checked += 1
    return checked, missing


def _safetensors_version(head: bytes, size: int) -> int | None:
    """The ``version`` metadata QFLARE writes into a model file, if the header says one (else None)."""
    if len(head) < 8:
        return None
    n = int.from_bytes(head[:8], "little")
    if not 2 <= n <= min(size - 8, _MAX_SAFETENSORS_HEADER) or len(head) < 8 + n:
        return None
    try:
        meta = json.loads(head[8 : 8 + n]).get("__metadata__", {})
        version = int(meta["version"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    return version if version >= 0 else None


def _model_digest(path: Path) -> tuple[str, int | None]:
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                if n <= min(size, _MAX_SAFETENSORS_HEADER):
                    head += fh.read(n)
            digest.update(head)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise LedgerVerifyError("model", f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest(), _safetensors_version(head, size)


@dataclass(frozen=True)
class _Checked:
    """What a worker found about one line; ``error`` set means the line failed its stateless checks."""

    line: int
    error: str | None = None
    round_number: int | None = None
    seq: int = 0
    kind: str = ""
    prev: str = ""
    entry_hash: str = ""
    signers: tuple[str, ...] = ()
    summary: dict[str, Any] | None = None
    checked: int = 0
    missing: int = 0
    model: tuple[int | None, str | None, str] | None = None  # (version, model, parent) of a round entry


def _check_line(
    line: bytes, number: int, signing: Mapping[str, VerifyKey], state: TrustState, envelopes_on: bool
) -> _Checked:
    """Everything about one entry line that needs no other line (parse, hash, signatures, kind check,
    device envelopes)."""
    entry: LedgerEntry | None = None
    try:
        entry, envelopes = parse_entry_line(line)
        entry.verify(signing)
        summary = entry.check_kind()
        checked = missing = 0
        model = None
        if entry.kind == "round":
            if envelopes_on:
                checked, missing = _check_envelopes(entry, envelopes, state)
            else:
                missing = len(entry.body["updates"])
            version = entry.body["model_version"]
            model = (version, entry.body["model"], entry.body["parent_model"])
        return _Checked(
            number,
            None,
            entry.round_number,
            entry.seq,
            entry.kind,
            entry.prev_hash,
            entry.entry_hash,
            tuple(entry.body["signers"]),
            summary,
            checked,
            missing,
            model,
        )
    except (QflareError, ValueError, TypeError, KeyError, IndexError) as exc:
        reason = exc.message if isinstance(exc, QflareError) else str(exc)
        return _Checked(number, reason, entry.round_number if entry is not None else _round_hint(line))


def _round_hint(line: bytes) -> int | None:
    """The ``round`` a line that failed to parse claims (only to name it in the error), if any."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    rnd = value.get("round") if isinstance(value, dict) else None
    return rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None


def _check_range(
    path: str,
    start: int,
    end: int,
    first_line: int,
    signing_raw: list[tuple[str, bytes]],
    devices_raw: list[tuple[str, bytes]],
    envelopes_on: bool,
) -> list[_Checked]:
    """Worker: check the lines in bytes [start, end) of ``path``; stops after the first failure."""
    signing = {k.key_id: k for k in (VerifyKey.from_bytes(a, r) for a, r in signing_raw)}
    devices = {k.key_id: k for k in (VerifyKey.from_bytes(a, r) for a, r in devices_raw)}
    state = TrustState({}, devices)
    out: list[_Checked] = []
    with open(path, "rb") as fh:
        fh.seek(start)
        number, pos = first_line, start
        while pos < end:
            line = fh.readline(MAX_LINE + 2)
            if not line:
                break
            pos += len(line)
            if len(line) > MAX_LINE:
                out.append(_Checked(number, f"the line is longer than {MAX_LINE} bytes"))
                break
            result = _check_line(line[:-1] if line.endswith(b"\n") else line, number, signing, state, envelopes_on)
            out.append(result)
            if result.error is not None:
                break
            number += 1
    return out


def _split(path: Path, body_start: int, parts: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of ``parts`` ranges of whole lines after the header."""
    size = path.stat().st_size
    cuts = [body_start]
    with path.open("rb") as fh:
        for i in range(1, parts):
            target = body_start + (size - body_start) * i // parts
            if target <= cuts[-1]:
                continue
            fh.seek(target)
            fh.readline(MAX_LINE + 2)
            if fh.tell() >= size or fh.tell() <= cuts[-1]:
                break
            cuts.append(fh.tell())
        cuts.append(size)
        ranges: list[tuple[int, int, int]] = []
        number = 2
        for a, b in itertools.pairwise(cuts):
            ranges.append((a, b, number))
            fh.seek(a)
            remaining, newlines = b - a, 0
            while remaining > 0:
                block = fh.read(min(remaining, 1 << 22))
                if not block:
                    break
                newlines += block.count(b"\n")
                remaining -= len(block)
            number += newlines
    return ranges


def default_workers(requested: int | None = None) -> int:
    """``requested``, or the usable CPUs (at most 8) when None."""
    if requested is not None:
        return max(1, requested)
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _results(path: Path, header: ExportHeader, body_start: int, workers: int, envelopes_on: bool) -> Iterator[_Checked]:
    signing = [(k.alg, k.raw) for k in header.coordinator_keys]
    devices = [(k.alg, k.raw) for k in header.devices]
    ranges = _split(path, body_start, workers)
    if workers == 1 or len(ranges) <= 1 or "fork" not in mp.get_all_start_methods():
        for a, b, first in ranges:
            yield from _check_range(str(path), a, b, first, signing, devices, envelopes_on)
        return
    with ProcessPoolExecutor(len(ranges), mp_context=mp.get_context("fork")) as pool:
        futures = [
            pool.submit(_check_range, str(path), a, b, first, signing, devices, envelopes_on) for a, b, first in ranges
        ]
        for future in futures:
            yield from future.result()


def verify_file(
    path: str | os.PathLike[str],
    *,
    pin: str | None = None,
    check_envelopes: bool = True,
    workers: int | None = None,
) -> tuple[VerifyReport, dict[str, ModelMatch]]:
    """Verify an export file; (report, the models its round entries name, by SHA-256: the published
    ones and the parent of the first round entry).  Per-line checks run in ``workers`` processes
    (default: the usable CPUs, at most 8); the chain and everything in ledger order runs here."""
    source = Path(path)
    try:
        with source.open("rb") as fh:
            first = fh.readline(MAX_LINE + 2)
            body_start = fh.tell()
    except OSError as exc:
        raise LedgerVerifyError("file", f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        if len(first) > MAX_LINE:
            raise ValueError("the header line is too long")
        header = ExportHeader.parse(first[:-1] if first.endswith(b"\n") else first)
    except (QflareError, ValueError, TypeError, KeyError) as exc:
        reason = exc.message if isinstance(exc, QflareError) else str(exc)
        raise LedgerVerifyError("header (line 1)", reason, line=1) from None
    pinned = None if pin is None else pin.lower()
    if pinned is not None and pinned not in {k.key_id for k in header.coordinator_keys}:
        raise LedgerVerifyError(
            "header (line 1)",
            f"the pinned key {pinned[:16]}... is not a coordinator key of this export "
            f"(its first key is {header.coordinator.key_id[:16]}...)",
            line=1,
        )
    state = TrustState({header.coordinator.key_id: header.coordinator}, {k.key_id: k for k in header.devices})
    state.key_chain.append(header.coordinator.key_id)
    prev, seq, rounds, checked, missing = GENESIS_PREV, 0, 0, 0, 0
    published: dict[str, ModelMatch] = {}
    for result in _results(source, header, body_start, default_workers(workers), check_envelopes):
        seq += 1
        where = (
            f"entry {seq} (round {result.round_number}, line {result.line})"
            if result.round_number is not None
            else f"entry {seq} (line {result.line})"
        )
        try:
            if result.error is not None:
                raise ValueError(result.error)
            if result.seq != seq:
                raise ValueError(f"seq is {result.seq}, expected {seq} (an entry is missing, extra or out of order)")
            if result.prev != prev:
                raise ValueError("prev does not match the previous entry's hash (the chain is broken)")
            check_trusted(result.signers, state, result.kind, result.summary)
            assert result.summary is not None
            apply_kind(result.kind, result.summary, state)
        except (QflareError, ValueError) as exc:
            reason = exc.message if isinstance(exc, QflareError) else str(exc)
            raise LedgerVerifyError(where, reason, seq=seq, line=result.line) from None
        prev = result.entry_hash
        checked, missing = checked + result.checked, missing + result.missing
        if result.model is not None:
            rounds += 1
            version, model, parent = result.model
            if rounds == 1:
                published[parent] = ModelMatch(seq, result.round_number, None, parent, "parent")
            if model is not None:
                published[model] = ModelMatch(seq, result.round_number, version, model)
    if pinned is not None and pinned not in state.key_chain:
        raise LedgerVerifyError(
            "file",
            f"the pinned key {pinned[:16]}... is neither the export's first coordinator key nor reached from it "
            "by a key_rotation entry",
        )
    if seq != header.entries:
        raise LedgerVerifyError(
            f"entry {seq + 1}" if seq < header.entries else "file",
            f"the header announces {header.entries} entries, the file holds {seq} (entries were removed or added)",
            seq=seq + 1 if seq < header.entries else None,
        )
    report = VerifyReport(
        entries=seq,
        rounds=rounds,
        coordinator_key_id=header.coordinator.key_id,
        pinned=pin is not None,
        key_chain=tuple(state.key_chain),
        revoked=tuple(sorted(state.revoked)),
        device_signatures=checked,
        missing_envelopes=missing,
        head=None if seq == 0 else prev,
    )
    return report, published


def _model_file_match(path: Path, published: dict[str, ModelMatch]) -> ModelMatch | None:
    """The entry naming the model whose weights a QFLARE model file holds (``qflare simulate --out``,
    ``qflare models export``): its metadata names the round or version; the coordinator's blob for those
    weights is rebuilt and hashed (:func:`qflare.model_file.coordinator_blob_sha256`).  None when the file
    is not a model file or names no matching entry."""
    from ..errors import QflareError
    from ..model_file import coordinator_blob_sha256, read_model_info

    try:
        info = read_model_info(path)
    except QflareError:
        return None
    wanted_version = info.provenance.get("version")
    wanted_round = info.provenance.get("round")
    for match in published.values():
        if match.role != "published" or match.model_version is None:
            continue
        if str(match.model_version) != wanted_version and str(match.round_number) != wanted_round:
            continue
        try:
            if coordinator_blob_sha256(path, match.model_version) == match.sha256:
                return match
        except QflareError as exc:
            raise LedgerVerifyError("model", f"{path}: {exc}") from None
    return None


def verify_export(
    path: str | os.PathLike[str],
    *,
    pin: str | None = None,
    model: str | os.PathLike[str] | None = None,
    check_envelopes: bool = True,
    workers: int | None = None,
) -> VerifyReport:
    """Verify an export file; LedgerVerifyError (``ledger_invalid``) names the first failure."""
    report, published = verify_file(path, pin=pin, check_envelopes=check_envelopes, workers=workers)
    if model is None:
        return report
    digest, version = _model_digest(Path(model))
    found = published.get(digest)
    if found is None:  # a model file (qflare.load_model's format): the signed blob rebuilt from its weights
        found = _model_file_match(Path(model), published)
    if found is not None:
        return dataclasses.replace(report, model=found)
    for match in published.values():
        if version is not None and match.model_version == version:
            raise LedgerVerifyError(
                f"entry {match.seq} (round {match.round_number})",
                f"names model version {version} with sha256 {match.sha256}, but {model} hashes to {digest}",
                seq=match.seq,
            )
    raise LedgerVerifyError("model", f"no entry names a model with sha256 {digest} ({model})")
