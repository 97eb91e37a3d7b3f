"""Long-term identities: ML-DSA signing keys, their public halves, and key files.

Every signature carries an ML-DSA *context string* (FIPS 204) for domain separation, e.g.
``b"qflare/v1/update"``, so a signature made for one purpose never verifies for another.  Key files are
PKCS#8 PEM (encrypted with ``BestAvailableEncryption`` when a passphrase is given), written atomically with
mode 0600, and refused on load when group or others can read them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from qflare.crypto.kem import hkdf_sha256
from qflare.crypto.suite import SIG_ALGORITHMS, SigAlgorithm, load_mldsa, sha256
from qflare.errors import (
    AuthError,
    BadSignatureError,
    ConfigError,
    CryptoUnavailableError,
    MalformedError,
)

__all__ = ["MAX_CONTEXT_LEN", "SigningKey", "VerifyKey", "key_id_of"]

MAX_CONTEXT_LEN = 255
SEED_LEN = 32


def _alg(name: str) -> SigAlgorithm:
    try:
        return SIG_ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown signature algorithm {name!r}", code="unknown_algorithm") from None


def _classes(name: str) -> tuple[Any, Any]:
    mod = load_mldsa()
    prefix = _alg(name).class_prefix
    try:
        return getattr(mod, prefix + "PrivateKey"), getattr(mod, prefix + "PublicKey")
    except AttributeError as exc:  # pragma: no cover - depends on the installed cryptography
        raise CryptoUnavailableError(f"{name} is not provided by this pyca/cryptography build") from exc


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, (bytes, bytearray)) or not 0 < len(context) <= MAX_CONTEXT_LEN:
        raise ConfigError(f"signature context must be 1..{MAX_CONTEXT_LEN} bytes", code="bad_context")
    return bytes(context)


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def key_id_of(raw_public: bytes) -> str:
    """Key id: lowercase hex SHA-256 of the raw public key."""
    return sha256(raw_public).hex()


class VerifyKey:
    """An ML-DSA public key."""

    __slots__ = ("_alg", "_key", "_key_id", "_raw")

    def __init__(self, alg: str, key: Any) -> None:
        self._alg = _alg(alg).name
        self._key = key
        self._raw: bytes = key.public_bytes_raw()
        self._key_id = key_id_of(self._raw)

    @classmethod
    def from_bytes(cls, alg: str, raw: bytes) -> VerifyKey:
        """Parse a raw public key; wrong length or invalid encoding is MalformedError."""
        spec = _alg(alg)
        if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != spec.public_len:
            size = len(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else "?"
            raise MalformedError(f"{alg} public key must be {spec.public_len} bytes, got {size}", code="malformed")
        _, pub_cls = _classes(alg)
        try:
            key = pub_cls.from_public_bytes(bytes(raw))
        except (ValueError, TypeError) as exc:
            raise MalformedError(f"invalid {alg} public key: {exc}", code="malformed") from exc
        return cls(alg, key)

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def key_id_bytes(self) -> bytes:
        return bytes.fromhex(self._key_id)

    def verify(self, signature: bytes, data: bytes, context: bytes) -> None:
        """Raise BadSignatureError unless ``signature`` is valid over ``data`` under ``context``."""
        ctx = _check_context(context)
        if len(signature) != SIG_ALGORITHMS[self._alg].signature_len:
            raise BadSignatureError(f"{self._alg} signature has the wrong length", code="bad_signature")
        try:
            self._key.verify(bytes(signature), bytes(data), ctx)
        except (InvalidSignature, ValueError, TypeError):
            raise BadSignatureError(
                f"{self._alg} signature does not verify under key {self._key_id[:16]}", code="bad_signature"
            ) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other._alg == self._alg and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((self._alg, self._raw))

    def __repr__(self) -> str:
        return f"VerifyKey({self._alg}, {self._key_id[:16]}...)"


class SigningKey:
    """An ML-DSA private key (the 32-byte FIPS 204 seed inside pyca)."""

    __slots__ = ("_alg", "_key", "_public")

    def __init__(self, alg: str, key: Any) -> None:
        self._alg = _alg(alg).name
        self._key = key
        self._public = VerifyKey(self._alg, key.public_key())

    @classmethod
    def generate(cls, alg: str = "ML-DSA-65") -> SigningKey:
        priv_cls, _ = _classes(alg)
        try:
            return cls(alg, priv_cls.generate())
        except UnsupportedAlgorithm as exc:
            raise CryptoUnavailableError(f"{alg} unavailable in the linked OpenSSL: {exc}") from exc

    @classmethod
    def from_seed(cls, alg: str, seed: bytes) -> SigningKey:
        """Deterministic key from a 32-byte seed (test vectors, HSM/KDF-backed deployments)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_LEN:
            raise ConfigError(f"ML-DSA seed must be {SEED_LEN} bytes", code="bad_seed")
        priv_cls, _ = _classes(alg)
        try:
            return cls(alg, priv_cls.from_seed_bytes(bytes(seed)))
        except UnsupportedAlgorithm as exc:
            raise CryptoUnavailableError(f"{alg} unavailable in the linked OpenSSL: {exc}") from exc

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def public(self) -> VerifyKey:
        return self._public

    @property
    def key_id(self) -> str:
        return self._public.key_id

    @property
    def key_id_bytes(self) -> bytes:
        return self._public.key_id_bytes

    def sign(self, data: bytes, context: bytes) -> bytes:
        """ML-DSA signature (hedged/randomised by OpenSSL) over ``data`` with a domain-separation context."""
        return bytes(self._key.sign(bytes(data), _check_context(context)))

    def derive_secret(self, info: bytes, length: int = 32) -> bytes:
        """A secret derived from this private key: ``HKDF-SHA256(IKM = the seed, salt = the key id (32),
        info)``.  Every holder of the key derives the same value for one ``info`` (e.g. the key wrapping the
        coordinator state its processes share); ``info`` separates purposes.  Nothing derived reveals the key."""
        if not isinstance(info, (bytes, bytearray)) or not info:
            raise ConfigError("derivation info must be non-empty bytes", code="bad_argument")
        return hkdf_sha256(bytes(self._key.private_bytes_raw()), self.key_id_bytes, bytes(info), length)

    def unsafe_seed_bytes(self) -> bytes:
        """DANGEROUS: the raw 32-byte private seed.  Only for vectors and HSM export."""
        return bytes(self._key.private_bytes_raw())

    def to_pem(self, passphrase: bytes | None) -> bytes:
        enc: serialization.KeySerializationEncryption
        if passphrase is None:
            enc = serialization.NoEncryption()
        else:
            if not isinstance(passphrase, (bytes, bytearray)) or len(passphrase) == 0:
                raise ConfigError("passphrase must be non-empty bytes", code="bad_passphrase")
            enc = serialization.BestAvailableEncryption(bytes(passphrase))
        return bytes(self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))

    def save(self, path: str | os.PathLike[str], passphrase: bytes | None, *, overwrite: bool = False) -> Path:
        """Write a PKCS#8 PEM key file with mode 0600, atomically (0600 temp file, then link/rename).

        Refuses to replace an existing file unless ``overwrite=True`` (then ``os.replace``).
        """
        target = Path(path)
        if not overwrite and (target.exists() or target.is_symlink()):
            raise ConfigError(f"key file {target} already exists", code="key_file_exists")
        pem = self.to_pem(passphrase)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(pem)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, target)
            else:
                try:
                    os.link(tmp, target)  # atomic and never replaces a file created meanwhile
                except FileExistsError:
                    raise ConfigError(f"key file {target} already exists", code="key_file_exists") from None
                except OSError:  # pragma: no cover - filesystems without hard links
                    if target.exists() or target.is_symlink():
                        raise ConfigError(f"key file {target} already exists", code="key_file_exists") from None
                    os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes | None) -> SigningKey:
        """Load a key file written by :meth:`save`.

        ConfigError ``insecure_key_file`` when group/others have any access, AuthError ``bad_passphrase``
        / ``passphrase_required`` for encryption problems, MalformedError for anything unparsable.
        """
        target = Path(path)
        try:
            fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise ConfigError(f"key file {target} not found", code="key_file_missing") from None
        except OSError as exc:
            raise ConfigError(f"cannot open key file {target}: {exc}", code="key_file_unreadable") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"key file {target} is not a regular file", code="insecure_key_file")
            if os.name == "posix" and st.st_mode & 0o077:
                raise ConfigError(
                    f"key file {target} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be accessible "
                    "by group or others (chmod 600)",
                    code="insecure_key_file",
                )
            if st.st_size > 64 * 1024:
                raise MalformedError(f"key file {target} is too large to be a key", code="malformed")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                pem = fh.read()
        finally:
            os.close(fd)
        return cls.from_pem(pem, passphrase)

    @classmethod
    def from_pem(cls, pem: bytes, passphrase: bytes | None) -> SigningKey:
        encrypted = b"ENCRYPTED PRIVATE KEY" in pem
        if encrypted and passphrase is None:
            raise AuthError("key file is encrypted: a passphrase is required", code="passphrase_required")
        if not encrypted and passphrase is not None:
            raise ConfigError("key file is not encrypted but a passphrase was given", code="key_not_encrypted")
        try:
            key = serialization.load_pem_private_key(pem, passphrase)
        except (ValueError, TypeError) as exc:
            if encrypted:
                raise AuthError("cannot decrypt key file: wrong passphrase", code="bad_passphrase") from None
            raise MalformedError(f"unparsable key file: {exc}", code="malformed") from None
        except UnsupportedAlgorithm as exc:
            raise MalformedError(f"unsupported key type in key file: {exc}", code="malformed") from None
        mod = load_mldsa()
        for spec in SIG_ALGORITHMS.values():
            priv_cls = getattr(mod, spec.class_prefix + "PrivateKey", None)
            if priv_cls is not None and isinstance(key, priv_cls):
                return cls(spec.name, key)
        raise MalformedError(f"key file holds a {type(key).__name__}, not an ML-DSA key", code="malformed")

    def __repr__(self) -> str:
        return f"SigningKey({self._alg}, {self.key_id[:16]}...)"
