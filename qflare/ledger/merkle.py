"""Merkle trees over a round's updates, RFC 6962 / RFC 9162 section 2.1 with SHA-256.

    leaf hash   = SHA-256(0x00 || leaf)
    node hash   = SHA-256(0x01 || left || right)
    MTH([])     = SHA-256("")
    MTH(D[n])   = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two < n

Inclusion proofs are RFC 9162's audit paths (section 2.1.3.1) and are verified with its algorithm
(section 2.1.3.2).  A ledger leaf is :func:`update_leaf`: the device key id, the update hash and the
example count, so a proof shows that *this device's* update, with *this* weight, is in the round.
SHA-256 is hashlib's (OpenSSL); nothing here is a hand-written primitive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from qflare.errors import ConfigError, MalformedError

__all__ = [
    "EMPTY_ROOT",
    "InclusionProof",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "root_from_leaf_hashes",
    "update_leaf",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF = b"\x00"
_NODE = b"\x01"
MAX_PROOF_LEN = 64


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF + leaf).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def update_leaf(device_key_id: str, update_hash: str, num_examples: int) -> bytes:
    """The 72-byte leaf of one update: key id (32) || update SHA-256 (32) || example count (u64 big-endian)."""
    try:
        key = bytes.fromhex(device_key_id)
        digest = bytes.fromhex(update_hash)
    except (TypeError, ValueError):
        raise ConfigError("device key id and update hash must be hex", code="bad_field") from None
    if len(key) != 32 or len(digest) != 32:
        raise ConfigError("device key id and update hash must be 32 bytes each", code="bad_field")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or not 0 <= num_examples < 2**64:
        raise ConfigError(f"example count {num_examples!r} does not fit in u64", code="bad_field")
    return key + digest + num_examples.to_bytes(8, "big")


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves.  Bottom-up pairing that promotes a lone last node unchanged
    builds exactly RFC 6962's left-balanced tree."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    sha = hashlib.sha256
    while len(level) > 1:
        nxt = [sha(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(leaves) (RFC 9162 section 2.1.1)."""
    sha = hashlib.sha256
    return root_from_leaf_hashes([sha(_LEAF + leaf).digest() for leaf in leaves])


@dataclass(frozen=True)
class InclusionProof:
    """That the leaf at ``index`` is in the tree of ``size`` leaves: the audit path, leaf side up."""

    index: int
    size: int
    path: tuple[bytes, ...]

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "size": self.size, "path": [p.hex() for p in self.path]}

    @classmethod
    def from_json(cls, data: object) -> InclusionProof:
        """Strict parse of :meth:`to_json` output; MalformedError otherwise."""
        if not isinstance(data, dict) or set(data) != {"index", "size", "path"}:
            raise MalformedError("an inclusion proof is an object with index, size and path", code="malformed")
        index, size, path = data["index"], data["size"], data["path"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, size)) or not 0 <= index < size:
            raise MalformedError("inclusion proof index/size out of range", code="malformed")
        if not isinstance(path, list) or len(path) > MAX_PROOF_LEN:
            raise MalformedError("inclusion proof path must be a list of at most 64 hashes", code="malformed")
        out: list[bytes] = []
        for item in path:
            if not isinstance(item, str) or len(item) != 64:
                raise MalformedError("inclusion proof hashes are 64 lowercase hex characters", code="malformed")
            try:
                out.append(bytes.fromhex(item))
            except ValueError:
                raise MalformedError(
                    "inclusion proof hashes are 64 lowercase hex characters", code="malformed"
                ) from None
        return cls(index, size, tuple(out))


def _path(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1 over leaf hashes."""
    n = len(hashes)
    if n <= 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if index < k:
        return [*_path(index, hashes[:k]), root_from_leaf_hashes(hashes[k:])]
    return [*_path(index - k, hashes[k:]), root_from_leaf_hashes(hashes[:k])]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> InclusionProof:
    """The audit path of ``leaves[index]``; ConfigError (``bad_index``) when out of range."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(leaves):
        raise ConfigError(f"leaf index {index!r} is not in 0..{len(leaves) - 1}", code="bad_index")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return InclusionProof(index, len(leaves), tuple(_path(index, hashes)))


def verify_inclusion(leaf: bytes, proof: InclusionProof, root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: whether ``leaf`` at ``proof.index`` of a ``proof.size``-leaf tree
    hashes up to ``root``."""
    fn, sn = proof.index, proof.size - 1
    if not 0 <= fn <= sn:
        return False
    r = leaf_hash(leaf)
    for p in proof.path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
