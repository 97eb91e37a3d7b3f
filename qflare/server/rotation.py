"""Rotating (and revoking) the coordinator's ML-DSA key in a data directory, crash-safely.

Files under the data directory (besides ``coordinator.key``/``.pub``/``.keyid``)::

    rotations.jsonl          the rotation chain: one JSON line per record, in sequence order
                             ({"sequence", "kind", "sha256", "record": hex}); rewritten atomically
    coordinator.key.next     the new key while a rotation is in flight (PKCS#8, 0600)
    retired-keys/<id>.pub    the public key (hex) of every key rotated away (the chain holds it too)
    .rotate.lock             serialises concurrent ``rotate-key``/``revoke-key`` runs (flock)
    .server.lock             held (shared flock) by every running server: a rotation refuses to run then

A rotation is three durable steps, in this order: (1) the new key is saved as ``coordinator.key.next``;
(2) the record(s) are appended to ``rotations.jsonl`` - **the commit point**; (3) ``coordinator.key.next``
replaces ``coordinator.key`` (``os.replace``: the old private key is gone in the same step) and the pin
files are rewritten; then, given the server's store, (4) the record(s) are appended to the provenance
ledger, a rotation signed by both keys (:mod:`qflare.protocol.key_ledger`).  Records a crash left out of
the ledger are appended, signed by the current key, before the next rotation and at server start.  :func:`recover` (run by every rotation and at every server start) finishes a
rotation interrupted after step 2 and discards the half-made key of one interrupted before it, so the
data directory never holds a key without its record nor a record without its key.

The old private key is not archived: a retired key that still exists could sign a rotation to an
attacker's key (see docs/protocol.md, "Coordinator key rotation").  A running server keeps the key it
started with, so a rotation refuses to run while one holds the data directory's ``.server.lock``
(:func:`server_lock`): stop the server, rotate, start it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..crypto import SigningKey
from ..crypto.rotation import (
    MAX_CHAIN_RECORDS,
    ChainRecord,
    ChainState,
    parse_record,
    sign_revocation,
    sign_rotation,
    verify_chain,
)
from ..errors import ConfigError, ErrorCode, QflareError
from ..protocol.key_ledger import KeyRecordSink, catch_up, record_new
from .credentials import KEY_FILE, KEYID_FILE, PUB_FILE

__all__ = [
    "LOG_FILE",
    "NEXT_KEY_FILE",
    "RETIRED_DIR",
    "SERVER_LOCK_FILE",
    "RotationResult",
    "check_key_matches_chain",
    "load_chain",
    "recover",
    "revoke_key",
    "rotate_key",
    "server_lock",
]

LOG_FILE, NEXT_KEY_FILE, RETIRED_DIR, LOCK_FILE = (
    "rotations.jsonl",
    "coordinator.key.next",
    "retired-keys",
    ".rotate.lock",
)
_MAX_LOG_BYTES = 4 * 1024 * 1024
SERVER_LOCK_FILE = ".server.lock"


def server_lock(data_dir: Path) -> int:
    """Take the running server's shared lock on ``data_dir`` (``.server.lock``); the descriptor, which
    the server closes when it stops (the lock also ends with its process).  Shared: several runtimes of
    one process (tests) may hold it; a rotation's exclusive attempt fails while any does."""
    fd = os.open(Path(data_dir) / SERVER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"a key rotation is running on {data_dir}: start the server when it is done",
            code=ErrorCode.ROTATION_INCOMPLETE,
        ) from None
    return fd


def _incomplete(message: str) -> ConfigError:
    return ConfigError(message, code=ErrorCode.ROTATION_INCOMPLETE)


def load_chain(data_dir: Path) -> ChainState:
    """The verified chain in ``rotations.jsonl`` (empty when there is none).

    A line that does not parse, a record whose line disagrees with it, or a chain that does not verify
    raises the record's QflareError: the server does not start on a damaged log."""
    path = Path(data_dir) / LOG_FILE
    if not path.exists():
        return verify_chain([])
    try:
        if path.stat().st_size > _MAX_LOG_BYTES:
            raise ConfigError(f"{path} is larger than {_MAX_LOG_BYTES} bytes", code=ErrorCode.BAD_ROTATION_RECORD)
        lines = [line for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", code=ErrorCode.BAD_ROTATION_RECORD) from None
    if len(lines) > MAX_CHAIN_RECORDS:
        raise ConfigError(f"{path} holds more than {MAX_CHAIN_RECORDS} records", code=ErrorCode.BAD_ROTATION_RECORD)
    records: list[ChainRecord] = []
    for n, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
            record = parse_record(bytes.fromhex(doc["record"]))
            if doc.get("sequence") != record.sequence or doc.get("sha256") != record.digest.hex():
                raise ValueError("its sequence or sha256 is not the record's")
        except QflareError as exc:
            raise ConfigError(f"{path} line {n}: {exc.message}", code=exc.code) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path} line {n} is not a rotation record: {exc}", code="bad_rotation_record") from None
        records.append(record)
    return verify_chain(records)


def _line(record: ChainRecord) -> str:
    doc = {
        "sequence": record.sequence,
        "kind": record.kind.ledger_kind,
        "sha256": record.digest.hex(),
        "record": record.raw.hex(),
    }
    return json.dumps(doc, sort_keys=True) + "\n"


def _write_log(data_dir: Path, records: tuple[ChainRecord, ...]) -> None:
    """Atomically replace ``rotations.jsonl`` (temp file, fsync, rename, fsync of the directory)."""
    path = data_dir / LOG_FILE
    tmp = path.with_name(f".{LOG_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write("".join(_line(r) for r in records))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(data_dir)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n", encoding="ascii")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _install_key(data_dir: Path, passphrase: bytes | None, chain: ChainState) -> SigningKey:
    """Step 3: ``coordinator.key.next`` becomes ``coordinator.key``; pin files and retired public keys."""
    new = SigningKey.load(data_dir / NEXT_KEY_FILE, passphrase)
    os.replace(data_dir / NEXT_KEY_FILE, data_dir / KEY_FILE)
    _fsync_dir(data_dir)
    _write_public(data_dir / PUB_FILE, new.public.raw.hex())
    _write_public(data_dir / KEYID_FILE, new.key_id)
    _write_retired(data_dir, chain)
    return new


def _write_retired(data_dir: Path, chain: ChainState) -> None:
    retired = data_dir / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    for key in chain.keys[:-1]:
        target = retired / f"{key.key_id}.pub"
        if not target.exists():
            _write_public(target, key.raw.hex())


def check_key_matches_chain(key: SigningKey, chain: ChainState) -> None:
    """ConfigError ``rotation_incomplete`` unless ``key`` is the chain's current key (or the chain is empty)."""
    if chain.current is not None and chain.current != key.public:
        raise _incomplete(
            f"coordinator.key is {key.key_id[:16]}... but {LOG_FILE} ends at {chain.current.key_id[:16]}...: "
            "the key and the rotation log do not belong together (restore the matching coordinator.key)"
        )


def recover(data_dir: Path, passphrase: bytes | None) -> ChainState:
    """Finish or undo an interrupted rotation (see the module docstring); the verified chain.

    Raises ConfigError ``rotation_incomplete`` when the key and the log disagree in a way no crash of
    :func:`rotate_key` leaves (e.g. a hand-restored old key): nothing is changed then."""
    data_dir = Path(data_dir)
    chain = load_chain(data_dir)
    pending, key_path = data_dir / NEXT_KEY_FILE, data_dir / KEY_FILE
    for stale in data_dir.glob(f".{NEXT_KEY_FILE}.*.tmp"):  # a save killed mid-write (never linked in)
        stale.unlink(missing_ok=True)
    if pending.exists():
        nxt = SigningKey.load(pending, passphrase)
        if chain.current == nxt.public:  # crashed after the commit point: finish
            _install_key(data_dir, passphrase, chain)
        else:  # crashed before it: the rotation never happened
            pending.unlink()
            _fsync_dir(data_dir)
    if chain.current is not None:
        if not (key_path.exists() or key_path.is_symlink()):
            raise _incomplete(f"{LOG_FILE} names a coordinator key but {key_path} is missing")
        check_key_matches_chain(SigningKey.load(key_path, passphrase), chain)
        _write_retired(data_dir, chain)
    return chain


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    server = os.open(data_dir / SERVER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another rotate-key or revoke-key is running on {data_dir}", code=ErrorCode.ROTATION_INCOMPLETE
            ) from None
        try:  # held for the whole rotation: a server cannot start meanwhile either
            fcntl.flock(server, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"a server is running on {data_dir}: stop it before rotating or revoking its key (a running "
                "server keeps signing with the old key, and its ledger entries would not verify)",
                code=ErrorCode.ROTATION_INCOMPLETE,
            ) from None
        yield
    finally:
        os.close(server)
        os.close(fd)


@dataclass(frozen=True)
class RotationResult:
    old_key_id: str
    new_key_id: str
    records: tuple[ChainRecord, ...]
    """The records this call appended (a rotation, then a revocation with ``revoke_old``)."""
    chain: ChainState


def _current_key(data_dir: Path, passphrase: bytes | None) -> SigningKey:
    path = data_dir / KEY_FILE
    if not (path.exists() or path.is_symlink()):
        raise ConfigError(f"no coordinator key at {path}: start the server once first", code="key_file_missing")
    return SigningKey.load(path, passphrase)


def rotate_key(
    data_dir: Path,
    passphrase: bytes | None = None,
    *,
    reason: str = "",
    revoke_old: bool = False,
    revoke_reason: str = "compromised",
    clock: Callable[[], float] = time.time,
    ledger: KeyRecordSink | None = None,
) -> RotationResult:
    """Replace the coordinator key with a new one of the same algorithm and record it (see the module).

    With ``ledger`` (the server's store), records a crash left out of the provenance ledger are
    appended first, and the new records right after the commit point (signed by both keys)."""
    data_dir = Path(data_dir).expanduser()
    with _locked(data_dir):
        chain = recover(data_dir, passphrase)
        old = _current_key(data_dir, passphrase)
        check_key_matches_chain(old, chain)
        if ledger is not None:
            catch_up(ledger, chain, old, clock=clock)
        extra = 2 if revoke_old else 1
        if len(chain.records) + extra > MAX_CHAIN_RECORDS:
            raise ConfigError(
                f"the rotation chain is full ({MAX_CHAIN_RECORDS} records)", code=ErrorCode.BAD_ROTATION_RECORD
            )
        now = int(clock())
        new = SigningKey.generate(old.alg)
        rotation = sign_rotation(
            old, new, sequence=chain.next_sequence, prev_hash=chain.head_hash, timestamp=now, reason=reason
        )
        added: tuple[ChainRecord, ...] = (rotation,)
        if revoke_old:
            added += (
                sign_revocation(
                    new,
                    old.key_id,
                    sequence=rotation.sequence + 1,
                    prev_hash=rotation.digest,
                    timestamp=now,
                    reason=revoke_reason,
                ),
            )
        final = verify_chain((*chain.records, *added))  # never write a chain a device would refuse
        new.save(data_dir / NEXT_KEY_FILE, passphrase)  # step 1
        _write_log(data_dir, final.records)  # step 2: the commit point
        _install_key(data_dir, passphrase, final)  # step 3
        if ledger is not None:  # step 4 (a crash before it: catch_up at the next start appends them)
            record_new(ledger, final, old, new, clock=clock)
    return RotationResult(old.key_id, new.key_id, added, final)


def revoke_key(
    data_dir: Path,
    key_id: str,
    passphrase: bytes | None = None,
    *,
    reason: str = "compromised",
    clock: Callable[[], float] = time.time,
    ledger: KeyRecordSink | None = None,
) -> RotationResult:
    """Record that a former coordinator key (rotated away earlier) is revoked, signed by the current key
    (and, with ``ledger``, append the revocation to the provenance ledger after the commit point)."""
    data_dir = Path(data_dir).expanduser()
    with _locked(data_dir):
        chain = recover(data_dir, passphrase)
        current = _current_key(data_dir, passphrase)
        check_key_matches_chain(current, chain)
        if ledger is not None:
            catch_up(ledger, chain, current, clock=clock)
        if len(chain.records) + 1 > MAX_CHAIN_RECORDS:
            raise ConfigError(
                f"the rotation chain is full ({MAX_CHAIN_RECORDS} records)", code=ErrorCode.BAD_ROTATION_RECORD
            )
        key_id = key_id.strip().lower()
        if key_id == current.key_id:
            raise ConfigError("that is the current key: rotate it with --revoke-old instead", code="bad_argument")
        record = sign_revocation(
            current,
            key_id,
            sequence=chain.next_sequence,
            prev_hash=chain.head_hash,
            timestamp=int(clock()),
            reason=reason,
        )
        final = verify_chain((*chain.records, record))
        _write_log(data_dir, final.records)
        if ledger is not None:
            record_new(ledger, final, current, current, clock=clock)
    return RotationResult(current.key_id, current.key_id, (record,), final)
