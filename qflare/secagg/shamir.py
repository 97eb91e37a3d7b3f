"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (32 bytes, read as a big-endian integer ``< 2^256``) is the constant term of a random
polynomial ``f`` of degree ``t - 1`` whose other coefficients are uniform in the field; share ``i`` is
``f(i)`` for a participant index ``i`` in ``1..MAX_INDEX``.  Any ``t`` shares give ``s`` back by Lagrange
interpolation at 0; any ``t - 1`` shares are independent of ``s`` (perfect secrecy, because the field is
larger than the secret space and the coefficients are uniform).

Why 2^521 - 1: a Mersenne prime (so the modulus is known prime without a certificate) larger than 2^256,
so every 32-byte secret is a field element without reduction and a share is 66 bytes.  Coefficients
come from ``secrets.randbelow`` (the OS CSPRNG).  No maintained library fits: pycryptodome's
``Crypto.Protocol.SecretSharing.Shamir`` shares 16-byte secrets over GF(2^128) only, and would be a new
dependency for two splits and one Lagrange formula.

Encoding of a share: its value as 66 bytes big-endian; a value ``>= P`` is refused (one valid encoding).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from qflare.errors import AuthError, ConfigError, ErrorCode, MalformedError, RoundError

__all__ = ["MAX_INDEX", "SECRET_LEN", "SHARE_LEN", "P", "decode_share", "encode_share", "reconstruct", "split"]

P = 2**521 - 1
SECRET_LEN = 32
SHARE_LEN = 66  # ceil(521 / 8)
MAX_INDEX = 2**32 - 1  # participant indices are u32 on the wire, never 0 (f(0) is the secret)


def _check_threshold(threshold: int, count: int) -> None:
    if not 1 <= threshold <= count:
        raise ConfigError(f"threshold must be in 1..{count}, got {threshold}", code=ErrorCode.BAD_ARGUMENT)


def _check_indices(indices: Iterable[int]) -> list[int]:
    out = list(indices)
    if len(set(out)) != len(out):
        raise ConfigError("share indices must be distinct", code=ErrorCode.BAD_ARGUMENT)
    for i in out:
        if not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= MAX_INDEX:
            raise ConfigError(f"share index {i!r} not in 1..{MAX_INDEX}", code=ErrorCode.BAD_ARGUMENT)
    return out


def split(secret: bytes, threshold: int, indices: Iterable[int]) -> dict[int, int]:
    """Shares ``{index: f(index)}`` of a 32-byte ``secret``; any ``threshold`` of them recover it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_LEN:
        raise ConfigError(f"secret must be {SECRET_LEN} bytes", code=ErrorCode.BAD_ARGUMENT)
    xs = _check_indices(indices)
    _check_threshold(threshold, len(xs))
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(threshold - 1)]
    out: dict[int, int] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % P
        out[x] = acc
    return out


def reconstruct(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from exactly ``threshold`` shares (the first ``threshold`` by index are used).

    Fewer shares is a ValidationError (``secagg_aborted``); a result that is not a 32-byte secret means a
    share was wrong (``bad_share``).  Shares should be checked against their commitments first.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"threshold must be an integer >= 1, got {threshold!r}", code=ErrorCode.BAD_ARGUMENT)
    xs = _check_indices(shares)
    if len(xs) < threshold:
        raise RoundError(f"{len(xs)} shares cannot recover a {threshold}-of-n secret", code=ErrorCode.SECAGG_ABORTED)
    pts = sorted(xs)[:threshold]
    for x in pts:
        if not 0 <= shares[x] < P:
            raise MalformedError("share value outside the field", code=ErrorCode.BAD_SHARE)
    # Lagrange at 0: s = sum_i y_i * num_i / den_i, num_i = prod_{j != i} x_j, den_i = prod_{j != i} (x_j - x_i)
    # (never 0 mod P: the x are distinct and < P).  All den_i are inverted with one field inversion
    # (Montgomery's trick: invert their product, then peel one factor off at a time).
    nums: list[int] = []
    dens: list[int] = []
    for xi in pts:
        num = den = 1
        for xj in pts:
            if xj != xi:
                num = num * xj % P
                den = den * (xj - xi) % P
        nums.append(num)
        dens.append(den)
    prefix = [1]  # prefix[i] = den_0 * ... * den_{i-1}
    for den in dens:
        prefix.append(prefix[-1] * den % P)
    inv = pow(prefix[-1], -1, P)  # 1 / (den_0 * ... * den_{i})  for i = len - 1, then downwards
    acc = 0
    for i in range(len(pts) - 1, -1, -1):
        inv_den = inv * prefix[i] % P
        inv = inv * dens[i] % P
        acc = (acc + shares[pts[i]] * nums[i] % P * inv_den) % P
    if acc >= 2 ** (8 * SECRET_LEN):
        raise AuthError("shares do not interpolate to a 32-byte secret", code=ErrorCode.BAD_SHARE)
    return acc.to_bytes(SECRET_LEN, "big")


def encode_share(value: int) -> bytes:
    if not 0 <= value < P:
        raise ConfigError("share value outside the field", code=ErrorCode.BAD_ARGUMENT)
    return value.to_bytes(SHARE_LEN, "big")


def decode_share(data: bytes) -> int:
    if len(data) != SHARE_LEN:
        raise MalformedError(f"a share is {SHARE_LEN} bytes, got {len(data)}", code=ErrorCode.BAD_SHARE)
    value = int.from_bytes(data, "big")
    if value >= P:
        raise MalformedError("share value outside the field", code=ErrorCode.BAD_SHARE)
    return value
