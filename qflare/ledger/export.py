"""The export file: JSON Lines, a header line and then one line per entry (docs/provenance.md, "Export").

Line 1, the header (canonical JSON)::

    {"coordinator":KEY,"coordinator_keys":[KEY,...],"devices":[KEY,...],"entries":N,
     "format":"qflare-ledger","version":1}
    KEY = {"alg":"ML-DSA-65","key_id":"<64 hex>","public_key":"<hex>"}

``coordinator`` is the key trusted from the first entry on; ``coordinator_keys`` lists every coordinator
public key that signs an entry (``coordinator`` included; a key rotation entry names the keys it
trusts or distrusts by key id, and their public halves are found here); ``devices`` is every enrolled
device key, so that device signatures verify offline; all lists are sorted by key id.  ``entries`` is the
number of entry lines that follow.  The header is not signed: what makes the coordinator key
trustworthy is ``--pin KEY_ID`` (or another way of knowing the key id).

Each further line (canonical JSON, one entry, ascending ``seq``)::

    {"body":BODY,"entry_hash":"<64 hex>","envelopes":[...],"kind":K,"round":R,"seq":S,
     "sigs":[["<signer key id>","<signature hex>"],...]}

``body`` is the entry body as a JSON object (its canonical encoding is what is hashed and signed);
``kind``, ``round``, ``seq`` and ``entry_hash`` repeat it for readers (the verifier checks they agree);
``envelopes`` (round entries) holds, for each of ``body.updates`` in order, the hex of the exact
signed UPDATE envelope the device sent, or null where the database has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qflare.crypto.identity import VerifyKey
from qflare.crypto.suite import SIG_ALGORITHMS
from qflare.errors import MalformedError

from . import canonical
from .canonical import is_hex32
from .entry import LedgerEntry

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "ExportHeader", "entry_line", "header_line", "parse_entry_line"]

EXPORT_FORMAT = "qflare-ledger"
EXPORT_VERSION = 1
_HEADER_KEYS = frozenset({"coordinator", "coordinator_keys", "devices", "entries", "format", "version"})
_LINE_KEYS = frozenset({"body", "entry_hash", "envelopes", "kind", "round", "seq", "sigs"})


def _bad(msg: str) -> MalformedError:
    return MalformedError(msg, code="malformed")


def _key_json(key: VerifyKey) -> dict[str, str]:
    return {"alg": key.alg, "key_id": key.key_id, "public_key": key.raw.hex()}


def _key_from(value: Any, what: str) -> VerifyKey:
    if not isinstance(value, dict) or set(value) != {"alg", "key_id", "public_key"}:
        raise _bad(f"{what} is an object with alg, key_id and public_key")
    alg, raw_hex = value["alg"], value["public_key"]
    if alg not in SIG_ALGORITHMS or not isinstance(raw_hex, str):
        raise _bad(f"{what}: unknown signature algorithm {alg!r}")
    try:
        raw = bytes.fromhex(raw_hex)
    except ValueError:
        raise _bad(f"{what}: public_key is not hex") from None
    key = VerifyKey.from_bytes(alg, raw)
    if key.key_id != value["key_id"]:
        raise _bad(f"{what}: key_id is not the SHA-256 of public_key")
    return key


@dataclass(frozen=True)
class ExportHeader:
    coordinator: VerifyKey
    coordinator_keys: tuple[VerifyKey, ...]
    devices: tuple[VerifyKey, ...]
    entries: int

    def to_line(self) -> bytes:
        return header_line(self.coordinator, self.devices, self.entries, self.coordinator_keys)

    @classmethod
    def parse(cls, line: bytes) -> ExportHeader:
        value = canonical.decode(line)
        if not isinstance(value, dict) or set(value) != _HEADER_KEYS:
            raise _bad("the first line is not a qflare-ledger export header")
        if value["format"] != EXPORT_FORMAT or value["version"] != EXPORT_VERSION:
            raise _bad(f"not a {EXPORT_FORMAT} v{EXPORT_VERSION} export")
        entries = value["entries"]
        if not isinstance(entries, int) or isinstance(entries, bool) or entries < 0:
            raise _bad("header entries must be a non-negative integer")
        devices, signing = value["devices"], value["coordinator_keys"]
        if not isinstance(devices, list) or not isinstance(signing, list):
            raise _bad("header devices and coordinator_keys must be lists")
        keys = tuple(_key_from(d, f"device key {i}") for i, d in enumerate(devices))
        coordinator_keys = tuple(_key_from(d, f"coordinator key {i}") for i, d in enumerate(signing))
        first = _key_from(value["coordinator"], "coordinator key")
        if first not in coordinator_keys:
            raise _bad("coordinator_keys does not list the coordinator key")
        return cls(first, coordinator_keys, keys, entries)


def header_line(
    coordinator: VerifyKey,
    devices: Sequence[VerifyKey],
    entries: int,
    coordinator_keys: Sequence[VerifyKey] = (),
) -> bytes:
    """The header line; ``coordinator_keys`` defaults to (and always includes) ``coordinator``."""
    signing = {k.key_id: k for k in (coordinator, *coordinator_keys)}
    value = {
        "coordinator": _key_json(coordinator),
        "coordinator_keys": [_key_json(signing[k]) for k in sorted(signing)],
        "devices": [_key_json(k) for k in sorted(devices, key=lambda k: k.key_id)],
        "entries": entries,
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
    }
    return canonical.encode(value)


def entry_line(entry: LedgerEntry, envelopes: Sequence[bytes | None] = ()) -> bytes:
    """One export line for ``entry`` (``envelopes``: see the module docstring)."""
    value = {
        "body": dict(entry.body),
        "entry_hash": entry.entry_hash,
        "envelopes": [None if e is None else e.hex() for e in envelopes],
        "kind": entry.kind,
        "round": entry.round_number,
        "seq": entry.seq,
        "sigs": [[key_id, sig.hex()] for key_id, sig in entry.signatures],
    }
    return canonical.encode_checked(value)  # a checked body, hex strings and integers


def parse_entry_line(line: bytes) -> tuple[LedgerEntry, list[bytes | None]]:
    """Strict parse of one entry line: (entry, envelopes).  Signatures are not checked here."""
    value = canonical.decode(line)
    if not isinstance(value, dict) or set(value) != _LINE_KEYS:
        raise _bad(f"an entry line has exactly the keys {sorted(_LINE_KEYS)}")
    sigs = value["sigs"]
    if not isinstance(sigs, list) or not all(
        isinstance(s, list) and len(s) == 2 and is_hex32(s[0]) and isinstance(s[1], str) for s in sigs
    ):
        raise _bad("sigs is a list of [key id, signature hex]")
    if not isinstance(value["envelopes"], list):
        raise _bad("envelopes is a list")
    try:
        signatures = [(s[0], bytes.fromhex(s[1])) for s in sigs]
        envelopes = [None if e is None else bytes.fromhex(e) for e in value["envelopes"]]
    except (TypeError, ValueError):
        raise _bad("signatures and envelopes are hex strings") from None
    body = value["body"]
    # The line is canonical and "body" sorts first, so the body's canonical bytes sit between the
    # 8-byte prefix '{"body":' and the canonical encoding of the other keys (its '{' becoming ',').
    rest = canonical.encode_checked({k: v for k, v in value.items() if k != "body"})
    raw = bytes(line[8 : len(line) - len(rest)])
    entry = LedgerEntry.from_body(body, raw, signatures)
    if (value["seq"], value["kind"], value["round"], value["entry_hash"]) != (
        entry.seq,
        entry.kind,
        entry.round_number,
        entry.entry_hash,
    ):
        raise _bad("seq, kind, round or entry_hash differ from the entry body")
    return entry, envelopes
