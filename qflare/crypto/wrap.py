"""Wrapping of secret state that several coordinator processes keep in their shared database.

A coordinator that shares its sessions (``CoordinatorConfig.shared_sessions``) stores each session's
channel keys, and each pending handshake's derived keys, in the database so that any of its processes
can continue them.  They are stored wrapped, never in plaintext, under a key every process derives
from the coordinator's identity key (which they all load from the data directory), so no new secret
has to be distributed::

    KEK     = HKDF-SHA256(IKM = the ML-DSA seed, salt = the coordinator key id (32), "qflare/v1/state-wrap")
    kek id  = SHA-256("qflare/v1/state-wrap-id" || KEK)[:8]
    wrapped = 01 || kek id (8) || nonce (12, random) || AES-256-GCM(KEK, nonce, plaintext, AAD)
    AAD     = "qflare/v1/wrapped-state" || len(purpose) (1) || purpose || bound

``purpose`` names what is wrapped and ``bound`` is the row it belongs to (a session id, a hello hash), so
a wrapped value moved to another row or purpose never opens.  A rotated coordinator key derives another
KEK: what the former key wrapped no longer opens (``kek_mismatch`` in the message), and the devices run
the handshake again, as they do on any ``unknown_session``.  Random 96-bit nonces keep the chance of a
repeat negligible up to about 2**32 wraps per key.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qflare.crypto.identity import SigningKey
from qflare.crypto.suite import sha256
from qflare.errors import AuthError, ConfigError, MalformedError

__all__ = ["WRAP_FORMAT", "StateKey"]

WRAP_FORMAT = 1
_INFO = b"qflare/v1/state-wrap"
_ID_LABEL = b"qflare/v1/state-wrap-id"
_AAD_LABEL = b"qflare/v1/wrapped-state"
_ID_LEN, _NONCE_LEN, _TAG_LEN = 8, 12, 16
_HEADER_LEN = 1 + _ID_LEN + _NONCE_LEN


class StateKey:
    """The key wrapping shared coordinator state (see the module docstring).  Thread-safe."""

    __slots__ = ("_aead", "_id")

    def __init__(self, kek: bytes) -> None:
        if not isinstance(kek, (bytes, bytearray)) or len(kek) != 32:
            raise ConfigError("a state key is 32 bytes", code="bad_argument")
        self._aead = AESGCM(bytes(kek))
        self._id = sha256(_ID_LABEL, bytes(kek))[:_ID_LEN]

    @classmethod
    def from_identity(cls, identity: SigningKey) -> StateKey:
        """The state key of the coordinator holding ``identity``: every process with that key derives it."""
        return cls(identity.derive_secret(_INFO))

    @property
    def key_id(self) -> bytes:
        """8 bytes naming this key (stored in each wrapped value; not secret)."""
        return self._id

    def wrap(self, purpose: bytes, bound: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        header = bytes((WRAP_FORMAT,)) + self._id + nonce
        return header + self._aead.encrypt(nonce, bytes(plaintext), _aad(purpose, bound))

    def unwrap(self, purpose: bytes, bound: bytes, wrapped: bytes) -> bytes:
        """The plaintext :meth:`wrap` was given for ``purpose`` and ``bound``; AuthError ``bad_mac`` when it
        was wrapped under another key (the message says so), for another row or purpose, or altered."""
        data = bytes(wrapped)
        if len(data) < _HEADER_LEN + _TAG_LEN or data[0] != WRAP_FORMAT:
            raise MalformedError("wrapped state is truncated or of an unknown format", code="malformed")
        if data[1 : 1 + _ID_LEN] != self._id:
            raise AuthError(
                "wrapped state is under another coordinator key (kek_mismatch: a key rotation?)", code="bad_mac"
            )
        try:
            return self._aead.decrypt(data[1 + _ID_LEN : _HEADER_LEN], data[_HEADER_LEN:], _aad(purpose, bound))
        except InvalidTag:
            raise AuthError(
                "wrapped state does not authenticate: altered, or bound to another row", code="bad_mac"
            ) from None

    def __repr__(self) -> str:
        return f"StateKey({self._id.hex()})"


def _aad(purpose: bytes, bound: bytes) -> bytes:
    if not 0 < len(purpose) < 256:
        raise ConfigError("a wrap purpose is 1..255 bytes", code="bad_argument")
    return _AAD_LABEL + bytes((len(purpose),)) + bytes(purpose) + bytes(bound)
