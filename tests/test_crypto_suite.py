"""Suites, policy (downgrade refusal) and the primitive self-test."""

from __future__ import annotations

import itertools

import pytest

from qflare.crypto import suite as suite_mod
from qflare.crypto.suite import (
    DEFAULT_POLICY,
    DEFAULT_SUITE,
    HIGH_SUITE,
    KEM_ALGORITHMS,
    SIG_ALGORITHMS,
    Policy,
    Suite,
    require_primitives,
    sha256,
)
from qflare.errors import ConfigError, CryptoUnavailableError, MalformedError, PolicyError


def test_default_and_high_suites() -> None:
    assert Suite(sig="ML-DSA-65", kem="ML-KEM-768", x25519=True, aead="AES-256-GCM") == DEFAULT_SUITE
    assert Suite(sig="ML-DSA-87", kem="ML-KEM-1024", x25519=True) == HIGH_SUITE
    assert DEFAULT_SUITE.to_bytes() == bytes.fromhex("0102010101")
    assert HIGH_SUITE.to_bytes() == bytes.fromhex("0103020101")
    assert DEFAULT_SUITE.name == "v1:ML-DSA-65+ML-KEM-768+X25519+AES-256-GCM"


@pytest.mark.parametrize("sig,kem,hybrid", list(itertools.product(SIG_ALGORITHMS, KEM_ALGORITHMS, (True, False))))
def test_suite_wire_round_trip(sig: str, kem: str, hybrid: bool) -> None:
    s = Suite(sig=sig, kem=kem, x25519=hybrid)
    assert Suite.from_bytes(s.to_bytes()) == s


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "01020101",
        "010201010100",
        "0202010101",
        "0100010101",
        "0104010101",
        "0102000101",
        "0102030101",
        "0102010201",
        "0102010100",
        "0102010102",
    ],
)
def test_suite_from_bytes_refuses_unknown_or_non_canonical(raw: str) -> None:
    with pytest.raises(MalformedError) as exc:
        Suite.from_bytes(bytes.fromhex(raw))
    assert exc.value.code == "malformed"


@pytest.mark.parametrize(
    "kwargs", [{"sig": "ML-DSA-99"}, {"kem": "ML-KEM-512"}, {"aead": "ChaCha20"}, {"version": 2}, {"x25519": 1}]
)
def test_suite_constructor_refuses_unknown(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as exc:
        Suite(**kwargs)  # type: ignore[arg-type]
    assert exc.value.code == "unknown_algorithm"


def test_default_policy_accepts_default_and_high() -> None:
    assert DEFAULT_POLICY.check(DEFAULT_SUITE) is DEFAULT_SUITE
    DEFAULT_POLICY.check(HIGH_SUITE)
    DEFAULT_POLICY.check(Suite(sig="ML-DSA-87", kem="ML-KEM-768"))
    DEFAULT_POLICY.check(Suite(sig="ML-DSA-65", kem="ML-KEM-1024"))


def test_policy_refuses_weak_signature() -> None:
    with pytest.raises(PolicyError) as exc:
        DEFAULT_POLICY.check(Suite(sig="ML-DSA-44"))
    assert exc.value.code == "policy_violation"
    assert "ML-DSA-44" in exc.value.message


def test_policy_refuses_hybrid_off() -> None:
    with pytest.raises(PolicyError) as exc:
        DEFAULT_POLICY.check(Suite(x25519=False))
    assert exc.value.code == "policy_violation"
    assert "X25519" in exc.value.message


def test_policy_names_every_violation() -> None:
    strict = Policy(min_sig_level=5, min_kem_level=5, require_hybrid=True)
    with pytest.raises(PolicyError) as exc:
        strict.check(Suite(sig="ML-DSA-44", kem="ML-KEM-768", x25519=False))
    msg = exc.value.message
    assert "ML-DSA-44" in msg and "ML-KEM-768" in msg and "X25519" in msg
    assert strict.allows(HIGH_SUITE) and not strict.allows(DEFAULT_SUITE)


def test_policy_versions_and_aeads() -> None:
    assert not Policy(accepted_versions=frozenset({2})).allows(DEFAULT_SUITE)
    assert not Policy(accepted_aeads=frozenset()).allows(DEFAULT_SUITE)
    assert Policy(require_hybrid=False).allows(Suite(x25519=False))


def test_require_primitives_passes_and_caches() -> None:
    require_primitives()
    require_primitives(DEFAULT_SUITE)
    assert DEFAULT_SUITE in suite_mod._checked


def test_require_primitives_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm

    def broken(_s: Suite) -> None:
        raise UnsupportedAlgorithm("ML-DSA not supported by this backend")

    monkeypatch.setattr(suite_mod, "_checked", set())
    monkeypatch.setattr(suite_mod, "_self_test", broken)
    with pytest.raises(CryptoUnavailableError) as exc:
        require_primitives(HIGH_SUITE)
    assert exc.value.code == "crypto_unavailable"
    assert "no fallback" in exc.value.message


def test_sha256_known_answer() -> None:
    assert sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256(b"a", b"bc") == sha256(b"abc")
