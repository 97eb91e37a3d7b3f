"""The verifiable provenance ledger: signed, hash-chained entries, Merkle proofs, offline verification.

* :mod:`.canonical` - the one byte encoding of an entry body (canonical JSON).
* :mod:`.entry` - :class:`LedgerEntry` (sign, parse, verify) and the registry of entry kinds.
* :mod:`.round_entry` - the ``round`` kind (:class:`RoundRecord`).
* :mod:`.key_entry` - the ``key_rotation`` / ``key_revocation`` kinds (coordinator key changes).
* :mod:`.merkle` - RFC 9162 Merkle trees over a round's updates, inclusion proofs.
* :mod:`.export` / :mod:`.verify` - the JSON Lines export and its offline verifier.

This package imports neither SQLAlchemy nor FastAPI: a third party verifies an export with it alone.
Format and guarantees: docs/provenance.md.
"""

from .canonical import decimal
from .entry import (
    CONTEXT,
    FORMAT_VERSION,
    GENESIS_PREV,
    KINDS,
    KindSpec,
    LedgerEntry,
    TrustState,
    register_kind,
)
from .export import EXPORT_FORMAT, ExportHeader, entry_line, header_line, parse_entry_line
from .key_entry import KEY_REVOCATION_KIND, KEY_ROTATION_KIND, key_record_entry, key_record_fields
from .merkle import InclusionProof, inclusion_proof, leaf_hash, merkle_root, update_leaf, verify_inclusion
from .round_entry import ROUND_KIND, LeftOut, RoundRecord, RoundUpdate, round_leaves
from .verify import LedgerVerifyError, ModelMatch, VerifyReport, verify_export, verify_file

__all__ = [
    "CONTEXT",
    "EXPORT_FORMAT",
    "FORMAT_VERSION",
    "GENESIS_PREV",
    "KEY_REVOCATION_KIND",
    "KEY_ROTATION_KIND",
    "KINDS",
    "ROUND_KIND",
    "ExportHeader",
    "InclusionProof",
    "KindSpec",
    "LedgerEntry",
    "LedgerVerifyError",
    "LeftOut",
    "ModelMatch",
    "RoundRecord",
    "RoundUpdate",
    "TrustState",
    "VerifyReport",
    "decimal",
    "entry_line",
    "header_line",
    "inclusion_proof",
    "key_record_entry",
    "key_record_fields",
    "leaf_hash",
    "merkle_root",
    "parse_entry_line",
    "register_kind",
    "round_leaves",
    "update_leaf",
    "verify_export",
    "verify_file",
    "verify_inclusion",
]
