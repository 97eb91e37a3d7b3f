"""What a device keeps on disk between starts, and how it pins the coordinator's key.

A state directory (mode 0700) holds:

* ``key.pem`` - the device's ML-DSA signing key (PKCS#8, 0600, optionally passphrase-encrypted);
* ``enrollment.record`` - the coordinator-signed enrollment record (so a restart never needs a token);
* ``server.keyid`` - the pinned coordinator key id (SHA-256 of its public key, hex), written only once
  the key the coordinator serves hashed to the id the operator gave (a mistyped id pins nothing);
* ``server.pub`` - the pinned coordinator's public key (JSON ``{"alg", "public_key"}``), saved once it
  matched the pin, so stored receipts can be re-verified offline (``qflare client verify-receipts``);
* ``progress.json`` - the highest global model version the device accepted (signed by the coordinator)
  and the highest round it holds a signed receipt for: anything older is refused (no rollback);
* ``receipts.jsonl`` - one line per update the coordinator acknowledged: the signed UPDATE_ACK
  envelope (``ack``, hex) and the values it signs (device, round, update hash, duplicate, time), so
  every line can be re-verified against the pinned key (an audit trail, and proof of delivery), and the
  example count the device signed in that update;
* ``proofs.jsonl`` - after each such round, the coordinator's signed ledger entry of the round and the
  Merkle inclusion proof of the update (or the reason it was left out), verified
  (:mod:`qflare.device.proofs`).

Pinning is never trust-on-first-use: the operator gives the key id out of band (``--server-key-id`` or
the server's ``coordinator.keyid``/``coordinator.pub`` file), and the key served at ``/v1/identity``
is accepted only when its SHA-256 equals that id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto import DEFAULT_SUITE, HIGH_SUITE, Field, MsgType, SignedEnvelope, SigningKey, Suite, VerifyKey
from ..crypto.identity import key_id_of
from ..crypto.payloads import AckStatus, check_update_ack
from ..crypto.rotation import ChainState, verify_chain
from ..errors import AuthError, ConfigError, MalformedError, QflareError

__all__ = [
    "SUITES_BY_NAME",
    "DeviceState",
    "ReceiptCheck",
    "normalize_key_id",
    "pin_server_key",
    "read_pin_file",
    "served_key",
    "write_private",
]

SUITES_BY_NAME: dict[str, Suite] = {s.name: s for s in (DEFAULT_SUITE, HIGH_SUITE)}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def normalize_key_id(value: str) -> str:
    """A key id as 64 lowercase hex digits (spaces, colons and a ``sha256:`` prefix are tolerated)."""
    text = value.strip().lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
    if not _HEX64.match(text):
        raise ConfigError(
            f"a coordinator key id is 64 hex digits (SHA-256), got {value.strip()[:80]!r}", code="bad_key_id"
        )
    return text


def read_pin_file(path: str | os.PathLike[str]) -> str:
    """The key id in ``path``: a ``coordinator.keyid`` (64 hex) or a ``coordinator.pub`` (public key hex)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read coordinator key file {path}: {exc}", code="bad_key_file") from None
    if _HEX64.match(text):
        return text
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path} holds neither a key id nor a public key in hex", code="bad_key_file") from None
    return key_id_of(raw)


def served_key(identity: Mapping[str, Any]) -> tuple[VerifyKey, Suite]:
    """The key and suite a ``/v1/identity`` document serves (hashed by the caller against a pin)."""
    if not isinstance(identity, Mapping):
        raise MalformedError("coordinator identity is not a JSON object", code="malformed")
    alg, public_hex = identity.get("alg"), identity.get("public_key")
    if not isinstance(alg, str) or not isinstance(public_hex, str):
        raise MalformedError("coordinator identity lacks 'alg' or 'public_key'", code="malformed")
    try:
        raw = bytes.fromhex(public_hex)
    except ValueError:
        raise MalformedError("coordinator public key is not hex", code="malformed") from None
    key = VerifyKey.from_bytes(alg, raw)
    suite_name = identity.get("suite")
    if suite_name is None:
        suite = next((s for s in SUITES_BY_NAME.values() if s.sig == key.alg), DEFAULT_SUITE)
    elif isinstance(suite_name, str) and suite_name in SUITES_BY_NAME:
        suite = SUITES_BY_NAME[suite_name]
    else:
        raise ConfigError(
            f"coordinator uses suite {suite_name!r}, which this client does not know", code="unknown_suite"
        )
    if suite.sig != key.alg:
        raise ConfigError(f"coordinator key is {key.alg} but its suite signs with {suite.sig}", code="unknown_suite")
    return key, suite


def pin_server_key(identity: Mapping[str, Any], pinned_key_id: str) -> tuple[VerifyKey, Suite]:
    """Check the ``/v1/identity`` document against the pinned id; the coordinator's key and suite.

    The public key itself is hashed: the document's own ``key_id`` claim is not trusted."""
    pinned = normalize_key_id(pinned_key_id)
    public_hex = identity.get("public_key") if isinstance(identity, Mapping) else None
    if isinstance(public_hex, str):
        try:
            actual = key_id_of(bytes.fromhex(public_hex))
        except ValueError:
            actual = None
        if actual is not None and actual != pinned:
            raise AuthError(
                f"the coordinator's key is {actual}, not the pinned key id {pinned}: refusing to talk to it (wrong "
                "server, its key changed, or a mistyped --server-key-id; nothing was pinned)",
                code="server_key_mismatch",
            )
    return served_key(identity)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ReceiptCheck:
    """The outcome of re-verifying one line of ``receipts.jsonl`` (or, ``kind="proof"``, of ``proofs.jsonl``)."""

    line: int
    ok: bool
    round: int | None
    update_hash: str | None
    reason: str = ""
    kind: str = "receipt"


class DeviceState:
    """A device's state directory (see the module docstring)."""

    KEY, RECORD, PIN, RECEIPTS = "key.pem", "enrollment.record", "server.keyid", "receipts.jsonl"
    SERVER_KEY, PROGRESS, ROTATIONS = "server.pub", "progress.json", "server.rotations"

    def __init__(self, directory: str | os.PathLike[str], *, passphrase: bytes | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._passphrase = passphrase

    @property
    def key_path(self) -> Path:
        return self.dir / self.KEY

    @property
    def receipts_path(self) -> Path:
        return self.dir / self.RECEIPTS

    def pin(self, key_id: str | None) -> str:
        """The coordinator key id to check the served key against: ``key_id``, else the stored pin.

        Nothing is written here: a pin is stored only by :meth:`save_server_key` (once the served key
        hashed to it) or :meth:`move_pin` (once a rotation chain to it verified), so a mistyped
        ``--server-key-id`` leaves the state directory as it was.  A state directory stays with the
        coordinator it was first pinned to; a ``key_id`` it moved away from through a verified rotation
        (``server.rotations``) still names it, and yields the new pin."""
        path = self.dir / self.PIN
        stored = normalize_key_id(path.read_text()) if path.exists() else None
        given = normalize_key_id(key_id) if key_id else None
        if given and stored and given != stored:
            if given not in {k.key_id for k in self.rotation_chain().keys}:
                raise AuthError(
                    f"state dir {self.dir} is pinned to coordinator {stored[:16]}..., not {given[:16]}...: "
                    "use a fresh --state-dir for another coordinator",
                    code="server_key_mismatch",
                )
            given = stored  # a former key this state dir moved away from through a verified rotation
        pinned = given or stored
        if pinned is None:
            raise ConfigError(
                "no coordinator key pinned: pass --server-key-id or --server-key-file", code="no_server_key"
            )
        return pinned

    def signing_key(self, alg: str) -> tuple[SigningKey, bool]:
        """The device key (generated and saved 0600 on first start); (key, created?)."""
        if self.key_path.exists():
            key = SigningKey.load(self.key_path, self._passphrase)
            if key.alg != alg:
                raise ConfigError(
                    f"device key in {self.key_path} is {key.alg}; the coordinator's suite needs {alg}",
                    code="key_alg_mismatch",
                )
            return key, False
        key = SigningKey.generate(alg)
        key.save(self.key_path, self._passphrase)
        return key, True

    def load_record(self) -> bytes | None:
        path = self.dir / self.RECORD
        return path.read_bytes() if path.exists() else None

    def save_record(self, record: bytes) -> None:
        write_private(self.dir / self.RECORD, record)

    # ------------------------------------------------------------------ pinned key, kept for audits
    def save_server_key(self, key: VerifyKey) -> None:
        """Pin ``key`` (``server.keyid``) and keep it (``server.pub``, for offline receipt checks).

        Called only with a key that was verified against the pin (:func:`pin_server_key`); a state dir
        already pinned to another key refuses it (AuthError ``server_key_mismatch``)."""
        self.pin(key.key_id)  # the same check as for a given id: one coordinator per state dir
        pin_path = self.dir / self.PIN
        if not pin_path.exists():
            write_private(pin_path, (key.key_id + "\n").encode())
        doc = json.dumps({"alg": key.alg, "public_key": key.raw.hex()}, sort_keys=True) + "\n"
        path = self.dir / self.SERVER_KEY
        if not path.exists() or path.read_text() != doc:
            write_private(path, doc.encode())

    def load_server_key(self) -> VerifyKey:
        """The saved coordinator key, checked against the pin (AuthError ``server_key_mismatch``)."""
        path = self.dir / self.SERVER_KEY
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"no usable coordinator key in {path} ({exc}): run the client once, or pass --server-key-file",
                code="no_server_key",
            ) from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path} is not a JSON object", code="bad_key_file")
        return pin_server_key(doc, self.pin(None))[0]

    # ------------------------------------------------------------------ coordinator key rotation
    def rotation_chain(self) -> ChainState:
        """The rotation chain this device verified when it last moved its pin (empty if it never did)."""
        path = self.dir / self.ROTATIONS
        if not path.exists():
            return verify_chain([])
        try:
            records = [bytes.fromhex(line) for line in path.read_text(encoding="ascii").splitlines() if line]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc})", code="bad_rotation_record") from None
        return verify_chain(records)

    def former_server_keys(self) -> tuple[VerifyKey, ...]:
        """The coordinator keys this device moved away from (oldest first), for records signed before."""
        return self.rotation_chain().keys[:-1]

    def move_pin(self, chain: ChainState, key: VerifyKey) -> None:
        """Persist a verified move to ``key`` (the chain's current key): the chain, then the pin, then the
        saved key - each file replaced atomically, so a crash leaves the old pin or the new one."""
        if chain.current != key:
            raise ConfigError("move_pin: the key is not the chain's current key", code="bad_argument")
        write_private(self.dir / self.ROTATIONS, "".join(r.raw.hex() + "\n" for r in chain.records).encode())
        write_private(self.dir / self.PIN, (key.key_id + "\n").encode())
        self.save_server_key(key)

    # ------------------------------------------------------------------ progress (rollback protection)
    def progress(self) -> tuple[int, int]:
        """(highest accepted model version, highest acknowledged round); (0, 0) when nothing is stored."""
        path = self.dir / self.PROGRESS
        if not path.exists():
            return 0, 0
        try:
            doc = json.loads(path.read_text())
            version, rnd = doc["model_version"], doc["round"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}): refusing to forget what was accepted") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (version, rnd)):
            raise ConfigError(f"{path} holds values that are not non-negative integers")
        return version, rnd

    def record_progress(self, *, model_version: int | None = None, round: int | None = None) -> tuple[int, int]:
        """Raise the stored high-water marks (never lower them); the new pair."""
        old = self.progress()
        new = (max(old[0], model_version or 0), max(old[1], round or 0))
        if new != old:
            doc = {"model_version": new[0], "round": new[1]}
            write_private(self.dir / self.PROGRESS, (json.dumps(doc, sort_keys=True) + "\n").encode())
        return new

    # ------------------------------------------------------------------ receipts
    def append_receipt(self, device_id: str, ack: bytes, examples: int | None = None) -> dict[str, Any]:
        """Store a verified UPDATE_ACK envelope and the values it signs; the line.  ``examples`` is the
        example count this device signed in the update (kept to check the round's inclusion proof)."""
        env = SignedEnvelope.parse(ack, expected_type=MsgType.UPDATE_ACK)
        line = {
            "device_id": env.get_key_id(Field.DEVICE_KEY_ID),
            "round": env.get_int(Field.ROUND),
            "update_hash": env.get(Field.UPDATE_HASH).hex(),
            "duplicate": env.get_int(Field.STATUS) == AckStatus.DUPLICATE,
            "signed_at": env.get_int(Field.TIMESTAMP),
            "ack": ack.hex(),
        }
        if examples is not None:
            line["examples"] = int(examples)
        if line["device_id"] != device_id:
            raise AuthError("the acknowledgement names another device", code="bad_receipt")
        fd = os.open(self.receipts_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return line

    def receipts(self) -> list[dict[str, Any]]:
        if not self.receipts_path.exists():
            return []
        return [json.loads(line) for line in self.receipts_path.read_text().splitlines() if line.strip()]

    def verify_receipts(
        self, server_key: VerifyKey, device_id: str | None = None, *, former: Sequence[VerifyKey] = ()
    ) -> list[ReceiptCheck]:
        """Re-verify every stored receipt: its ack must be signed by ``server_key`` (or one of the
        ``former`` keys the device rotated away from), acknowledge this device (``device_id``, else the
        key in this state dir) and say exactly what the line says."""
        if device_id is None:
            device_id = SigningKey.load(self.key_path, self._passphrase).key_id if self.key_path.exists() else None
        if not self.receipts_path.exists():
            return []
        checks = []
        for n, text in enumerate(self.receipts_path.read_text().splitlines(), 1):
            if text.strip():
                checks.append(_check_receipt_line(n, text, (server_key, *former), device_id))
        return checks


def _open_ack(ack: bytes, keys: Sequence[VerifyKey]) -> SignedEnvelope:
    """The ack verified by the pinned key (``keys[0]``) or a former one; the pinned key's refusal otherwise."""
    env = SignedEnvelope.parse(ack, expected_type=MsgType.UPDATE_ACK)
    try:
        return env.verify(keys[0])
    except QflareError:
        for key in keys[1:]:
            try:
                return env.verify(key)
            except QflareError:
                continue
        raise


def _check_receipt_line(n: int, text: str, keys: Sequence[VerifyKey], device_id: str | None) -> ReceiptCheck:
    rnd = digest = None
    try:
        line = json.loads(text)
        if not isinstance(line, dict):
            raise MalformedError("not a JSON object")
        rnd, digest = line.get("round"), line.get("update_hash")
        if not isinstance(line.get("ack"), str):
            raise MalformedError("no signed acknowledgement stored (a receipt from before acks were kept)")
        env = _open_ack(bytes.fromhex(line["ack"]), keys)
        if not isinstance(rnd, int) or not isinstance(digest, str):
            raise MalformedError("round or update_hash missing")
        owner = device_id or line.get("device_id")
        status = check_update_ack(env, str(owner), rnd, digest)
        if line.get("device_id") != owner or line.get("duplicate") != (status is AckStatus.DUPLICATE):
            raise AuthError("the line says something its acknowledgement does not sign", code="bad_receipt")
        if line.get("signed_at") != env.get_int(Field.TIMESTAMP):
            raise AuthError("the line's time is not the signed one", code="bad_receipt")
    except QflareError as exc:
        return ReceiptCheck(n, False, rnd if isinstance(rnd, int) else None, _str(digest), f"[{exc.code}] {exc}")
    except ValueError as exc:
        return ReceiptCheck(n, False, rnd if isinstance(rnd, int) else None, _str(digest), f"unreadable: {exc}")
    return ReceiptCheck(n, True, rnd, digest)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
