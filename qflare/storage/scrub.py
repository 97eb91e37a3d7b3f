"""Store scrub: re-hash every stored blob and check that every blob a row refers to is present.

Blobs are verified when they are read, but most are never read again (old updates, superseded models),
so corruption of them would go unnoticed.  :func:`verify_store` (``qflare server verify-store``, and
periodically in the server) re-reads all of them, reports each damaged or missing blob by where it lives
(its file path, or its ``s3://`` URL; :meth:`~qflare.storage.blob_backend.BlobBackend.describe`) with what to do, and records a security event (``blob_corrupt`` / ``blob_missing``) for each.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Literal

from qflare.storage.blob_backend import BlobBackend
from qflare.storage.repository import Store

__all__ = ["BlobProblem", "ScrubReport", "verify_store"]

_ADVICE = {
    "corrupt": "its bytes no longer match its digest; restore the file (or object) from a backup (the coordinator "
    "refuses to serve or aggregate it)",
    "missing": "a database row refers to it but the file (or object) is gone; restore it from a backup",
}


@dataclass(frozen=True)
class BlobProblem:
    digest: str
    path: str
    """Where the blob lives: a file path, or an ``s3://`` URL."""
    problem: Literal["corrupt", "missing"]
    referenced: bool
    """Whether a database row refers to it (an unreferenced blob is garbage and may simply be deleted)."""

    @property
    def reason(self) -> str:
        return f"blob_{self.problem}"

    def describe(self) -> str:
        advice = _ADVICE[self.problem] if self.referenced else "no row refers to it: it may be deleted"
        return f"{self.problem} blob {self.path} (sha256 {self.digest}): {advice}"


@dataclass(frozen=True)
class ScrubReport:
    checked: int
    """Stored blobs re-hashed."""
    problems: tuple[BlobProblem, ...]
    unreferenced: int
    """Intact stored blobs no row refers to (garbage collection removes them)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(
    store: Store, blobs: BlobBackend, *, record_events: bool = True, skip_events: Container[str] = ()
) -> ScrubReport:
    """Re-hash every stored blob and look for referenced ones that are missing.

    Each problem is recorded as a security event unless ``record_events`` is false or its path is in
    ``skip_events`` (the server's background scrub reports each damaged file once per process)."""
    referenced = store.referenced_blobs()
    stored = set(blobs.digests())
    problems: list[BlobProblem] = []
    unreferenced = 0
    for digest in sorted(stored | referenced):
        path = blobs.describe(digest)
        status: Literal["missing", "corrupt"] | None = "missing" if digest not in stored else blobs.check(digest)
        if status is None:
            unreferenced += digest not in referenced
            continue
        if status == "missing" and digest not in referenced:
            continue  # removed between the listing and the check: not a problem
        problems.append(BlobProblem(digest, path, status, digest in referenced))
    if record_events:
        for p in problems:
            if p.path not in skip_events:
                store.record_security_event(p.reason, f"verify-store: {p.describe()}"[:2000])
    return ScrubReport(len(stored), tuple(problems), unreferenced)
