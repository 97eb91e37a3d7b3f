"""The server's secrets on disk: the coordinator's ML-DSA key (and its public pin files) and the admin token.

Layout under the data directory::

    coordinator.key     PKCS#8 PEM, mode 0600 (encrypted when a passphrase is given)
    coordinator.pub     the raw public key, hex, one line (for devices to pin)
    coordinator.keyid   SHA-256 of the raw public key, hex, one line
    admin.token         the administrator bearer token, mode 0600 (unless QFLARE_ADMIN_TOKEN is set)
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..crypto import SigningKey
from ..errors import AdminAuthError, ConfigError

__all__ = [
    "ADMIN_TOKEN_ENV",
    "ADMIN_TOKEN_FILE",
    "KEYID_FILE",
    "KEY_FILE",
    "PUB_FILE",
    "AdminToken",
    "load_or_create_admin_token",
    "load_or_create_identity",
]

ADMIN_TOKEN_ENV = "QFLARE_ADMIN_TOKEN"
KEY_FILE, PUB_FILE, KEYID_FILE, ADMIN_TOKEN_FILE = (
    "coordinator.key",
    "coordinator.pub",
    "coordinator.keyid",
    "admin.token",
)
_MIN_ADMIN_TOKEN = 16


def _write_text(path: Path, text: str, mode: int) -> None:
    """Atomically replace ``path`` with ``text`` (a temp file created with ``mode``, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_identity(data_dir: Path, passphrase: bytes | None, alg: str) -> tuple[SigningKey, bool]:
    """The coordinator key at ``data_dir/coordinator.key``: loaded, or generated and saved (0600).

    Returns ``(key, created)``.  The public pin files are (re)written to match the key.
    """
    path = data_dir / KEY_FILE
    created = False
    if path.exists() or path.is_symlink():
        key = SigningKey.load(path, passphrase)
    else:
        key = SigningKey.generate(alg)
        try:
            key.save(path, passphrase)
            created = True
        except ConfigError as exc:
            if exc.code != "key_file_exists":
                raise
            key = SigningKey.load(path, passphrase)  # another process created it first: use theirs
    if key.alg != alg:
        raise ConfigError(f"{path} holds a {key.alg} key but the suite needs {alg}", code="wrong_key_type")
    for name, text in ((PUB_FILE, key.public.raw.hex()), (KEYID_FILE, key.key_id)):
        target = data_dir / name
        if not target.is_file() or target.read_text(encoding="ascii", errors="replace").strip() != text:
            _write_text(target, text + "\n", 0o644)
    return key, created


@dataclass(frozen=True)
class AdminToken:
    """The administrator bearer token; ``created`` when this start generated it (print it once)."""

    value: str
    source: str  # "env", "file" or "generated"
    path: Path | None

    @property
    def created(self) -> bool:
        return self.source == "generated"

    def check(self, authorization: str | None) -> None:
        """Accept ``Bearer <token>`` (constant-time compare); AdminAuthError 401 if missing, 403 if wrong."""
        if not authorization:
            raise AdminAuthError("administrator token required: Authorization: Bearer <token>")
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AdminAuthError("administrator token required: Authorization: Bearer <token>")
        if not hmac.compare_digest(presented.strip().encode("utf-8", "replace"), self.value.encode("utf-8")):
            raise AdminAuthError("administrator token is not valid", forbidden=True)


def load_or_create_admin_token(data_dir: Path, environ: Mapping[str, str] | None = None) -> AdminToken:
    """``$QFLARE_ADMIN_TOKEN``, else ``data_dir/admin.token`` (mode 0600), generated on first start."""
    env = os.environ if environ is None else environ
    given = env.get(ADMIN_TOKEN_ENV, "").strip()
    if given:
        if len(given) < _MIN_ADMIN_TOKEN:
            raise ConfigError(f"{ADMIN_TOKEN_ENV} must be at least {_MIN_ADMIN_TOKEN} characters")
        return AdminToken(given, "env", None)
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:  # created by a concurrent start: read theirs
            return load_or_create_admin_token(data_dir, environ)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return AdminToken(token, "generated", path)
    with os.fdopen(fd, "r", encoding="utf-8") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
            raise ConfigError(f"{path} has mode {stat.S_IMODE(mode):04o}; it must be 0600", code="insecure_key_file")
        token = fh.read(4096).strip()
    if len(token) < _MIN_ADMIN_TOKEN:
        raise ConfigError(f"{path} does not hold an admin token of at least {_MIN_ADMIN_TOKEN} characters")
    return AdminToken(token, "file", path)
