"""Crypto agility: which algorithms a session uses, and which ones a deployment accepts.

A :class:`Suite` names one algorithm per role (signature, KEM, AEAD) plus whether X25519 is mixed into
the key exchange.  It travels on the wire as five bytes.  A :class:`Policy` says what is *acceptable*;
``Policy.check`` refuses anything weaker with :class:`~qflare.errors.PolicyError` and never downgrades
silently.  Only pyca/cryptography provides primitives: when the linked OpenSSL lacks one,
:func:`require_primitives` raises :class:`~qflare.errors.CryptoUnavailableError` (there is no fallback).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives import hashes

from qflare.errors import ConfigError, CryptoUnavailableError, MalformedError, PolicyError

__all__ = [
    "AEAD_ALGORITHMS",
    "DEFAULT_POLICY",
    "DEFAULT_SUITE",
    "HIGH_SUITE",
    "KEM_ALGORITHMS",
    "SIG_ALGORITHMS",
    "SUITE_VERSION",
    "SUITE_WIRE_LEN",
    "KemAlgorithm",
    "Policy",
    "SigAlgorithm",
    "Suite",
    "load_mldsa",
    "load_mlkem",
    "require_primitives",
    "sha256",
]

SUITE_VERSION = 1
SUITE_WIRE_LEN = 5


@dataclass(frozen=True)
class SigAlgorithm:
    """An ML-DSA parameter set (FIPS 204)."""

    name: str
    wire_id: int
    level: int  # NIST security category
    public_len: int
    signature_len: int
    class_prefix: str  # "MLDSA65" -> MLDSA65PrivateKey / MLDSA65PublicKey


@dataclass(frozen=True)
class KemAlgorithm:
    """An ML-KEM parameter set (FIPS 203)."""

    name: str
    wire_id: int
    level: int
    public_len: int
    ciphertext_len: int
    class_prefix: str


SIG_ALGORITHMS: dict[str, SigAlgorithm] = {
    a.name: a
    for a in (
        SigAlgorithm("ML-DSA-44", 0x01, 2, 1312, 2420, "MLDSA44"),
        SigAlgorithm("ML-DSA-65", 0x02, 3, 1952, 3309, "MLDSA65"),
        SigAlgorithm("ML-DSA-87", 0x03, 5, 2592, 4627, "MLDSA87"),
    )
}
KEM_ALGORITHMS: dict[str, KemAlgorithm] = {
    a.name: a
    for a in (
        KemAlgorithm("ML-KEM-768", 0x01, 3, 1184, 1088, "MLKEM768"),
        KemAlgorithm("ML-KEM-1024", 0x02, 5, 1568, 1568, "MLKEM1024"),
    )
}
AEAD_ALGORITHMS: dict[str, int] = {"AES-256-GCM": 0x01}

_SIG_BY_ID = {a.wire_id: a for a in SIG_ALGORITHMS.values()}
_KEM_BY_ID = {a.wire_id: a for a in KEM_ALGORITHMS.values()}
_AEAD_BY_ID = {v: k for k, v in AEAD_ALGORITHMS.items()}


def sha256(*parts: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 (pyca/cryptography) of the concatenation of ``parts``."""
    h = hashes.Hash(hashes.SHA256())
    for part in parts:
        h.update(part)
    return h.finalize()


def load_mldsa() -> ModuleType:
    """The pyca ML-DSA module, or CryptoUnavailableError."""
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa
    except ImportError as exc:  # pragma: no cover - depends on the installed cryptography
        raise CryptoUnavailableError(
            "ML-DSA is not available: pyca/cryptography with ML-DSA support (OpenSSL >= 3.5) is required"
        ) from exc
    return mldsa


def load_mlkem() -> ModuleType:
    """The pyca ML-KEM module, or CryptoUnavailableError."""
    try:
        from cryptography.hazmat.primitives.asymmetric import mlkem
    except ImportError as exc:  # pragma: no cover - depends on the installed cryptography
        raise CryptoUnavailableError(
            "ML-KEM is not available: pyca/cryptography with ML-KEM support (OpenSSL >= 3.5) is required"
        ) from exc
    return mlkem


@dataclass(frozen=True)
class Suite:
    """One algorithm per role.  Construct only with known names (ConfigError otherwise)."""

    version: int = SUITE_VERSION
    sig: str = "ML-DSA-65"
    kem: str = "ML-KEM-768"
    x25519: bool = True
    aead: str = "AES-256-GCM"

    def __post_init__(self) -> None:
        if self.version != SUITE_VERSION:
            raise ConfigError(f"unsupported suite version {self.version}", code="unknown_algorithm")
        if self.sig not in SIG_ALGORITHMS:
            raise ConfigError(f"unknown signature algorithm {self.sig!r}", code="unknown_algorithm")
        if self.kem not in KEM_ALGORITHMS:
            raise ConfigError(f"unknown KEM {self.kem!r}", code="unknown_algorithm")
        if self.aead not in AEAD_ALGORITHMS:
            raise ConfigError(f"unknown AEAD {self.aead!r}", code="unknown_algorithm")
        if not isinstance(self.x25519, bool):
            raise ConfigError("x25519 must be a bool", code="unknown_algorithm")

    @property
    def sig_alg(self) -> SigAlgorithm:
        return SIG_ALGORITHMS[self.sig]

    @property
    def kem_alg(self) -> KemAlgorithm:
        return KEM_ALGORITHMS[self.kem]

    @property
    def name(self) -> str:
        parts = [self.sig, self.kem] + (["X25519"] if self.x25519 else []) + [self.aead]
        return f"v{self.version}:" + "+".join(parts)

    def to_bytes(self) -> bytes:
        """Five bytes: version, signature id, KEM id, X25519 flag (0/1), AEAD id."""
        return bytes(
            (
                self.version,
                self.sig_alg.wire_id,
                self.kem_alg.wire_id,
                1 if self.x25519 else 0,
                AEAD_ALGORITHMS[self.aead],
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Suite:
        """Parse the five-byte wire form; anything unknown or non-canonical is MalformedError."""
        if len(data) != SUITE_WIRE_LEN:
            raise MalformedError(f"suite must be {SUITE_WIRE_LEN} bytes, got {len(data)}", code="malformed")
        version, sig_id, kem_id, hybrid, aead_id = data
        if version != SUITE_VERSION:
            raise MalformedError(f"unknown suite version {version}", code="malformed")
        sig = _SIG_BY_ID.get(sig_id)
        kem = _KEM_BY_ID.get(kem_id)
        aead = _AEAD_BY_ID.get(aead_id)
        if sig is None or kem is None or aead is None or hybrid not in (0, 1):
            raise MalformedError(f"unknown or non-canonical suite bytes {bytes(data).hex()}", code="malformed")
        return cls(version=version, sig=sig.name, kem=kem.name, x25519=bool(hybrid), aead=aead)


DEFAULT_SUITE = Suite(sig="ML-DSA-65", kem="ML-KEM-768", x25519=True, aead="AES-256-GCM")
HIGH_SUITE = Suite(sig="ML-DSA-87", kem="ML-KEM-1024", x25519=True, aead="AES-256-GCM")


@dataclass(frozen=True)
class Policy:
    """What a deployment accepts.  Levels are NIST security categories (ML-DSA-44=2, -65=3, -87=5;
    ML-KEM-768=3, -1024=5)."""

    min_sig_level: int = 3
    min_kem_level: int = 3
    require_hybrid: bool = True
    accepted_versions: frozenset[int] = field(default_factory=lambda: frozenset({SUITE_VERSION}))
    accepted_aeads: frozenset[str] = field(default_factory=lambda: frozenset(AEAD_ALGORITHMS))

    def violations(self, suite: Suite) -> list[str]:
        """Human-readable reasons why ``suite`` is weaker than this policy (empty when acceptable)."""
        out: list[str] = []
        if suite.version not in self.accepted_versions:
            out.append(f"suite version {suite.version} not in accepted versions {sorted(self.accepted_versions)}")
        if suite.sig_alg.level < self.min_sig_level:
            out.append(f"signature {suite.sig} (level {suite.sig_alg.level}) below minimum level {self.min_sig_level}")
        if suite.kem_alg.level < self.min_kem_level:
            out.append(f"KEM {suite.kem} (level {suite.kem_alg.level}) below minimum level {self.min_kem_level}")
        if self.require_hybrid and not suite.x25519:
            out.append("X25519 hybrid key exchange is required but the suite turns it off")
        if suite.aead not in self.accepted_aeads:
            out.append(f"AEAD {suite.aead} not accepted")
        return out

    def check(self, suite: Suite) -> Suite:
        """Return ``suite`` if acceptable, else raise PolicyError naming everything that is too weak."""
        problems = self.violations(suite)
        if problems:
            raise PolicyError(f"suite {suite.name} refused by policy: " + "; ".join(problems), code="policy_violation")
        return suite

    def allows(self, suite: Suite) -> bool:
        return not self.violations(suite)


DEFAULT_POLICY = Policy()

_checked: set[Suite] = set()
_checked_lock = threading.Lock()


def _self_test(suite: Suite) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    sig_cls: Any = getattr(load_mldsa(), suite.sig_alg.class_prefix + "PrivateKey")
    kem_cls: Any = getattr(load_mlkem(), suite.kem_alg.class_prefix + "PrivateKey")
    msg = b"qflare self-test"
    sk = sig_cls.generate()
    sig = sk.sign(msg, b"qflare/selftest")
    sk.public_key().verify(sig, msg, b"qflare/selftest")
    try:
        sk.public_key().verify(sig, msg + b"!", b"qflare/selftest")
    except InvalidSignature:
        pass
    else:  # pragma: no cover - a broken provider
        raise CryptoUnavailableError(f"{suite.sig} accepted a forged signature: provider is broken")
    dk = kem_cls.generate()
    ss, ct = dk.public_key().encapsulate()
    if dk.decapsulate(ct) != ss or len(ct) != suite.kem_alg.ciphertext_len:  # pragma: no cover
        raise CryptoUnavailableError(f"{suite.kem} self-test failed")
    if suite.x25519:
        a, b = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        if a.exchange(b.public_key()) != b.exchange(a.public_key()):  # pragma: no cover
            raise CryptoUnavailableError("X25519 self-test failed")
    key = HKDF(hashes.SHA256(), 32, b"salt", b"qflare/selftest").derive(ss)
    aead = AESGCM(key)
    if aead.decrypt(bytes(12), aead.encrypt(bytes(12), msg, b"ad"), b"ad") != msg:  # pragma: no cover
        raise CryptoUnavailableError("AES-256-GCM self-test failed")
    if sha256(b"abc").hex() != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad":
        raise CryptoUnavailableError("SHA-256 self-test failed")  # pragma: no cover


def require_primitives(suite: Suite | None = None) -> None:
    """Fail loudly (CryptoUnavailableError) unless every primitive of ``suite`` works.

    ``None`` checks every registered algorithm.  Runs a functional self-test once per suite and caches the
    success; call it at start-up.  There is no fallback to anything weaker or non-post-quantum.
    """
    from cryptography.exceptions import UnsupportedAlgorithm

    suites = [suite] if suite is not None else [Suite(sig=s, kem=k) for s in SIG_ALGORITHMS for k in KEM_ALGORITHMS]
    for s in suites:
        with _checked_lock:
            if s in _checked:
                continue
        try:
            _self_test(s)
        except CryptoUnavailableError:
            raise
        except (UnsupportedAlgorithm, ImportError, AttributeError, ValueError, TypeError) as exc:
            raise CryptoUnavailableError(
                f"primitive unavailable for suite {s.name}: {type(exc).__name__}: {exc}. "
                "QFLARE needs pyca/cryptography linked to an OpenSSL with ML-DSA, ML-KEM, X25519, "
                "HKDF-SHA256 and AES-256-GCM; there is no fallback."
            ) from exc
        with _checked_lock:
            _checked.add(s)
