"""One exception hierarchy and one closed vocabulary of error codes for the whole framework.

Every error carries a stable ``code``, a member of :class:`ErrorCode`.  The codes are the HTTP API's
contract (a refusal is answered with ``{"code", "message"}`` and the status of the error's class), the
reason recorded in security events, and what a device decides by: each code has a :class:`Retry`
meaning (``QflareError.retry``).  The table of codes in ``docs/protocol.md`` is generated from this
module (:func:`code_table_markdown`; ``python -m qflare.errors_table docs/protocol.md`` rewrites it).

Catch ``QflareError`` to catch everything we raise on purpose; anything else escaping is a bug.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

__all__ = [
    "CODE_TABLE_BEGIN",
    "CODE_TABLE_END",
    "AdminAuthError",
    "ArchitectureMismatchError",
    "AuthError",
    "BadSignatureError",
    "BlobNotFoundError",
    "CircuitOpenError",
    "CodeSpec",
    "ConfigError",
    "CoordinatorBusyError",
    "CryptoUnavailableError",
    "DataError",
    "DatasetMissingError",
    "DemoError",
    "ErrorCode",
    "FrontDoorError",
    "MalformedError",
    "NonFiniteError",
    "NotFoundError",
    "OversizeError",
    "PatienceExhaustedError",
    "PluginError",
    "PolicyError",
    "ProtocolError",
    "QflareError",
    "RateLimitedError",
    "ReplayError",
    "ResponseTooLargeError",
    "Retry",
    "RevokedError",
    "RoundError",
    "ServerUnavailableError",
    "SessionExpiredError",
    "StaleModelError",
    "StorageFullError",
    "TokenError",
    "TrainingError",
    "TransportError",
    "UnknownDeviceError",
    "ValidationError",
    "WrongRoundError",
    "code_spec",
    "code_table_markdown",
    "error_from_code",
]


class ErrorCode(enum.StrEnum):
    """Every code QFLARE raises or sends; :data:`CODE_SPECS` gives each its meaning."""

    # generic codes: the defaults of the classes, and what a peer's answer is rebuilt with
    QFLARE_ERROR = "qflare_error"
    CONFIG_ERROR = "config_error"
    DATA_ERROR = "data_error"
    VALIDATION_ERROR = "validation_error"
    TRAINING_ERROR = "training_error"
    PROTOCOL_ERROR = "protocol_error"
    AUTH_ERROR = "auth_error"
    ROUND_ERROR = "round_error"
    HTTP_ERROR = "http_error"
    UNKNOWN_REMOTE_CODE = "unknown_remote_code"
    # HTTP layer
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"
    DATABASE_UNAVAILABLE = "database_unavailable"
    RATE_LIMITED = "rate_limited"
    OVERSIZED = "oversized"
    BAD_CONTENT_LENGTH = "bad_content_length"
    CLIENT_DISCONNECTED = "client_disconnected"
    ADMIN_REQUIRED = "admin_required"
    # device-side transport
    TRANSPORT_ERROR = "transport_error"
    SERVER_UNAVAILABLE = "server_unavailable"
    CIRCUIT_OPEN = "circuit_open"
    # wire format, envelopes, channel
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    UNEXPECTED_MESSAGE = "unexpected_message"
    BAD_FIELD = "bad_field"
    BAD_SIGNATURE = "bad_signature"
    BAD_MAC = "bad_mac"
    REPLAY = "replay"
    WRONG_MSG_TYPE = "wrong_msg_type"
    COUNTER_EXHAUSTED = "counter_exhausted"
    PAYLOAD_MISMATCH = "payload_mismatch"
    # algorithms, suites, keys
    CRYPTO_UNAVAILABLE = "crypto_unavailable"
    UNKNOWN_ALGORITHM = "unknown_algorithm"
    UNKNOWN_SUITE = "unknown_suite"
    SUITE_UNSUPPORTED = "suite_unsupported"
    SUITE_MISMATCH = "suite_mismatch"
    POLICY_VIOLATION = "policy_violation"
    KEY_ALG_MISMATCH = "key_alg_mismatch"
    BAD_ARGUMENT = "bad_argument"
    BAD_CONTEXT = "bad_context"
    BAD_SEED = "bad_seed"
    BAD_ROLE = "bad_role"
    BAD_KEM_KEY = "bad_kem_key"
    BAD_KEM_SHARE = "bad_kem_share"
    BAD_TRANSCRIPT_HASH = "bad_transcript_hash"
    # key files and pinning
    KEY_FILE_EXISTS = "key_file_exists"
    KEY_FILE_MISSING = "key_file_missing"
    KEY_FILE_UNREADABLE = "key_file_unreadable"
    INSECURE_KEY_FILE = "insecure_key_file"
    KEY_NOT_ENCRYPTED = "key_not_encrypted"
    PASSPHRASE_REQUIRED = "passphrase_required"
    BAD_PASSPHRASE = "bad_passphrase"
    WRONG_KEY_TYPE = "wrong_key_type"
    BAD_KEY_FILE = "bad_key_file"
    BAD_KEY_ID = "bad_key_id"
    NO_SERVER_KEY = "no_server_key"
    SERVER_KEY_MISMATCH = "server_key_mismatch"
    # enrollment and devices
    BAD_TOKEN = "bad_token"
    TOKEN_UNKNOWN = "token_unknown"
    TOKEN_USED = "token_used"
    TOKEN_EXPIRED = "token_expired"
    STALE_REQUEST = "stale_request"
    DEVICE_EXISTS = "device_exists"
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    REVOKED = "revoked"
    NOT_ENROLLED = "not_enrolled"
    ENROLLMENT_MISMATCH = "enrollment_mismatch"
    # handshake and sessions
    BAD_STATE = "bad_state"
    UNKNOWN_HANDSHAKE = "unknown_handshake"
    HANDSHAKE_EXPIRED = "handshake_expired"
    TRANSCRIPT_MISMATCH = "transcript_mismatch"
    KEY_ID_MISMATCH = "key_id_mismatch"
    SESSION_EXPIRED = "session_expired"
    SESSION_CLOSED = "session_closed"
    SESSION_EXISTS = "session_exists"
    SESSION_MISMATCH = "session_mismatch"
    UNKNOWN_SESSION = "unknown_session"
    # rounds and models
    WRONG_ROUND = "wrong_round"
    STALE_MODEL = "stale_model"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_VERSION_EXISTS = "model_version_exists"
    NOT_SELECTED = "not_selected"
    DEADLINE_PASSED = "deadline_passed"
    DUPLICATE_SUBMISSION = "duplicate_submission"
    BAD_RECEIPT = "bad_receipt"
    NO_DEVICES = "no_devices"
    ROUND_OPEN = "round_open"
    ROUND_CLOSED = "round_closed"
    ROUND_NOT_OPEN = "round_not_open"
    ROUND_EXISTS = "round_exists"
    ROUND_IN_PROGRESS = "round_in_progress"
    ROUND_NUMBER_NOT_INCREASING = "round_number_not_increasing"
    ROUND_STATE_CONFLICT = "round_state_conflict"
    BAD_TRANSITION = "bad_transition"
    # updates, tensors and blobs
    ARCHITECTURE_MISMATCH = "architecture_mismatch"
    NON_FINITE = "non_finite"
    BAD_SHAPE = "bad_shape"
    BAD_WEIGHT = "bad_weight"
    BAD_EXAMPLE_COUNT = "bad_example_count"
    NORM_EXCEEDED = "norm_exceeded"
    DUPLICATE_UPDATE = "duplicate_update"
    NO_UPDATES = "no_updates"
    TOO_FEW_UPDATES = "too_few_updates"
    MALFORMED_BLOB = "malformed_blob"
    UNSUPPORTED_FORMAT = "unsupported_format"
    WRONG_KIND = "wrong_kind"
    HASH_MISMATCH = "hash_mismatch"
    BAD_DIGEST = "bad_digest"
    BLOB_MISSING = "blob_missing"
    BLOB_CORRUPT = "blob_corrupt"
    # storage and operations
    BAD_JSON = "bad_json"
    LEDGER_CONFLICT = "ledger_conflict"
    DATASET_MISSING = "dataset_missing"
    BAD_DURATION = "bad_duration"
    BAD_INDEX = "bad_index"
    DEMO_FAILED = "demo_failed"
    DUPLICATE_NAME = "duplicate_name"
    BAD_SELECTION = "bad_selection"
    PLUGIN_ERROR = "plugin_error"
    BAD_FEDERATION_FILE = "bad_federation_file"
    SERVER_EXITED = "server_exited"
    SERVER_NOT_READY = "server_not_ready"
    # hardening: device
    MODEL_ROLLBACK = "model_rollback"
    BAD_TASK = "bad_task"
    RESPONSE_TOO_LARGE = "response_too_large"
    INCOMPATIBLE_MODEL = "incompatible_model"
    PATIENCE_EXHAUSTED = "patience_exhausted"
    # hardening: storage and rounds
    STORAGE_FULL = "storage_full"
    # hardening: enrollment and handshakes
    COORDINATOR_BUSY = "coordinator_busy"
    # hardening: http gate
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    LENGTH_REQUIRED = "length_required"
    SLOW_BODY = "slow_body"
    # hardening: aggregation
    AGGREGATE_NON_FINITE = "aggregate_non_finite"
    AGGREGATE_OUT_OF_BOUNDS = "aggregate_out_of_bounds"
    ALL_ROUNDS_FAILED = "all_rounds_failed"
    # coordinator key rotation and revocation
    BAD_ROTATION_RECORD = "bad_rotation_record"
    BAD_ROTATION_SIGNATURE = "bad_rotation_signature"
    ROTATION_CHAIN_BROKEN = "rotation_chain_broken"
    COORDINATOR_KEY_REVOKED = "coordinator_key_revoked"
    ROTATION_INCOMPLETE = "rotation_incomplete"
    # provenance ledger
    LEDGER_INVALID = "ledger_invalid"
    # a device's configuration and its own data
    BAD_SERVER_URL = "bad_server_url"
    TLS_ERROR = "tls_error"
    MODEL_MISMATCH = "model_mismatch"
    ARCH_MISMATCH = "arch_mismatch"
    BAD_LOCAL_DATA = "bad_local_data"
    # user paths and model files
    BAD_PATH = "bad_path"
    BAD_MODEL_FILE = "bad_model_file"
    # receipts with inclusion proofs
    ROUND_NOT_CLOSED = "round_not_closed"
    NO_LEDGER_ENTRY = "no_ledger_entry"
    BAD_INCLUSION_PROOF = "bad_inclusion_proof"
    # robust aggregation and attack simulation
    NO_ROOT_DATA = "no_root_data"
    NO_TRUSTED_UPDATES = "no_trusted_updates"
    BAD_ATTACK = "bad_attack"
    # adaptive threat detection
    QUARANTINED = "quarantined"
    TOKEN_REVOKED = "token_revoked"
    LOGIN_FAILED = "login_failed"
    CSRF_FAILED = "csrf_failed"
    # secure aggregation (qflare/secagg)
    SECAGG_ABORTED = "secagg_aborted"
    UNMASK_REFUSED = "unmask_refused"
    BAD_SHARE = "bad_share"
    # simulation backends
    DEVICE_HOST_FAILED = "device_host_failed"
    SECAGG_MISMATCH = "secagg_mismatch"
    # blob store backends (qflare/storage/blob_backend.py)
    STORAGE_UNAVAILABLE = "storage_unavailable"


class Retry(enum.Enum):
    """What a device does about an error (``QflareError.retry``)."""

    FATAL = "fatal"
    """Retrying cannot fix it: the device process stops and reports it."""
    TRANSIENT = "transient"
    """The coordinator is unreachable or busy: wait, then retry the same thing."""
    RENEW_SESSION = "renew_session"
    """The request was refused: run the handshake again and retry (a bounded number of times)."""
    DROP_UPDATE = "drop_update"
    """The pending update can no longer be accepted: discard it, renew the session, poll again."""
    SKIP_ROUND = "skip_round"
    """Local training produced an update that must never be sent: discard it and sit the round out."""


class QflareError(Exception):
    """Base of every error QFLARE raises deliberately.

    ``code`` may be given as an :class:`ErrorCode` or its string value; a string that is not a member
    raises ``ValueError`` (a typo at a raise site fails at once, not on the wire)."""

    code: ErrorCode = ErrorCode.QFLARE_ERROR
    http_status: int = 500
    device_id: str | None = None
    """The enrolled device the refusal concerns, where the raiser knows it (recorded with the event)."""
    unauthenticated: bool = False
    """True for an error rebuilt from a plain HTTP error body: anything on the path can send one, so a
    device never lets it stop the process (see ``docs/protocol.md`` section 15)."""
    default_retry: ClassVar[Retry] = Retry.FATAL
    """The retry meaning of the codes whose spec leaves it to the class (the generic remote codes)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = ErrorCode(cls.code)

    def __init__(self, message: str, *, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def retry(self) -> Retry:
        """What a device does about this error (see :class:`Retry`)."""
        retry = CODE_SPECS[self.code].retry
        return self.default_retry if retry is None else retry


class ConfigError(QflareError):
    code = ErrorCode.CONFIG_ERROR
    http_status = 400


class DataError(QflareError):
    code = ErrorCode.DATA_ERROR
    http_status = 400


class DatasetMissingError(DataError):
    code = ErrorCode.DATASET_MISSING


class ValidationError(QflareError):
    """An input (tensor, update, blob) is the wrong shape, dtype, size or value."""

    code = ErrorCode.VALIDATION_ERROR
    http_status = 422
    default_retry = Retry.RENEW_SESSION


class ArchitectureMismatchError(ValidationError):
    code = ErrorCode.ARCHITECTURE_MISMATCH


class BlobNotFoundError(ValidationError):
    """No blob with that digest is stored."""

    code = ErrorCode.BLOB_MISSING
    http_status = 404


class TrainingError(QflareError):
    code = ErrorCode.TRAINING_ERROR
    http_status = 500


class NonFiniteError(TrainingError):
    """Loss or weights became NaN/Inf: the update must never be sent."""

    code = ErrorCode.NON_FINITE


class ProtocolError(QflareError):
    """A protocol message was refused."""

    code = ErrorCode.PROTOCOL_ERROR
    http_status = 400
    default_retry = Retry.RENEW_SESSION


class MalformedError(ProtocolError):
    code = ErrorCode.MALFORMED


class OversizeError(ProtocolError):
    code = ErrorCode.OVERSIZED
    http_status = 413


class AuthError(ProtocolError):
    code = ErrorCode.AUTH_ERROR
    http_status = 401


class UnknownDeviceError(AuthError):
    code = ErrorCode.UNKNOWN_DEVICE


class RevokedError(AuthError):
    code = ErrorCode.REVOKED
    http_status = 403


class BadSignatureError(AuthError):
    """A signature does not verify under the key it is checked with (always code ``bad_signature``)."""

    code = ErrorCode.BAD_SIGNATURE


class TokenError(AuthError):
    code = ErrorCode.BAD_TOKEN


class ReplayError(ProtocolError):
    code = ErrorCode.REPLAY
    http_status = 409


class SessionExpiredError(AuthError):
    code = ErrorCode.SESSION_EXPIRED


class RoundError(ProtocolError):
    code = ErrorCode.ROUND_ERROR
    http_status = 409


class WrongRoundError(RoundError):
    code = ErrorCode.WRONG_ROUND


class StaleModelError(RoundError):
    code = ErrorCode.STALE_MODEL


class PolicyError(ProtocolError):
    code = ErrorCode.POLICY_VIOLATION
    http_status = 403


class RateLimitedError(ProtocolError):
    """Too many requests from one address or session; ``retry_after_s`` says when to try again."""

    code = ErrorCode.RATE_LIMITED
    http_status = 429
    default_retry = Retry.TRANSIENT

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: ErrorCode | str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class StorageFullError(ProtocolError):
    """The coordinator cannot write its blobs or database (disk full or failing; code ``storage_unavailable``:
    its S3 blob store cannot be reached or refused the request): nothing was stored; retry after
    ``retry_after_s`` (answered as 503 with ``Retry-After``)."""

    code = ErrorCode.STORAGE_FULL
    http_status = 503
    default_retry = Retry.TRANSIENT

    def __init__(self, message: str, *, retry_after_s: float = 30.0, code: ErrorCode | str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class CoordinatorBusyError(RateLimitedError):
    """The coordinator's budget for expensive public-key work (signatures, encapsulations) is spent for
    now; ``retry_after_s`` says when it will have room.  503: the refusal is about the server's load,
    not about the caller's own request rate."""

    code = ErrorCode.COORDINATOR_BUSY
    http_status = 503


class AdminAuthError(AuthError):
    """Missing (401) or wrong (403, ``forbidden=True``) administrator credentials."""

    code = ErrorCode.ADMIN_REQUIRED

    def __init__(self, message: str, *, forbidden: bool = False, code: ErrorCode | str | None = None) -> None:
        super().__init__(message, code=code)
        self.http_status = 403 if forbidden else 401


class NotFoundError(ProtocolError):
    """The named resource (device, route) does not exist."""

    code = ErrorCode.NOT_FOUND
    http_status = 404


class CryptoUnavailableError(QflareError):
    """A required primitive is missing from the linked OpenSSL: start-up must fail."""

    code = ErrorCode.CRYPTO_UNAVAILABLE


class TransportError(QflareError):
    """The request did not get an answer from the coordinator (nothing was refused)."""

    code = ErrorCode.TRANSPORT_ERROR
    http_status = 503
    default_retry = Retry.TRANSIENT


class ServerUnavailableError(TransportError):
    """Connection errors, timeouts or 5xx gateway answers outlasted the retry policy."""

    code = ErrorCode.SERVER_UNAVAILABLE
    retry_after_s: float | None = None
    """The (capped) ``Retry-After`` of the last answer, when it had one (a busy or full coordinator)."""


class ResponseTooLargeError(TransportError):
    """An answer is larger than its route can legitimately be: refused unread beyond the limit."""

    code = ErrorCode.RESPONSE_TOO_LARGE


class PatienceExhaustedError(QflareError):
    """A device saw only failures for longer than its patience and stopped."""

    code = ErrorCode.PATIENCE_EXHAUSTED


class CircuitOpenError(TransportError):
    """The circuit breaker is open: calls fail fast until ``retry_in_s`` has passed."""

    code = ErrorCode.CIRCUIT_OPEN

    def __init__(self, message: str, *, retry_in_s: float = 1.0, code: ErrorCode | str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_in_s = retry_in_s


class FrontDoorError(ProtocolError):
    """A request the HTTP layer refuses from its headers or its transfer before the coordinator sees it.

    The status is the code's (``CODE_SPECS[code].status``): 415 wrong Content-Type, 411 no Content-Length,
    408 a body that arrives too slowly."""

    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE
    http_status = 415

    def __init__(self, message: str, *, code: ErrorCode | str | None = None) -> None:
        super().__init__(message, code=code)
        status = CODE_SPECS[self.code].status
        if status is not None:
            self.http_status = status


class DemoError(QflareError):
    """``qflare demo`` could not start or finish its federation of processes."""

    code = ErrorCode.DEMO_FAILED


class PluginError(ConfigError):
    """A plugin (entry point of group ``qflare.plugins``) could not be imported or failed to register."""

    code = ErrorCode.PLUGIN_ERROR


@dataclass(frozen=True)
class CodeSpec:
    """What one :class:`ErrorCode` means."""

    meaning: str
    classes: tuple[type[QflareError], ...]
    """The classes raised with this code; the first is the one :func:`error_from_code` rebuilds.  Empty
    for the generic remote codes, which take the class of their HTTP status."""
    retry: Retry | None
    """None: the error class's ``default_retry``."""
    status: int | None = None
    """The HTTP status when the classes' own statuses do not say it (codes built by the HTTP layer)."""

    @property
    def statuses(self) -> tuple[int, ...]:
        if self.status is not None:
            return (self.status,)
        found = {c.http_status for c in self.classes}
        if AdminAuthError in self.classes:
            found.add(403)
        return tuple(sorted(found))


_F, _T, _R, _D, _S = Retry.FATAL, Retry.TRANSIENT, Retry.RENEW_SESSION, Retry.DROP_UPDATE, Retry.SKIP_ROUND
_C = ErrorCode


def _spec(meaning: str, retry: Retry | None, *classes: type[QflareError], status: int | None = None) -> CodeSpec:
    return CodeSpec(meaning, classes, retry, status)


CODE_SPECS: Mapping[ErrorCode, CodeSpec] = MappingProxyType(
    {
        # generic
        _C.QFLARE_ERROR: _spec("an error without a more specific code", _F, QflareError),
        _C.CONFIG_ERROR: _spec("invalid configuration or arguments", _F, ConfigError, DemoError),
        _C.DATA_ERROR: _spec("a dataset or partition could not be built", _F, DataError),
        _C.VALIDATION_ERROR: _spec("a request or input failed validation", _R, ValidationError),
        _C.TRAINING_ERROR: _spec("local training failed", _F, TrainingError),
        _C.PROTOCOL_ERROR: _spec("a protocol message was refused", _R, ProtocolError),
        _C.AUTH_ERROR: _spec("authentication failed", _R, AuthError),
        _C.ROUND_ERROR: _spec("the request does not fit the round's state", _D, RoundError),
        _C.HTTP_ERROR: _spec("an HTTP error answer without a QFLARE code (its status decides the class)", None),
        _C.UNKNOWN_REMOTE_CODE: _spec(
            "a peer answered with a code outside this vocabulary (kept in the message; its status decides)", None
        ),
        # HTTP layer
        _C.NOT_FOUND: _spec("no such route or resource", _R, NotFoundError),
        _C.METHOD_NOT_ALLOWED: _spec("the route does not take this HTTP method", _F, ProtocolError, status=405),
        _C.INTERNAL_ERROR: _spec("the coordinator failed unexpectedly (a bug)", _R, ProtocolError, status=500),
        _C.DATABASE_UNAVAILABLE: _spec("the coordinator's database is unavailable", _T, ServerUnavailableError),
        _C.RATE_LIMITED: _spec("too many requests; Retry-After says when to try again", _T, RateLimitedError),
        _C.OVERSIZED: _spec("a body, envelope or frame exceeds its size limit", _R, OversizeError),
        _C.BAD_CONTENT_LENGTH: _spec("Content-Length is not a non-negative integer", _R, MalformedError),
        _C.CLIENT_DISCONNECTED: _spec("the client went away before sending the whole body", _R, MalformedError),
        _C.ADMIN_REQUIRED: _spec("missing (401) or wrong (403) administrator credentials", _F, AdminAuthError),
        # device-side transport
        _C.TRANSPORT_ERROR: _spec("the request got no usable answer from the coordinator", _T, TransportError),
        _C.SERVER_UNAVAILABLE: _spec(
            "connection errors, timeouts or gateway errors outlasted the retry policy", _T, ServerUnavailableError
        ),
        _C.CIRCUIT_OPEN: _spec("the circuit breaker is open after repeated failures", _T, CircuitOpenError),
        # wire format, envelopes, channel
        _C.MALFORMED: _spec("bytes that do not parse as what they claim to be", _R, MalformedError),
        _C.TRUNCATED: _spec("a message or field ends early", _R, MalformedError),
        _C.UNEXPECTED_MESSAGE: _spec("an envelope of another message type than expected", _R, MalformedError),
        _C.BAD_FIELD: _spec("an envelope field cannot be encoded (local misuse)", _F, ConfigError),
        _C.BAD_SIGNATURE: _spec("a signature does not verify under the key it is checked with", _R, BadSignatureError),
        _C.BAD_MAC: _spec("a sealed frame failed AEAD authentication", _R, AuthError),
        _C.REPLAY: _spec(
            "a frame counter was not above the last accepted one, or a client hello was seen before", _R, ReplayError
        ),
        _C.WRONG_MSG_TYPE: _spec("a sealed frame is bound to another message type", _R, AuthError),
        _C.COUNTER_EXHAUSTED: _spec("the session's send counter is used up", _R, SessionExpiredError),
        _C.PAYLOAD_MISMATCH: _spec("a signed payload's length differs from its signed size", _R, ValidationError),
        # algorithms, suites, keys
        _C.CRYPTO_UNAVAILABLE: _spec("the linked OpenSSL lacks a required primitive", _F, CryptoUnavailableError),
        _C.UNKNOWN_ALGORITHM: _spec("an algorithm or suite version this build does not know", _F, ConfigError),
        _C.UNKNOWN_SUITE: _spec("a suite name is not one this program knows", _F, ConfigError),
        _C.SUITE_UNSUPPORTED: _spec("the coordinator's policy refuses the offered suite", _F, PolicyError),
        _C.SUITE_MISMATCH: _spec(
            "a message (or a coordinator) uses another suite than the session's (or the federation spec's)",
            _R,
            PolicyError,
            ConfigError,
        ),
        _C.POLICY_VIOLATION: _spec("a suite or request breaks the security policy", _F, PolicyError),
        _C.KEY_ALG_MISMATCH: _spec("a key's algorithm is not the suite's", _F, ConfigError, PolicyError),
        _C.BAD_ARGUMENT: _spec("a cryptographic primitive got an invalid argument (local misuse)", _F, ConfigError),
        _C.BAD_CONTEXT: _spec("a signature context is empty or too long", _F, ConfigError),
        _C.BAD_SEED: _spec("a deterministic key seed is invalid", _F, ConfigError),
        _C.BAD_ROLE: _spec("a key schedule role is neither client nor server", _F, ConfigError),
        _C.BAD_KEM_KEY: _spec("the KEM key pair does not match the suite", _F, ConfigError),
        _C.BAD_KEM_SHARE: _spec("a peer's X25519 share is a low-order point", _R, MalformedError),
        _C.BAD_TRANSCRIPT_HASH: _spec("a transcript hash is not 32 bytes", _F, ConfigError),
        # key files and pinning
        _C.KEY_FILE_EXISTS: _spec("a key file would be overwritten", _F, ConfigError),
        _C.KEY_FILE_MISSING: _spec("a key file does not exist", _F, ConfigError),
        _C.KEY_FILE_UNREADABLE: _spec("a key file cannot be opened", _F, ConfigError),
        _C.INSECURE_KEY_FILE: _spec("a key file is not a private (0600) regular file", _F, ConfigError),
        _C.KEY_NOT_ENCRYPTED: _spec("a passphrase was given for an unencrypted key file", _F, ConfigError),
        _C.PASSPHRASE_REQUIRED: _spec("an encrypted key file needs a passphrase", _F, AuthError, ConfigError),
        _C.BAD_PASSPHRASE: _spec("the key file passphrase is empty or wrong", _F, AuthError, ConfigError),
        _C.WRONG_KEY_TYPE: _spec("a key file holds a key of another algorithm", _F, ConfigError),
        _C.BAD_KEY_FILE: _spec("a coordinator key file is unreadable or not hex", _F, ConfigError),
        _C.BAD_KEY_ID: _spec("a coordinator key id is not 64 hex digits", _F, ConfigError),
        _C.NO_SERVER_KEY: _spec("no coordinator key is pinned", _F, ConfigError),
        _C.SERVER_KEY_MISMATCH: _spec("the coordinator's key is not the pinned one", _F, AuthError),
        # enrollment and devices
        _C.BAD_TOKEN: _spec("the enrollment token is not valid", _F, TokenError),
        _C.TOKEN_UNKNOWN: _spec("no such enrollment token", _F, TokenError),
        _C.TOKEN_USED: _spec("the enrollment token was already used", _F, TokenError),
        _C.TOKEN_EXPIRED: _spec("the enrollment token has expired", _F, TokenError),
        _C.STALE_REQUEST: _spec("an enrollment request's or client hello's timestamp is too far off", _R, AuthError),
        _C.DEVICE_EXISTS: _spec("the device is already enrolled", _F, ReplayError),
        _C.DEVICE_ID_MISMATCH: _spec("a device id is not the key id of its key", _F, AuthError, ValidationError),
        _C.DEVICE_MISMATCH: _spec("a message names another device than the session's", _F, AuthError),
        _C.UNKNOWN_DEVICE: _spec("no such enrolled device", _F, UnknownDeviceError, NotFoundError),
        _C.REVOKED: _spec("the device has been revoked", _F, RevokedError),
        _C.NOT_ENROLLED: _spec("the device has no enrollment record and no token", _F, ConfigError),
        _C.ENROLLMENT_MISMATCH: _spec(
            "the stored enrollment record is not for this device or coordinator", _F, AuthError
        ),
        # handshake and sessions
        _C.BAD_STATE: _spec("a handshake step was called out of order", _R, ProtocolError),
        _C.UNKNOWN_HANDSHAKE: _spec("no handshake is in progress for this server hello", _R, AuthError),
        _C.HANDSHAKE_EXPIRED: _spec("the handshake took too long", _R, SessionExpiredError),
        _C.TRANSCRIPT_MISMATCH: _spec("a handshake message signs a different transcript", _R, AuthError),
        _C.KEY_ID_MISMATCH: _spec("the device resolver returned a key with another key id", _R, AuthError),
        _C.SESSION_EXPIRED: _spec("the session has expired: handshake again", _R, SessionExpiredError),
        _C.SESSION_CLOSED: _spec("the session was closed: handshake again", _R, SessionExpiredError),
        _C.SESSION_EXISTS: _spec("a session with this id already exists", _R, ReplayError),
        _C.SESSION_MISMATCH: _spec("the coordinator confirmed another session id", _R, AuthError),
        _C.UNKNOWN_SESSION: _spec("no such open session: handshake again", _R, AuthError, SessionExpiredError),
        # rounds and models
        _C.WRONG_ROUND: _spec("the message is for another round than the open one", _D, WrongRoundError, AuthError),
        _C.STALE_MODEL: _spec("the update or model is for another model version", _D, StaleModelError),
        _C.UNKNOWN_MODEL: _spec("no such model version", _D, StaleModelError),
        _C.MODEL_VERSION_EXISTS: _spec("the model version is already stored", _R, ReplayError),
        _C.NOT_SELECTED: _spec("the device was not selected for the round", _D, RoundError, PolicyError),
        _C.DEADLINE_PASSED: _spec("the round's deadline has passed", _D, RoundError),
        _C.DUPLICATE_SUBMISSION: _spec(
            "a different update of this device was already accepted for the round", _D, ValidationError, ReplayError
        ),
        _C.BAD_RECEIPT: _spec("a receipt does not acknowledge the update sent", _R, AuthError, RoundError),
        _C.NO_DEVICES: _spec("no active devices to select for a round", _R, RoundError),
        _C.ROUND_OPEN: _spec("a round is still open", _R, RoundError),
        _C.ROUND_CLOSED: _spec("the round is already finished", _D, RoundError),
        _C.ROUND_NOT_OPEN: _spec("the round is not open for updates", _D, RoundError),
        _C.ROUND_EXISTS: _spec("the round number is already taken", _R, RoundError),
        _C.ROUND_IN_PROGRESS: _spec("another round is in progress", _R, RoundError),
        _C.ROUND_NUMBER_NOT_INCREASING: _spec("a new round's number is not above the last", _R, RoundError),
        _C.ROUND_STATE_CONFLICT: _spec("the round changed state concurrently", _R, RoundError),
        _C.BAD_TRANSITION: _spec("an illegal round state transition", _R, RoundError),
        # updates, tensors and blobs
        _C.ARCHITECTURE_MISMATCH: _spec(
            "the model layout differs from the coordinator's", _F, ArchitectureMismatchError
        ),
        _C.NON_FINITE: _spec("a loss, weight or delta is NaN or Inf", _S, NonFiniteError, ValidationError),
        _C.BAD_SHAPE: _spec("a tensor has the wrong shape or dtype", _R, ValidationError),
        _C.BAD_WEIGHT: _spec("an update weight is not positive and finite", _R, ValidationError),
        _C.BAD_EXAMPLE_COUNT: _spec("an update's example count is out of range", _R, ValidationError),
        _C.NORM_EXCEEDED: _spec("an update's norm exceeds the configured bound", _R, ValidationError),
        _C.DUPLICATE_UPDATE: _spec("the device already contributed to the round", _D, ValidationError),
        _C.NO_UPDATES: _spec("a round has no updates to aggregate", _R, ValidationError),
        _C.TOO_FEW_UPDATES: _spec(
            "too few updates for the robust aggregator (or configured rounds too small for it)",
            _R,
            ValidationError,
            ConfigError,
        ),
        _C.MALFORMED_BLOB: _spec("a tensor blob does not parse", _R, ValidationError),
        _C.UNSUPPORTED_FORMAT: _spec("a blob's format version is not supported", _R, ValidationError),
        _C.WRONG_KIND: _spec("a blob of another kind (model/update) than expected", _R, ValidationError),
        _C.HASH_MISMATCH: _spec("content does not hash to its expected digest", _R, ValidationError),
        _C.BAD_DIGEST: _spec("a blob digest is not 64 hex characters", _R, ValidationError),
        _C.BLOB_MISSING: _spec("no blob with that digest is stored", _R, BlobNotFoundError),
        _C.BLOB_CORRUPT: _spec("a stored blob no longer matches its digest", _R, ValidationError),
        # storage and operations
        _C.BAD_JSON: _spec("a stored JSON value is not a strict JSON object", _R, ValidationError),
        _C.LEDGER_CONFLICT: _spec("the audit ledger head moved concurrently", _R, ReplayError),
        _C.DATASET_MISSING: _spec("a dataset's files are not present", _F, DatasetMissingError),
        _C.BAD_DURATION: _spec("a duration argument does not parse or is not positive", _F, ConfigError),
        _C.BAD_INDEX: _spec("a device index is out of range", _F, ConfigError),
        _C.DEMO_FAILED: _spec("the demo federation failed to start or finish", _F, DemoError),
        _C.BAD_FEDERATION_FILE: _spec("a federation spec file cannot be read or is not a valid spec", _F, ConfigError),
        _C.SERVER_EXITED: _spec("a launched server process exited before it was ready", _F, QflareError),
        _C.SERVER_NOT_READY: _spec("a launched server process did not become ready in time", _F, QflareError),
        # extension
        _C.DUPLICATE_NAME: _spec("a model, strategy, data set or selector name is already registered", _F, ConfigError),
        _C.BAD_SELECTION: _spec(
            "a client selector returned something other than k distinct candidates", _R, RoundError
        ),
        _C.PLUGIN_ERROR: _spec("a plugin could not be imported or its registration failed", _F, PluginError),
        # hardening: device
        _C.MODEL_ROLLBACK: _spec(
            "the coordinator offered a model version or round older than one the device already accepted",
            _D,
            StaleModelError,
        ),
        _C.BAD_TASK: _spec("a task message holds a value out of range (a bad coordinator answer)", _R, MalformedError),
        _C.RESPONSE_TOO_LARGE: _spec(
            "an answer exceeds the size its route can have; refused without reading the rest",
            _T,
            ResponseTooLargeError,
        ),
        _C.INCOMPATIBLE_MODEL: _spec(
            "a validly signed global model does not fit this device's model layout: the round is sat out",
            _S,
            ArchitectureMismatchError,
        ),
        _C.PATIENCE_EXHAUSTED: _spec(
            "the device saw only failures for longer than its patience and stopped", _F, PatienceExhaustedError
        ),
        # hardening: storage and rounds
        _C.STORAGE_FULL: _spec(
            "the coordinator's storage cannot be written (disk full or failing); nothing was stored: wait and retry",
            _T,
            StorageFullError,
        ),
        # hardening: enrollment and handshakes
        _C.COORDINATOR_BUSY: _spec(
            "the coordinator's budget for signatures and key encapsulations is spent; Retry-After says when",
            _T,
            CoordinatorBusyError,
        ),
        # hardening: http gate
        _C.UNSUPPORTED_MEDIA_TYPE: _spec(
            "the request's Content-Type is not the route's (protocol: application/octet-stream; admin: JSON)",
            _F,
            FrontDoorError,
            status=415,
        ),
        _C.LENGTH_REQUIRED: _spec("an update upload must declare its Content-Length", _F, FrontDoorError, status=411),
        _C.SLOW_BODY: _spec(
            "the request body arrived slower than the minimum transfer rate; the connection is closed",
            _T,
            FrontDoorError,
            status=408,
        ),
        # hardening: aggregation
        _C.AGGREGATE_NON_FINITE: _spec(
            "the aggregated model has a NaN or Inf weight: the round fails, the previous model stays",
            _D,
            ValidationError,
        ),
        _C.AGGREGATE_OUT_OF_BOUNDS: _spec(
            "a weight of the aggregated model exceeds the configured bound: the round fails, the previous model stays",
            _D,
            ValidationError,
        ),
        _C.ALL_ROUNDS_FAILED: _spec(
            "every round of a run failed: no model was published (the CLI exits non-zero)", _F, RoundError, DemoError
        ),
        # coordinator key rotation and revocation
        _C.BAD_ROTATION_RECORD: _spec(
            "a key rotation or revocation record (or the list or file holding them) does not parse, or the "
            "chain is full",
            _F,
            MalformedError,
            ConfigError,
        ),
        _C.BAD_ROTATION_SIGNATURE: _spec(
            "a key rotation is not signed by both its old and its new key, or a revocation not by the current key",
            _F,
            BadSignatureError,
        ),
        _C.ROTATION_CHAIN_BROKEN: _spec(
            "the rotation records do not chain (sequence, previous hash, old key = previous new key) from the "
            "pinned key to the key the coordinator serves",
            _F,
            AuthError,
        ),
        _C.COORDINATOR_KEY_REVOKED: _spec(
            "a coordinator key recorded as revoked is used after its revocation", _F, AuthError
        ),
        _C.ROTATION_INCOMPLETE: _spec(
            "the data directory's coordinator key and its rotation log disagree (an interrupted rotate-key)",
            _F,
            ConfigError,
        ),
        # provenance ledger
        _C.LEDGER_INVALID: _spec(
            "a provenance ledger export fails offline verification (the message names the first bad entry)",
            _F,
            ValidationError,
        ),
        # a device's configuration and its own data
        _C.BAD_SERVER_URL: _spec(
            "the coordinator URL is not an http(s) URL with a host, or answers as no QFLARE coordinator does",
            _F,
            ConfigError,
        ),
        _C.TLS_ERROR: _spec(
            "TLS failed in a way retrying cannot heal (https against plain HTTP, an untrusted certificate)",
            _F,
            TransportError,
        ),
        _C.MODEL_MISMATCH: _spec("the device was given another model than the coordinator runs", _F, ConfigError),
        _C.ARCH_MISMATCH: _spec(
            "the device's model has the coordinator's name but another architecture fingerprint", _F, ConfigError
        ),
        _C.BAD_LOCAL_DATA: _spec(
            "a device's own data file or folder is unreadable, hostile or does not fit the model", _F, DataError
        ),
        _C.BAD_PATH: _spec(
            "a path given on the command line cannot be used (not writable, parent is a file, ...)", _F, ConfigError
        ),
        _C.BAD_MODEL_FILE: _spec(
            "a model file is unreadable, malformed, or names a model this installation does not have",
            _F,
            ValidationError,
        ),
        # receipts with inclusion proofs
        _C.ROUND_NOT_CLOSED: _spec(
            "a receipt proof was asked for a round that has not closed or failed yet: ask again once it has",
            _T,
            RoundError,
        ),
        _C.NO_LEDGER_ENTRY: _spec(
            "the round has no provenance ledger entry (it closed before the ledger existed): no proof exists",
            _F,
            NotFoundError,
        ),
        _C.BAD_INCLUSION_PROOF: _spec(
            "a receipt proof does not verify: not signed by the pinned (or a followed, unrevoked) coordinator key, "
            "for another round, or the device's update is neither proven in updates_root nor listed as left out",
            _F,
            AuthError,
        ),
        _C.NO_ROOT_DATA: _spec(
            "the aggregator (FLTrust) needs server-side root data that this coordinator does not have", _F, ConfigError
        ),
        _C.NO_TRUSTED_UPDATES: _spec(
            "FLTrust gave every update of the round a trust score of 0; the round is not aggregated",
            _R,
            ValidationError,
        ),
        _C.BAD_ATTACK: _spec("a simulated attack's options are invalid or do not fit the federation", _F, ConfigError),
        _C.QUARANTINED: _spec(
            "the device is quarantined (its updates are not taken, it is not selected) until an operator reinstates it",
            _D,
            PolicyError,
        ),
        _C.TOKEN_REVOKED: _spec("the enrollment token was revoked by an operator before it was used", _F, TokenError),
        _C.LOGIN_FAILED: _spec(
            "a dashboard login presented a wrong admin token or operator password (recorded; rate-limited per address)",
            _F,
            AdminAuthError,
        ),
        _C.CSRF_FAILED: _spec(
            "a state-changing dashboard request lacked its session's CSRF token (or sent a wrong one); nothing changed",
            _F,
            AdminAuthError,
        ),
        _C.SECAGG_ABORTED: _spec(
            "a secure-aggregation round cannot complete: fewer devices or shares remain than its threshold "
            "(no aggregate is produced)",
            _S,
            RoundError,
        ),
        _C.UNMASK_REFUSED: _spec(
            "a device refuses an unmask request that asks for both kinds of share of one peer, that contradicts "
            "what it saw in the round, that names a survivor set it did not sign, or that comes without a quorum "
            "of consistency signatures on that set (or a second survivor set to sign)",
            _D,
            ProtocolError,
        ),
        _C.BAD_SHARE: _spec(
            "a secret share does not match the commitment its dealer signed, or cannot be decoded",
            _R,
            AuthError,
            MalformedError,
        ),
        _C.DEVICE_HOST_FAILED: _spec(
            "a simulation's device host (a Ray actor) died or failed outside the protocol; the run stops",
            _F,
            TrainingError,
        ),
        _C.SECAGG_MISMATCH: _spec(
            "a message that does not fit the open round: a plaintext update to a secure-aggregation round, a "
            "secure-aggregation message to a plaintext round, or a phase message outside its phase",
            _D,
            ProtocolError,
        ),
        _C.STORAGE_UNAVAILABLE: _spec(
            "the coordinator's blob store (an S3 service) cannot be reached or refused the request; nothing was "
            "stored: wait and retry",
            _T,
            StorageFullError,
        ),
    }
)
"""The meaning, classes and retry meaning of every :class:`ErrorCode`."""

del _F, _T, _R, _D, _S, _C


def code_spec(code: ErrorCode | str) -> CodeSpec:
    """The :class:`CodeSpec` of ``code`` (``ValueError`` if it is not a member)."""
    return CODE_SPECS[ErrorCode(code)]


_BY_STATUS: Mapping[int, type[QflareError]] = MappingProxyType(
    {
        400: ProtocolError,
        401: AuthError,
        403: PolicyError,
        404: NotFoundError,
        413: OversizeError,
        422: ValidationError,
        429: RateLimitedError,
        502: ServerUnavailableError,
        503: ServerUnavailableError,
        504: ServerUnavailableError,
    }
)
_MAX_REMOTE_CODE = 64


def error_from_code(code: str, message: str, status: int | None = None) -> QflareError:
    """Rebuild a typed error from its code (e.g. from an HTTP error body, which may be hostile).

    A member is rebuilt as its spec's first class.  A code outside the vocabulary never raises: it
    becomes :attr:`ErrorCode.UNKNOWN_REMOTE_CODE` with the peer's string (clipped) kept in the message,
    and, like :attr:`ErrorCode.HTTP_ERROR`, takes the class its HTTP status maps to (else
    :class:`ProtocolError`).  When ``status`` is given the error carries it as ``http_status``.
    """
    try:
        member = ErrorCode(code)
    except ValueError:
        member = ErrorCode.UNKNOWN_REMOTE_CODE
        message = f"{message} (code {str(code)[:_MAX_REMOTE_CODE]!r})"
    spec = CODE_SPECS[member]
    cls = spec.classes[0] if spec.classes else _BY_STATUS.get(status or 0, ProtocolError)
    err = cls(message, code=member)
    if status is not None:
        err.http_status = status
    return err


CODE_TABLE_BEGIN = "<!-- error-codes:begin -->"
CODE_TABLE_END = "<!-- error-codes:end -->"


def code_table_markdown() -> str:
    """The markdown table of every code (the ``## Error codes`` section of ``docs/protocol.md``)."""
    rows = [
        "| code | HTTP status | error class | retry | meaning |",
        "|---|---|---|---|---|",
    ]
    for code in ErrorCode:
        spec = CODE_SPECS[code]
        status = ", ".join(str(s) for s in spec.statuses) or "the answer's"
        classes = ", ".join(f"`{c.__name__}`" for c in spec.classes) or "by status"
        retry = spec.retry.value if spec.retry is not None else "by class"
        rows.append(f"| `{code.value}` | {status} | {classes} | {retry} | {spec.meaning} |")
    return "\n".join(rows) + "\n"
