"""Hybrid ML-KEM + X25519 key establishment and the HKDF key schedule."""

from __future__ import annotations

import pytest

from qflare.crypto.kem import (
    EphemeralKem,
    Role,
    SharedSecrets,
    derive_session_keys,
    encapsulate,
    kem_ciphertext_len,
    kem_public_len,
)
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Suite
from qflare.errors import ConfigError, MalformedError

SUITES = [DEFAULT_SUITE, HIGH_SUITE, Suite(x25519=False), Suite(kem="ML-KEM-1024", x25519=False)]
TH = bytes(range(32))


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_round_trip(suite: Suite) -> None:
    kem = EphemeralKem.generate(suite)
    pub = kem.public_bytes()
    assert len(pub) == kem_public_len(suite)
    ct, sender = encapsulate(suite, pub)
    assert len(ct) == kem_ciphertext_len(suite)
    receiver = kem.decapsulate(ct)
    assert receiver == sender
    assert len(sender.mlkem) == 32
    assert (sender.x25519 is not None) == suite.x25519
    c = derive_session_keys(receiver, TH, Role.CLIENT)
    s = derive_session_keys(sender, TH, Role.SERVER)
    assert c.session_id == s.session_id
    assert c.send_key == s.recv_key and c.recv_key == s.send_key
    assert len({c.c2s, c.s2c, c.session_id}) == 3


def test_fresh_ephemerals_each_time() -> None:
    a, b = EphemeralKem.generate(DEFAULT_SUITE), EphemeralKem.generate(DEFAULT_SUITE)
    assert a.public_bytes() != b.public_bytes()
    ct1, s1 = encapsulate(DEFAULT_SUITE, a.public_bytes())
    ct2, s2 = encapsulate(DEFAULT_SUITE, a.public_bytes())
    assert ct1 != ct2 and s1 != s2


def test_key_schedule_is_deterministic_and_binds_every_input() -> None:
    ss = SharedSecrets(b"\x01" * 32, b"\x02" * 32)
    base = derive_session_keys(ss, TH, "client")
    assert derive_session_keys(ss, TH, Role.CLIENT) == base
    variants = [
        derive_session_keys(SharedSecrets(b"\x03" * 32, b"\x02" * 32), TH, Role.CLIENT),  # ML-KEM secret
        derive_session_keys(SharedSecrets(b"\x01" * 32, b"\x04" * 32), TH, Role.CLIENT),  # X25519 secret
        derive_session_keys(SharedSecrets(b"\x01" * 32, None), TH, Role.CLIENT),  # hybrid off
        derive_session_keys(ss, bytes(32), Role.CLIENT),  # transcript
    ]
    for v in variants:
        assert v.c2s != base.c2s and v.s2c != base.s2c and v.session_id != base.session_id
    assert "01" * 8 not in repr(ss)  # secrets are not printed


def test_key_schedule_argument_checks() -> None:
    ss = SharedSecrets(b"\x01" * 32, None)
    with pytest.raises(ConfigError):
        derive_session_keys(ss, b"short", Role.CLIENT)
    with pytest.raises(ConfigError):
        derive_session_keys(ss, TH, "observer")


@pytest.mark.parametrize("delta", [-1, 1, -32])
def test_encapsulate_refuses_wrong_length(delta: int) -> None:
    pub = EphemeralKem.generate(DEFAULT_SUITE).public_bytes()
    bad = pub[:delta] if delta < 0 else pub + b"\x00" * delta
    with pytest.raises(MalformedError):
        encapsulate(DEFAULT_SUITE, bad)


def test_encapsulate_refuses_low_order_x25519() -> None:
    pub = EphemeralKem.generate(DEFAULT_SUITE).public_bytes()
    with pytest.raises(MalformedError) as exc:
        encapsulate(DEFAULT_SUITE, pub[:-32] + bytes(32))
    assert exc.value.code == "bad_kem_share"


def test_decapsulate_refuses_wrong_length_and_low_order() -> None:
    kem = EphemeralKem.generate(DEFAULT_SUITE)
    ct, _ = encapsulate(DEFAULT_SUITE, kem.public_bytes())
    for bad in (ct[:-1], ct + b"\x00", b""):
        with pytest.raises(MalformedError):
            kem.decapsulate(bad)
    with pytest.raises(MalformedError) as exc:
        kem.decapsulate(ct[:-32] + bytes(32))
    assert exc.value.code == "bad_kem_share"


def test_forged_mlkem_ciphertext_gives_unrelated_secret() -> None:
    kem = EphemeralKem.generate(DEFAULT_SUITE)
    ct, secrets = encapsulate(DEFAULT_SUITE, kem.public_bytes())
    forged = bytes([ct[0] ^ 1]) + ct[1:]
    got = kem.decapsulate(forged)  # implicit rejection: no error, different secret
    assert got.mlkem != secrets.mlkem and got.x25519 == secrets.x25519


def test_unsafe_from_seeds_is_deterministic() -> None:
    a = EphemeralKem.unsafe_from_seeds(DEFAULT_SUITE, bytes(64), b"\x09" * 32)
    b = EphemeralKem.unsafe_from_seeds(DEFAULT_SUITE, bytes(64), b"\x09" * 32)
    assert a.public_bytes() == b.public_bytes()
    with pytest.raises(ConfigError):
        EphemeralKem.unsafe_from_seeds(DEFAULT_SUITE, bytes(63), b"\x09" * 32)
    with pytest.raises(ConfigError):
        EphemeralKem.unsafe_from_seeds(DEFAULT_SUITE, bytes(64), None)  # hybrid suite needs X25519
