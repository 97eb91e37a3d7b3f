"""Signed, hash-chained ledger entries (the format is specified byte for byte in docs/provenance.md).

An entry is a *body*, a canonical JSON object (:mod:`qflare.ledger.canonical`), and the signatures
over its bytes.  Every body has the common fields::

    v        1                     format version
    kind     "round" | ...         what the entry records (KINDS: one spec per kind)
    seq      1, 2, 3, ...          position in the ledger
    prev     64 hex                entry_hash of entry seq-1; GENESIS_PREV (64 zeros) for seq 1
    round    integer | null        the round the entry is about (null for kinds not about one round)
    time     integer               Unix seconds (the coordinator's clock) when the entry was made
    signers  [64 hex, ...]         key ids that sign this entry, in signing order (1 or 2 of them)

plus the fields of its kind.  ``entry_hash`` = SHA-256(body bytes), hex.  Each signer's signature is
ML-DSA (FIPS 204) over the body bytes with the context string ``qflare/v1/ledger-entry``; key ids are
:func:`qflare.crypto.identity.key_id_of` (SHA-256 of the raw public key).  The chain covers bodies
only: a signature is randomised (hedged ML-DSA), the hash of what it signs is not.

A new kind is a :class:`KindSpec` registered with :func:`register_kind`: its own fields, how many keys
must sign it, and a check the offline verifier runs (which may change the verifier's trusted keys:
that is how a key rotation entry takes effect).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.errors import ConfigError, MalformedError

from . import canonical
from .canonical import is_hex32

__all__ = [
    "COMMON_FIELDS",
    "CONTEXT",
    "FORMAT_VERSION",
    "GENESIS_PREV",
    "KINDS",
    "KindSpec",
    "LedgerEntry",
    "TrustState",
    "apply_kind",
    "check_trusted",
    "register_kind",
    "untrusted_reason",
]

FORMAT_VERSION = 1
CONTEXT = b"qflare/v1/ledger-entry"
GENESIS_PREV = "0" * 64
COMMON_FIELDS = frozenset({"v", "kind", "seq", "prev", "round", "time", "signers"})
MAX_SIGNERS = 2


@dataclass
class TrustState:
    """What the verifier trusts while it walks the ledger: the coordinator keys (by key id) whose
    signature makes an entry authentic, and the device keys an export lists."""

    coordinator_keys: dict[str, VerifyKey]
    device_keys: dict[str, VerifyKey] = field(default_factory=dict)
    last_round: int | None = None
    """The highest round number an entry has recorded so far."""
    current_model: str | None = None
    """The model hash the last closed round published (the next round's parent)."""
    key_chain: list[str] = field(default_factory=list)
    """Every coordinator key id trusted so far, in order (the current one last); empty until the
    verifier seeds it with the first trusted key."""
    revoked: set[str] = field(default_factory=set)
    """Coordinator key ids a ``key_revocation`` entry revoked: they may sign nothing after it."""
    record_head: str = "0" * 64
    """SHA-256 (hex) of the last key rotation/revocation record applied (64 zeros: none yet)."""
    record_seq: int = 0
    """Its sequence number in the coordinator's rotation chain (0: none yet)."""


@dataclass(frozen=True)
class KindSpec:
    """One entry kind: its own body fields, how many coordinator keys sign it, and its two checks.

    ``check(body)`` looks at one body alone (it may run in a worker process, in any order) and raises
    MalformedError with the reason for a body that is not a valid entry of this kind; it returns a small
    *summary* (plain JSON values) of what ``apply`` needs.  ``apply(summary, state)`` runs in ledger
    order after the entry's signatures verified and its signers were found trusted: it checks the entry
    against what came before (raising MalformedError) and updates ``state`` -- a key rotation adds and
    removes coordinator keys there."""

    name: str
    fields: frozenset[str]
    signers: int
    check: Callable[[Mapping[str, Any]], dict[str, Any]]
    apply: Callable[[Mapping[str, Any], TrustState], None]
    about_round: bool = True
    """Whether ``round`` is an integer (True) or null (False) in entries of this kind."""
    max_signers: int = 0
    """The most keys that may sign an entry of this kind (0: exactly ``signers``)."""
    trust: Callable[[Sequence[str], Mapping[str, Any], TrustState], None] | None = None
    """Which signers are trusted for an entry of this kind, in ledger order, before ``apply``
    (None: every signer must be a currently trusted coordinator key, :func:`check_trusted`).  A key
    rotation entry may also be signed by the new key its embedded record introduces."""

    @property
    def signer_range(self) -> tuple[int, int]:
        return self.signers, max(self.signers, self.max_signers)


_KINDS: dict[str, KindSpec] = {}
KINDS: Mapping[str, KindSpec] = MappingProxyType(_KINDS)


def register_kind(spec: KindSpec) -> KindSpec:
    """Register an entry kind (ConfigError ``duplicate_name`` if the name is taken)."""
    if spec.name in _KINDS:
        raise ConfigError(f"ledger entry kind {spec.name!r} is already registered", code="duplicate_name")
    if spec.fields & COMMON_FIELDS or not 1 <= spec.signers <= spec.signer_range[1] <= MAX_SIGNERS:
        raise ConfigError(f"ledger entry kind {spec.name!r}: bad fields or signer count", code="config_error")
    _KINDS[spec.name] = spec
    return spec


def _bad(msg: str) -> MalformedError:
    return MalformedError(msg, code="malformed")


def _check_common(body: Any) -> KindSpec:
    if not isinstance(body, dict):
        raise _bad("an entry body is a JSON object")
    kind = body.get("kind")
    spec = KINDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise _bad(f"unknown entry kind {kind!r}")
    want = COMMON_FIELDS | spec.fields
    if set(body) != want:
        missing, extra = sorted(want - set(body)), sorted(set(body) - want)
        raise _bad(f"{kind} entry fields differ: missing {missing}, unexpected {extra}")
    if body["v"] != FORMAT_VERSION:
        raise _bad(f"unknown entry format version {body['v']!r}")
    seq, rnd, time = body["seq"], body["round"], body["time"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise _bad("seq must be an integer >= 1")
    if not is_hex32(body["prev"]):
        raise _bad("prev must be 64 lowercase hex characters")
    if spec.about_round:
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
            raise _bad("round must be an integer >= 1")
    elif rnd is not None:
        raise _bad(f"round must be null in a {kind} entry")
    if not isinstance(time, int) or isinstance(time, bool) or time < 0:
        raise _bad("time must be a non-negative integer")
    signers = body["signers"]
    low, high = spec.signer_range
    if (
        not isinstance(signers, list)
        or not low <= len(signers) <= high
        or not all(is_hex32(s) for s in signers)
        or len(set(signers)) != len(signers)
    ):
        count = str(low) if low == high else f"{low} to {high}"
        raise _bad(f"a {kind} entry names {count} distinct signer key id(s)")
    return spec


@dataclass(frozen=True, eq=False)
class LedgerEntry:
    """One entry: its canonical body bytes, the parsed body, its hash and its signatures (key id -> sig)."""

    raw: bytes = field(repr=False)
    body: Mapping[str, Any] = field(repr=False)
    entry_hash: str
    signatures: tuple[tuple[str, bytes], ...] = field(repr=False)

    @property
    def seq(self) -> int:
        return int(self.body["seq"])

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def prev_hash(self) -> str:
        return str(self.body["prev"])

    @property
    def round_number(self) -> int | None:
        rnd = self.body["round"]
        return None if rnd is None else int(rnd)

    @classmethod
    def create(
        cls,
        kind: str,
        *,
        seq: int,
        prev_hash: str,
        round_number: int | None,
        time: int,
        fields: Mapping[str, Any],
        keys: Sequence[SigningKey],
    ) -> LedgerEntry:
        """Build, check and sign a body (ConfigError ``bad_field`` for anything the format refuses)."""
        body = {
            **fields,
            "v": FORMAT_VERSION,
            "kind": kind,
            "seq": seq,
            "prev": prev_hash,
            "round": round_number,
            "time": int(time),
            "signers": [k.key_id for k in keys],
        }
        raw = canonical.encode(body)
        try:
            _check_common(body)
        except MalformedError as exc:
            raise ConfigError(f"cannot build a {kind} entry: {exc}", code="bad_field") from None
        sigs = tuple((k.key_id, k.sign(raw, CONTEXT)) for k in keys)
        return cls(raw, MappingProxyType(body), hashlib.sha256(raw).hexdigest(), sigs)

    @classmethod
    def parse(cls, raw: bytes, signatures: Sequence[tuple[str, bytes]]) -> LedgerEntry:
        """Strict structural parse of stored or exported bytes (signatures are checked by :meth:`verify`)."""
        return cls.from_body(canonical.decode(raw), bytes(raw), signatures)

    @classmethod
    def from_body(cls, body: Any, raw: bytes, signatures: Sequence[tuple[str, bytes]]) -> LedgerEntry:
        """An entry from a decoded body and its canonical bytes ``raw`` (the caller guarantees that
        ``raw == canonical.encode(body)``, e.g. because it decoded ``raw`` with :func:`canonical.decode`)."""
        _check_common(body)
        signers = body["signers"]
        if [k for k, _ in signatures] != signers:
            raise _bad(f"signatures must be one per signer {signers}, in that order")
        return cls(raw, MappingProxyType(body), hashlib.sha256(raw).hexdigest(), tuple(signatures))

    def verify(self, keys: Mapping[str, VerifyKey]) -> None:
        """Every signer must be in ``keys`` (MalformedError otherwise) and its signature must verify
        (BadSignatureError otherwise)."""
        for key_id, sig in self.signatures:
            key = keys.get(key_id)
            if key is None:
                raise _bad(f"signed by key {key_id[:16]}..., which is not a listed coordinator key")
            key.verify(sig, self.raw, CONTEXT)

    def check_kind(self) -> dict[str, Any]:
        """The kind's stateless check; its summary for :meth:`apply_kind`."""
        return KINDS[self.kind].check(self.body)


def apply_kind(kind: str, summary: Mapping[str, Any], state: TrustState) -> None:
    """The kind's in-order check and state update (see :class:`KindSpec`)."""
    KINDS[kind].apply(summary, state)


def check_trusted(
    signers: Sequence[str], state: TrustState, kind: str | None = None, summary: Mapping[str, Any] | None = None
) -> None:
    """MalformedError unless the signers of an entry are trusted at this point of the ledger: by the
    kind's own ``trust`` rule when it has one (given ``kind`` and its ``summary``), else every signer
    must be a current coordinator key."""
    spec = KINDS.get(kind) if kind is not None else None
    if spec is not None and spec.trust is not None and summary is not None:
        spec.trust(signers, summary, state)
        return
    for key_id in signers:
        if key_id not in state.coordinator_keys:
            raise _bad(untrusted_reason(key_id, state))


def untrusted_reason(key_id: str, state: TrustState) -> str:
    """Why ``key_id`` may not sign here: revoked, rotated away, or never a coordinator key."""
    if key_id in state.revoked:
        return f"signed by key {key_id[:16]}..., which was revoked earlier in the ledger"
    if key_id in state.key_chain:
        return f"signed by key {key_id[:16]}..., which an earlier key_rotation entry rotated away"
    return f"signed by key {key_id[:16]}..., which is not trusted at this point of the ledger"
