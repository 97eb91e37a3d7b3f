"""ML-DSA identities and key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.suite import SIG_ALGORITHMS, sha256
from qflare.errors import AuthError, BadSignatureError, ConfigError, MalformedError

CTX = b"qflare/v1/update"


@pytest.mark.parametrize("alg", list(SIG_ALGORITHMS))
def test_sign_verify_and_key_id(alg: str) -> None:
    key = SigningKey.generate(alg)
    assert key.alg == alg and key.public.alg == alg
    assert len(key.public.raw) == SIG_ALGORITHMS[alg].public_len
    assert key.key_id == key.public.key_id == sha256(key.public.raw).hex()
    sig = key.sign(b"data", CTX)
    assert len(sig) == SIG_ALGORITHMS[alg].signature_len
    key.public.verify(sig, b"data", CTX)
    again = VerifyKey.from_bytes(alg, key.public.raw)
    assert again == key.public and hash(again) == hash(key.public)
    again.verify(sig, b"data", CTX)


def test_default_alg_is_ml_dsa_65() -> None:
    assert SigningKey.generate().alg == "ML-DSA-65"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s, d, c: (s, d + b"!", c),
        lambda s, d, c: (s, d, b"qflare/v1/global-model"),
        lambda s, d, c: (bytes([s[0] ^ 1]) + s[1:], d, c),
        lambda s, d, c: (s[:-1] + bytes([s[-1] ^ 0x80]), d, c),
        lambda s, d, c: (s[:-1], d, c),
        lambda s, d, c: (b"", d, c),
    ],
)
def test_verify_refuses_tampering(mutate) -> None:  # type: ignore[no-untyped-def]
    key = SigningKey.generate()
    sig, data, ctx = mutate(key.sign(b"data", CTX), b"data", CTX)
    with pytest.raises(BadSignatureError) as exc:
        key.public.verify(sig, data, ctx)
    assert exc.value.code == "bad_signature"


def test_verify_with_other_key_fails() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(BadSignatureError):
        b.public.verify(a.sign(b"x", CTX), b"x", CTX)


@pytest.mark.parametrize("ctx", [b"", b"x" * 256])
def test_context_bounds(ctx: bytes) -> None:
    with pytest.raises(ConfigError):
        SigningKey.generate().sign(b"x", ctx)


@pytest.mark.parametrize("raw_len", [0, 1, 1951, 1953, 2592])
def test_verify_key_wrong_length(raw_len: int) -> None:
    with pytest.raises(MalformedError) as exc:
        VerifyKey.from_bytes("ML-DSA-65", bytes(raw_len))
    assert exc.value.code == "malformed"


def test_unknown_alg() -> None:
    with pytest.raises(ConfigError):
        SigningKey.generate("ML-DSA-99")
    with pytest.raises(ConfigError):
        VerifyKey.from_bytes("RSA", b"x")


def test_from_seed_is_deterministic() -> None:
    seed = bytes(range(32))
    a, b = SigningKey.from_seed("ML-DSA-65", seed), SigningKey.from_seed("ML-DSA-65", seed)
    assert a.public == b.public and a.unsafe_seed_bytes() == seed
    assert SigningKey.from_seed("ML-DSA-87", seed).key_id != a.key_id
    with pytest.raises(ConfigError) as exc:
        SigningKey.from_seed("ML-DSA-65", bytes(31))
    assert exc.value.code == "bad_seed"


# -- key files ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("passphrase", [None, b"correct horse battery staple"])
def test_save_load_round_trip_mode_0600(tmp_path: Path, passphrase: bytes | None) -> None:
    key = SigningKey.generate("ML-DSA-87")
    path = key.save(tmp_path / "device.pem", passphrase)
    assert _mode(path) == 0o600
    text = path.read_bytes()
    assert (b"ENCRYPTED PRIVATE KEY" in text) == (passphrase is not None)
    loaded = SigningKey.load(path, passphrase)
    assert loaded.alg == "ML-DSA-87" and loaded.public == key.public
    assert loaded.unsafe_seed_bytes() == key.unsafe_seed_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["device.pem"]  # no temp file left behind


def test_save_is_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = SigningKey.generate().save(tmp_path / "k.pem", None)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = SigningKey.generate().save(tmp_path / "k.pem", None)
    with pytest.raises(ConfigError) as exc:
        SigningKey.generate().save(path, None)
    assert exc.value.code == "key_file_exists"
    new = SigningKey.generate()
    new.save(path, None, overwrite=True)
    assert SigningKey.load(path, None).public == new.public and _mode(path) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610])
def test_load_refuses_insecure_mode(tmp_path: Path, mode: int) -> None:
    path = SigningKey.generate().save(tmp_path / "k.pem", None)
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as exc:
        SigningKey.load(path, None)
    assert exc.value.code == "insecure_key_file"


def test_load_accepts_0400(tmp_path: Path) -> None:
    path = SigningKey.generate().save(tmp_path / "k.pem", None)
    os.chmod(path, 0o400)
    SigningKey.load(path, None)


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = SigningKey.generate().save(tmp_path / "k.pem", b"right")
    with pytest.raises(AuthError) as exc:
        SigningKey.load(path, b"wrong")
    assert exc.value.code == "bad_passphrase"
    with pytest.raises(AuthError) as exc:
        SigningKey.load(path, None)
    assert exc.value.code == "passphrase_required"


def test_passphrase_for_plain_file(tmp_path: Path) -> None:
    path = SigningKey.generate().save(tmp_path / "k.pem", None)
    with pytest.raises(ConfigError) as exc:
        SigningKey.load(path, b"pw")
    assert exc.value.code == "key_not_encrypted"


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SigningKey.generate().save(tmp_path / "k.pem", b"")


def _write_0600(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def test_corrupt_and_foreign_key_files(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    bad = _write_0600(tmp_path / "bad.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(MalformedError):
        SigningKey.load(bad, None)
    pem = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    foreign = _write_0600(tmp_path / "x.pem", pem)
    with pytest.raises(MalformedError):
        SigningKey.load(foreign, None)


def test_missing_and_symlinked_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        SigningKey.load(tmp_path / "nope.pem", None)
    assert exc.value.code == "key_file_missing"
    real = SigningKey.generate().save(tmp_path / "real.pem", None)
    link = tmp_path / "link.pem"
    link.symlink_to(real)
    with pytest.raises(ConfigError):
        SigningKey.load(link, None)
