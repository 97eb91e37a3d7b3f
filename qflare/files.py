"""Writing result files so that a reader never sees half a file: a temp file in the same folder, then rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o666) -> Path:
    """Replace ``path`` with ``data`` atomically (temp file in the same folder, fsync, ``os.replace``).

    ``mode`` is the new file's permission bits before the umask (``0o600`` for a secret: the temp file is
    created with them, so the secret is never readable by others, not even for a moment).  An interrupted
    write leaves the previous version of ``path`` (or none), never a torn one."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
