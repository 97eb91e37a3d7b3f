"""One exception hierarchy for the whole framework.

Every error carries a stable ``code`` (a short snake_case string) that the HTTP layer maps to a status
and that security events record as the reason.  Catch ``QflareError`` to catch everything we raise on
purpose; anything else escaping is a bug.
"""

from __future__ import annotations

__all__ = [
    "AdminAuthError",
    "ArchitectureMismatchError",
    "AuthError",
    "BadSignatureError",
    "ConfigError",
    "CryptoUnavailableError",
    "DataError",
    "DatasetMissingError",
    "MalformedError",
    "NonFiniteError",
    "NotFoundError",
    "OversizeError",
    "PolicyError",
    "ProtocolError",
    "QflareError",
    "RateLimitedError",
    "ReplayError",
    "RevokedError",
    "RoundError",
    "SessionExpiredError",
    "StaleModelError",
    "TokenError",
    "TrainingError",
    "UnknownDeviceError",
    "ValidationError",
    "WrongRoundError",
]


class QflareError(Exception):
    """Base of every error QFLARE raises deliberately."""

    code: str = "qflare_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(QflareError):
    code = "config_error"
    http_status = 400


class DataError(QflareError):
    code = "data_error"
    http_status = 400


class DatasetMissingError(DataError):
    code = "dataset_missing"


class ValidationError(QflareError):
    """An input (tensor, update, blob) is the wrong shape, dtype, size or value."""

    code = "validation_error"
    http_status = 422


class ArchitectureMismatchError(ValidationError):
    code = "architecture_mismatch"


class TrainingError(QflareError):
    code = "training_error"
    http_status = 500


class NonFiniteError(TrainingError):
    """Loss or weights became NaN/Inf: the update must never be sent."""

    code = "non_finite"


class ProtocolError(QflareError):
    """A protocol message was refused."""

    code = "protocol_error"
    http_status = 400


class MalformedError(ProtocolError):
    code = "malformed"


class OversizeError(ProtocolError):
    code = "oversized"
    http_status = 413


class AuthError(ProtocolError):
    code = "auth_error"
    http_status = 401


class UnknownDeviceError(AuthError):
    code = "unknown_device"


class RevokedError(AuthError):
    code = "revoked"
    http_status = 403


class BadSignatureError(AuthError):
    code = "bad_signature"


class TokenError(AuthError):
    code = "bad_token"


class ReplayError(ProtocolError):
    code = "replay"
    http_status = 409


class SessionExpiredError(AuthError):
    code = "session_expired"


class RoundError(ProtocolError):
    code = "round_error"
    http_status = 409


class WrongRoundError(RoundError):
    code = "wrong_round"


class StaleModelError(RoundError):
    code = "stale_model"


class PolicyError(ProtocolError):
    code = "policy_violation"
    http_status = 403


class RateLimitedError(ProtocolError):
    """Too many requests from one address or session; ``retry_after_s`` says when to try again."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class AdminAuthError(AuthError):
    """Missing (401) or wrong (403, ``forbidden=True``) administrator credentials."""

    code = "admin_required"

    def __init__(self, message: str, *, forbidden: bool = False, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.http_status = 403 if forbidden else 401


class NotFoundError(ProtocolError):
    """The named resource (device, route) does not exist."""

    code = "not_found"
    http_status = 404


class CryptoUnavailableError(QflareError):
    """A required primitive is missing from the linked OpenSSL: start-up must fail."""

    code = "crypto_unavailable"


def _all_subclasses(cls: type[QflareError]) -> list[type[QflareError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(code: str, message: str, status: int | None = None) -> QflareError:
    """Rebuild a typed error from its stable code (e.g. from an HTTP error body).

    The class whose default code matches is used; an unknown code becomes the class that the HTTP
    status maps to (falling back to :class:`ProtocolError`), carrying the code it came with.  When
    ``status`` is given the error carries it as ``http_status`` (e.g. ``admin_required`` is 401 or 403).
    """
    by_code = {c.code: c for c in _all_subclasses(QflareError)}
    cls = by_code.get(code)
    if cls is None:
        by_status: dict[int, type[QflareError]] = {}
        for c in _all_subclasses(ProtocolError):
            by_status.setdefault(c.http_status, c)
        cls = by_status.get(status or 0, ProtocolError)
    err = cls(message, code=code)
    if status is not None:
        err.http_status = status
    return err


__all__.append("error_from_code")
