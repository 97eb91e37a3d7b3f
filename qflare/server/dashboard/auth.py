"""Operator logins: the admin token (or an argon2-hashed operator password) exchanged for a session cookie.

A session id is 32 random bytes (URL-safe base64) held only by the browser, in a ``Secure; HttpOnly;
SameSite=Strict`` cookie with the ``__Host-`` prefix; the database keeps its SHA-256 and expiry
(:mod:`qflare.storage.operators`).  Its CSRF token is derived from it (SHA-256 under a fixed label), so a
page can carry the token while a script on another origin, which cannot read the cookie, cannot compute it.

Device credentials (the protocol's ``X-Qflare-Session`` header, enrollment tokens) are not looked at: only
this cookie opens the dashboard.  Failed logins are recorded as ``login_failed`` security events and
rate-limited per client address (:class:`LoginLimiter`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from datetime import timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.requests import Request

from ...errors import AdminAuthError, ConfigError, ErrorCode
from ...files import write_atomic
from ...storage import Store
from ..credentials import AdminToken
from ..limits import RateDecision, RateLimiter

__all__ = [
    "LOGIN_CSRF_COOKIE",
    "PASSWORD_FILE",
    "SESSION_COOKIE",
    "LoginLimiter",
    "OperatorAuth",
    "csrf_token",
    "write_password_file",
]

SESSION_COOKIE = "__Host-qflare_dashboard"
LOGIN_CSRF_COOKIE = "__Host-qflare_login"
PASSWORD_FILE = "operator.password"
_MAX_SECRET = 1024
_MIN_PASSWORD = 12


def csrf_token(session_id: str) -> str:
    """The CSRF token of a session: derived from the secret cookie value, never stored."""
    return hashlib.sha256(b"qflare-dashboard-csrf\x00" + session_id.encode("utf-8", "replace")).hexdigest()


def write_password_file(data_dir: Path, password: str) -> Path:
    """Store the argon2id hash of ``password`` at ``data_dir/operator.password`` (mode 0600, replaced atomically)."""
    if not isinstance(password, str) or not _MIN_PASSWORD <= len(password) <= _MAX_SECRET:
        raise ConfigError(f"the operator password must be {_MIN_PASSWORD}..{_MAX_SECRET} characters")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(data_dir / PASSWORD_FILE, PasswordHasher().hash(password) + "\n", mode=0o600)


def _read_password_hash(data_dir: Path) -> str | None:
    path = data_dir / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(f"{path} has mode {mode:04o}; it must be 0600", code="insecure_key_file")
        value = fh.read(4096).strip()
    if not value.startswith("$argon2"):
        raise ConfigError(f"{path} does not hold an argon2 hash (write it with `qflare server operator-password`)")
    return value


class LoginLimiter:
    """Failed logins per client address: a small token bucket, looked at before a login is checked and
    charged only when it fails, so an operator who types the secret right is never slowed down."""

    def __init__(self, rate_per_s: float = 1 / 12, burst: float = 5.0, report_interval_s: float = 10.0) -> None:
        self._buckets = RateLimiter(rate_per_s, burst, report_interval_s=report_interval_s, max_keys=10_000)

    def check(self, remote: str) -> RateDecision:
        return self._buckets.check(remote[:128], take=False)

    def failed(self, remote: str) -> None:
        self._buckets.charge(remote[:128])


class OperatorAuth:
    """Checks login secrets and operator sessions (see the module docstring)."""

    def __init__(
        self, store: Store, admin: AdminToken, data_dir: Path, *, lifetime: timedelta = timedelta(hours=8)
    ) -> None:
        self.store, self.admin, self.lifetime = store, admin, lifetime
        self._password_hash = _read_password_hash(data_dir)
        self._hasher = PasswordHasher()
        self.limiter = LoginLimiter()

    @property
    def password_enabled(self) -> bool:
        return self._password_hash is not None

    def verify(self, secret: str) -> str:
        """The login method ``secret`` proves ("admin_token" or "password"); AdminAuthError ``login_failed``
        (403) otherwise.  Both are checked whatever the first answers, so timing does not tell which was tried."""
        if not isinstance(secret, str) or not secret or len(secret) > _MAX_SECRET:
            raise AdminAuthError("wrong admin token or operator password", forbidden=True, code=ErrorCode.LOGIN_FAILED)
        token_ok = hmac.compare_digest(secret.strip().encode("utf-8", "replace"), self.admin.value.encode("utf-8"))
        password_ok = False
        if self._password_hash is not None:
            try:
                password_ok = self._hasher.verify(self._password_hash, secret)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                password_ok = False
        if token_ok:
            return "admin_token"
        if password_ok:
            return "password"
        raise AdminAuthError("wrong admin token or operator password", forbidden=True, code=ErrorCode.LOGIN_FAILED)

    def open_session(self, method: str, remote: str | None) -> tuple[str, int]:
        """A new session id (for the cookie) and its lifetime in seconds."""
        session_id = secrets.token_urlsafe(32)
        self.store.add_operator_session(session_id, self.lifetime, method=method, remote_addr=remote)
        return session_id, int(self.lifetime.total_seconds())

    def session_of(self, request: Request) -> str | None:
        """The request's live operator session id, or None (no cookie, unknown, closed or expired)."""
        value = request.cookies.get(SESSION_COOKIE)
        if not value or len(value) > 256:
            return None
        return value if self.store.operator_session_valid(value) else None

    def close(self, session_id: str) -> None:
        self.store.close_operator_session(session_id)
