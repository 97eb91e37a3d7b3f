"""Hybrid ephemeral key establishment: ML-KEM (768/1024) + X25519, combined with HKDF-SHA256.

The initiator (device) makes a fresh :class:`EphemeralKem` per handshake and sends ``public_bytes()``
(``ML-KEM encapsulation key || X25519 public``).  The responder calls :func:`encapsulate`, which returns
the ciphertext (``ML-KEM ciphertext || X25519 ephemeral public``) and the shared secrets.  Both sides then
call :func:`derive_session_keys` with the handshake transcript hash::

    PRK        = HKDF-Extract(salt = transcript_hash,
                              IKM  = "qflare/v1/hybrid" || ss_mlkem || ss_x25519)
    c2s key    = HKDF-Expand(PRK, "qflare/v1/key/c2s",    32)
    s2c key    = HKDF-Expand(PRK, "qflare/v1/key/s2c",    32)
    session id = HKDF-Expand(PRK, "qflare/v1/session-id", 32)

The session keys stay secret as long as *either* ML-KEM or X25519 is unbroken, and the transcript (which
contains both public keys and the ciphertext) binds them to this exact exchange.  Ephemeral private keys
live only in the :class:`EphemeralKem` object, giving forward secrecy once it is dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from qflare.crypto.suite import Suite, load_mlkem
from qflare.errors import ConfigError, CryptoUnavailableError, MalformedError

__all__ = [
    "HYBRID_LABEL",
    "LABEL_C2S",
    "LABEL_S2C",
    "LABEL_SESSION_ID",
    "EphemeralKem",
    "Role",
    "SessionKeys",
    "SharedSecrets",
    "derive_session_keys",
    "encapsulate",
    "hkdf_sha256",
    "kem_ciphertext_len",
    "kem_public_len",
]

X25519_LEN = 32
KEY_LEN = 32
HYBRID_LABEL = b"qflare/v1/hybrid"
LABEL_C2S = b"qflare/v1/key/c2s"
LABEL_S2C = b"qflare/v1/key/s2c"
LABEL_SESSION_ID = b"qflare/v1/session-id"


class Role(enum.StrEnum):
    CLIENT = "client"  # the device (initiator)
    SERVER = "server"  # the coordinator (responder)


def kem_public_len(suite: Suite) -> int:
    return suite.kem_alg.public_len + (X25519_LEN if suite.x25519 else 0)


def kem_ciphertext_len(suite: Suite) -> int:
    return suite.kem_alg.ciphertext_len + (X25519_LEN if suite.x25519 else 0)


def _kem_classes(suite: Suite) -> tuple[Any, Any]:
    mod = load_mlkem()
    prefix = suite.kem_alg.class_prefix
    try:
        return getattr(mod, prefix + "PrivateKey"), getattr(mod, prefix + "PublicKey")
    except AttributeError as exc:  # pragma: no cover
        raise CryptoUnavailableError(f"{suite.kem} is not provided by this pyca/cryptography build") from exc


def _x25519_exchange(priv: x25519.X25519PrivateKey, peer_raw: bytes) -> bytes:
    try:
        return priv.exchange(x25519.X25519PublicKey.from_public_bytes(peer_raw))
    except ValueError:
        # Low-order point (all-zero shared secret): refuse rather than mixing in a known value.
        raise MalformedError("X25519 share is a low-order point", code="bad_kem_share") from None


@dataclass(frozen=True, repr=False)
class SharedSecrets:
    """The raw shared secrets of one exchange (never log these)."""

    mlkem: bytes
    x25519: bytes | None

    def ikm(self) -> bytes:
        return HYBRID_LABEL + self.mlkem + (self.x25519 or b"")

    def __repr__(self) -> str:
        return f"SharedSecrets(mlkem=<{len(self.mlkem)} bytes>, x25519={'<32 bytes>' if self.x25519 else None})"


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """Per-direction keys and the session id, seen from ``role``."""

    c2s: bytes
    s2c: bytes
    session_id: bytes
    role: Role

    @property
    def send_key(self) -> bytes:
        return self.c2s if self.role is Role.CLIENT else self.s2c

    @property
    def recv_key(self) -> bytes:
        return self.s2c if self.role is Role.CLIENT else self.c2s

    def __repr__(self) -> str:
        return f"SessionKeys(role={self.role.value}, session_id={self.session_id.hex()[:16]}...)"


class EphemeralKem:
    """The initiator's ephemeral key pair(s) for one handshake."""

    __slots__ = ("_mlkem", "_public", "_suite", "_x25519")

    def __init__(self, suite: Suite, mlkem_key: Any, x25519_key: x25519.X25519PrivateKey | None) -> None:
        if suite.x25519 != (x25519_key is not None):
            raise ConfigError("X25519 key presence must match suite.x25519", code="bad_kem_key")
        self._suite = suite
        self._mlkem = mlkem_key
        self._x25519 = x25519_key
        pub = mlkem_key.public_key().public_bytes_raw()
        if x25519_key is not None:
            pub += x25519_key.public_key().public_bytes_raw()
        self._public: bytes = bytes(pub)

    @classmethod
    def generate(cls, suite: Suite) -> EphemeralKem:
        priv_cls, _ = _kem_classes(suite)
        try:
            mk = priv_cls.generate()
            xk = x25519.X25519PrivateKey.generate() if suite.x25519 else None
        except UnsupportedAlgorithm as exc:
            raise CryptoUnavailableError(f"{suite.kem}/X25519 unavailable: {exc}") from exc
        return cls(suite, mk, xk)

    @classmethod
    def unsafe_from_seeds(cls, suite: Suite, mlkem_seed: bytes, x25519_private: bytes | None) -> EphemeralKem:
        """DANGEROUS: deterministic ephemeral keys (64-byte ML-KEM seed d||z, raw X25519 scalar).

        Only for test vectors; reusing ephemeral keys destroys forward secrecy.
        """
        priv_cls, _ = _kem_classes(suite)
        try:
            mk = priv_cls.from_seed_bytes(bytes(mlkem_seed))
            xk = x25519.X25519PrivateKey.from_private_bytes(bytes(x25519_private)) if x25519_private else None
        except ValueError as exc:
            raise ConfigError(f"bad deterministic KEM seed: {exc}", code="bad_seed") from exc
        return cls(suite, mk, xk)

    @property
    def suite(self) -> Suite:
        return self._suite

    def public_bytes(self) -> bytes:
        """``ML-KEM encapsulation key || X25519 public`` (the latter only when the suite is hybrid)."""
        return self._public

    def decapsulate(self, ciphertext: bytes) -> SharedSecrets:
        """Recover the shared secrets; a ciphertext of the wrong length is MalformedError.

        A well-formed but forged ML-KEM ciphertext yields an unrelated secret (implicit rejection), so the
        handshake then fails authentication.
        """
        suite = self._suite
        if len(ciphertext) != kem_ciphertext_len(suite):
            raise MalformedError(
                f"KEM ciphertext must be {kem_ciphertext_len(suite)} bytes, got {len(ciphertext)}", code="malformed"
            )
        n = suite.kem_alg.ciphertext_len
        try:
            ss = bytes(self._mlkem.decapsulate(bytes(ciphertext[:n])))
        except ValueError as exc:
            raise MalformedError(f"invalid {suite.kem} ciphertext: {exc}", code="malformed") from None
        xs = _x25519_exchange(self._x25519, bytes(ciphertext[n:])) if self._x25519 is not None else None
        return SharedSecrets(ss, xs)


def encapsulate(suite: Suite, peer_public_bytes: bytes) -> tuple[bytes, SharedSecrets]:
    """Responder side: encapsulate to the initiator's ephemeral public bytes.

    Returns ``(ciphertext, shared_secrets)`` where ciphertext is ``ML-KEM ct || X25519 ephemeral public``.
    Malformed public bytes raise MalformedError.
    """
    if len(peer_public_bytes) != kem_public_len(suite):
        raise MalformedError(
            f"KEM public key must be {kem_public_len(suite)} bytes, got {len(peer_public_bytes)}", code="malformed"
        )
    _, pub_cls = _kem_classes(suite)
    n = suite.kem_alg.public_len
    try:
        peer = pub_cls.from_public_bytes(bytes(peer_public_bytes[:n]))
        ss, ct = peer.encapsulate()
    except ValueError as exc:
        raise MalformedError(f"invalid {suite.kem} public key: {exc}", code="malformed") from None
    xs: bytes | None = None
    if suite.x25519:
        eph = x25519.X25519PrivateKey.generate()
        xs = _x25519_exchange(eph, bytes(peer_public_bytes[n:]))
        ct = bytes(ct) + eph.public_key().public_bytes_raw()
    return bytes(ct), SharedSecrets(bytes(ss), xs)


def derive_session_keys(shared: SharedSecrets, transcript_hash: bytes, role: Role | str) -> SessionKeys:
    """HKDF-SHA256 key schedule (deterministic for fixed inputs; see module docstring)."""
    if len(transcript_hash) != 32:
        raise ConfigError("transcript hash must be 32 bytes (SHA-256)", code="bad_transcript_hash")
    prk = HKDF.extract(hashes.SHA256(), bytes(transcript_hash), shared.ikm())

    def expand(label: bytes) -> bytes:
        return bytes(HKDFExpand(hashes.SHA256(), KEY_LEN, label).derive(prk))

    try:
        who = Role(role)
    except ValueError:
        raise ConfigError(f"unknown role {role!r}", code="bad_role") from None
    return SessionKeys(c2s=expand(LABEL_C2S), s2c=expand(LABEL_S2C), session_id=expand(LABEL_SESSION_ID), role=who)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """One-shot HKDF-SHA256 (extract + expand); used by the channel ratchet."""
    return bytes(HKDF(hashes.SHA256(), length, salt, info).derive(ikm))
