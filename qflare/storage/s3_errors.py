"""What a botocore exception means to the S3 blob store (:mod:`qflare.storage.blobs_s3`).

botocore is imported by the functions, not by this module: the package works without boto3 installed.
"""

from __future__ import annotations

__all__ = ["client_error", "missing", "reason", "transient"]

# ClientError codes that retrying can heal; any other 4xx is a refusal (credentials, policy, bucket)
_TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeTooSkewed", "BadDigest"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


def client_error(exc: BaseException) -> tuple[str, int | None, str] | None:
    """(code, HTTP status, message) of a botocore ClientError; None for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    code = str(error.get("Code") or "")
    return code, status if isinstance(status, int) else None, str(error.get("Message") or code or status)


def reason(exc: BaseException, bucket: str, endpoint: str) -> str:
    """One line saying what went wrong, with what to check where the fix is the operator's."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return f"{exc}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)"
    found = client_error(exc)
    if found is None:
        return f"{type(exc).__name__}: {exc}"
    code, status, message = found
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist at {endpoint}"
    if status == 403:
        return (
            f"access to bucket {bucket!r} refused ({code}: {message}); check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and the bucket's policy"
        )
    return f"{code or status}: {message}"


def transient(exc: BaseException) -> bool:
    """Whether retrying may heal ``exc`` (network, timeouts, throttling, a 5xx), as opposed to a refusal."""
    from botocore import exceptions as bx

    found = client_error(exc)
    if found is not None:
        code, status, _ = found
        return code in _TRANSIENT_CODES or (status is not None and status >= 500)
    if isinstance(exc, bx.SSLError):
        return False
    return isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.ResponseStreamingError | bx.IncompleteReadError)


def missing(exc: BaseException) -> bool:
    """A 404 for the object (not for the bucket)."""
    found = client_error(exc)
    return found is not None and found[0] != "NoSuchBucket" and (found[0] in _MISSING_CODES or found[1] == 404)
