"""Writing result files so that a reader never sees half a file: a temp file in the same folder, then rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically (temp file in the same folder, fsync, ``os.replace``).

    An interrupted write leaves the previous version of ``path`` (or none), never a torn one."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
