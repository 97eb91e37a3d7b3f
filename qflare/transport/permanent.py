"""Transport failures that retrying cannot heal: a base URL that cannot work, and TLS that cannot work.

:class:`~qflare.transport.http.HttpTransport` checks its base URL with :func:`check_base_url` when it is
built and classifies each failed connection with :func:`tls_failure`; both turn a configuration mistake
into one clear error instead of an outage retried until the caller's patience runs out.
"""

from __future__ import annotations

import ssl
import urllib.parse

import httpx

from ..errors import ConfigError

__all__ = ["check_base_url", "tls_failure"]


def check_base_url(url: str) -> str:
    """``url`` without a trailing slash, if it is ``http://`` or ``https://`` with a host (and port, if
    any, in 1..65535); else :class:`~qflare.errors.ConfigError` ``bad_server_url`` - a mistake that
    retrying cannot heal, so it is never retried as an outage."""
    hint = "a coordinator URL is http:// or https:// and a host, e.g. http://127.0.0.1:8080"
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"server URL {url[:200]!r} does not parse ({exc}): {hint}", code="bad_server_url") from None
    if parts.scheme.lower() not in ("http", "https"):
        what = f"scheme {parts.scheme!r}" if parts.scheme and parts.netloc else "no scheme"
        raise ConfigError(f"server URL {url[:200]!r} has {what}: {hint}", code="bad_server_url")
    if not parts.hostname or port == 0 or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            f"server URL {url[:200]!r} needs a host (and no user, query or fragment): {hint}", code="bad_server_url"
        )
    try:
        httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ConfigError(f"server URL {url[:200]!r} is not valid ({exc}): {hint}", code="bad_server_url") from None
    return text.rstrip("/")


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a transport failure when retrying cannot heal it (a protocol mismatch or a
    certificate that does not verify); None for anything else, including TLS connections cut short."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError) and not isinstance(cur, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None
