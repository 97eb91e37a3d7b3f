"""glibc heap tuning for QFLARE's own long-running processes (simulation, device client).

docs/performance.md: glibc's adaptive thresholds made each round's large temporary tensors go back to the
kernel and fault in again (~0.8 s a round on fmnist-dir05).  :func:`tune_heap` fixes the mmap threshold
at 32 MiB and the trim threshold at 4 GiB at run time (``mallopt``, the same effect as the
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` variables); :func:`release_free_memory` then gives
free pages back once a round (``malloc_trim``), so the resident size stays near what one round needs
instead of growing with fragmentation.  Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

__all__ = ["SERVER_ARENAS", "limit_arenas", "release_free_memory", "tune_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: malloc arenas for a coordinator server (docs/performance.md, "Server memory under ingest"): each
#: upload thread otherwise keeps its own arena of freed update-sized buffers (the trim threshold is high).
SERVER_ARENAS = 2


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def tune_heap(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 4 * 1024**3 - 1) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when applied."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas for this process (effective for threads that allocate afterwards; call
    before starting threads); True when applied."""
    if count < 1:
        raise ValueError(f"arena count must be >= 1, got {count}")
    return _LIBC is not None and bool(_LIBC.mallopt(_M_ARENA_MAX, count))


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (call between rounds, not in a hot loop)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
