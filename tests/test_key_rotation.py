"""Coordinator key rotation records: one encoding, both signatures required, chain rules, totality."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflare.crypto import SigningKey
from qflare.crypto.rotation import (
    GENESIS_HASH,
    MAX_CHAIN_RECORDS,
    REVOCATION_CONTEXT,
    ROTATION_NEW_CONTEXT,
    ROTATION_OLD_CONTEXT,
    KeyRevocation,
    KeyRotation,
    follow_chain,
    ledger_embedding,
    parse_record,
    sign_revocation,
    sign_rotation,
    verify_chain,
)
from qflare.crypto.suite import sha256
from qflare.errors import ConfigError, QflareError

K = [SigningKey.from_seed("ML-DSA-65", bytes([i]) * 32) for i in range(1, 5)]
T = 1_700_000_000


def rotation(old: SigningKey, new: SigningKey, seq: int = 1, prev: bytes = GENESIS_HASH, **kw: object) -> KeyRotation:
    return sign_rotation(old, new, sequence=seq, prev_hash=prev, timestamp=T, **kw)  # type: ignore[arg-type]


def revocation(signer: SigningKey, key_id: str, seq: int, prev: bytes, reason: str = "compromised") -> KeyRevocation:
    return sign_revocation(signer, key_id, sequence=seq, prev_hash=prev, timestamp=T, reason=reason)


def forged_rotation(
    old_signer: SigningKey | None, new_signer: SigningKey | None, old: SigningKey, new: SigningKey
) -> bytes:
    """A rotation body old -> new whose signatures are made by the given signers (garbage when None)."""
    good = rotation(old, new, reason="forged")
    sig_len = len(good.old_signature)
    old_sig = old_signer.sign(good.body, ROTATION_OLD_CONTEXT) if old_signer else bytes(sig_len)
    new_sig = new_signer.sign(good.body, ROTATION_NEW_CONTEXT) if new_signer else bytes(sig_len)
    return good.body + old_sig + new_sig


def test_rotation_roundtrip_and_layout() -> None:
    rec = rotation(K[0], K[1], reason="scheduled über")
    again = parse_record(rec.raw)
    assert isinstance(again, KeyRotation) and again.verify() is again
    assert (again.sequence, again.timestamp, again.prev_hash) == (1, T, GENESIS_HASH)
    assert again.old_key == K[0].public and again.new_key == K[1].public and again.reason == "scheduled über"
    pub, sig = 1952, 3309
    reason = "scheduled über".encode()
    assert len(rec.raw) == 55 + 2 * (32 + pub) + 1 + len(reason) + 2 * sig
    assert rec.raw[:7] == b"QFKR\x01\x01\x02"
    assert struct.unpack(">QQ", rec.raw[7:23]) == (1, T)
    assert rec.raw[55:87] == K[0].key_id_bytes and rec.raw[87 + pub : 119 + pub] == K[1].key_id_bytes
    assert rec.body == rec.raw[: 120 + 2 * pub + len(reason)]
    K[0].public.verify(rec.old_signature, rec.body, ROTATION_OLD_CONTEXT)
    K[1].public.verify(rec.new_signature, rec.body, ROTATION_NEW_CONTEXT)
    emb = ledger_embedding(rec.raw)
    assert (emb.kind, emb.sequence, emb.canonical, emb.sha256) == ("key_rotation", 1, rec.raw, sha256(rec.raw).hex())


def test_revocation_roundtrip() -> None:
    r1 = rotation(K[0], K[1])
    rev = revocation(K[1], K[0].key_id, 2, r1.digest)
    again = parse_record(rev.raw)
    assert isinstance(again, KeyRevocation)
    assert (again.revoked_key_id, again.signer_key_id, again.reason) == (K[0].key_id, K[1].key_id, "compromised")
    again.verify(K[1].public)
    K[1].public.verify(rev.signature, rev.body, REVOCATION_CONTEXT)
    assert ledger_embedding(rev).kind == "key_revocation"
    with pytest.raises(QflareError) as info:
        again.verify(K[0].public)  # not the signer it names
    assert info.value.code == "bad_rotation_signature"


@pytest.mark.parametrize("kind", ["rotation", "revocation"])
def test_every_byte_flipped_is_refused(kind: str) -> None:
    r1 = rotation(K[0], K[1])
    rec: KeyRotation | KeyRevocation = r1 if kind == "rotation" else revocation(K[1], K[0].key_id, 2, r1.digest)
    chain = [r1.raw] if kind == "rotation" else [r1.raw, rec.raw]
    verify_chain(chain)
    # every byte the signatures cover, and the signatures at a stride (each flip there is a bad signature)
    positions = [*range(len(rec.body)), *range(len(rec.body), len(rec.raw), 53), len(rec.raw) - 1]
    for pos in positions:
        bad = bytearray(rec.raw)
        bad[pos] ^= 0x01
        with pytest.raises(QflareError) as info:
            verify_chain([*chain[:-1], bytes(bad)])
        assert info.value.code in {"bad_rotation_record", "bad_rotation_signature", "rotation_chain_broken"}, pos
        if pos >= len(rec.body):
            assert info.value.code == "bad_rotation_signature", pos


def test_truncation_and_trailing_bytes_are_malformed() -> None:
    raw = rotation(K[0], K[1]).raw
    for bad in (b"", raw[:10], raw[:-1], raw + b"\x00", b"QFKR\x02" + raw[5:], "text", None):
        with pytest.raises(QflareError) as info:
            parse_record(bad)  # type: ignore[arg-type]
        assert info.value.code == "bad_rotation_record"


def test_new_key_alone_or_old_key_alone_is_refused() -> None:
    for old_signer, new_signer in ((None, K[1]), (K[1], K[1]), (K[0], None), (K[0], K[0]), (None, None)):
        raw = forged_rotation(old_signer, new_signer, K[0], K[1])
        with pytest.raises(QflareError) as info:
            verify_chain([raw])
        assert info.value.code == "bad_rotation_signature"
    # the old key's signature made under the new key's context (and vice versa) does not count either
    good = rotation(K[0], K[1])
    swapped = good.body + K[0].sign(good.body, ROTATION_NEW_CONTEXT) + K[1].sign(good.body, ROTATION_OLD_CONTEXT)
    with pytest.raises(QflareError) as info:
        verify_chain([swapped])
    assert info.value.code == "bad_rotation_signature"


def test_rotation_mid_chain_verifies_and_devices_follow_from_their_pin() -> None:
    r1 = rotation(K[0], K[1])
    r2 = rotation(K[1], K[2], 2, r1.digest)
    r3 = revocation(K[2], K[0].key_id, 3, r2.digest)
    chain = [r1.raw, r2.raw, r3.raw]
    state = verify_chain(chain)
    assert state.current == K[2].public and state.keys == (K[0].public, K[1].public, K[2].public)
    assert state.revoked == {K[0].key_id} and state.next_sequence == 4 and state.head_hash == r3.digest
    for pin in (K[0], K[1], K[2]):  # a device pinned anywhere in the chain reaches the served key
        assert follow_chain(chain, pin.key_id, K[2].public).current == K[2].public
    assert follow_chain(chain, K[1].key_id, K[2].public, known=[r1.raw]).current == K[2].public


def test_continuity_is_required() -> None:
    r1 = rotation(K[0], K[1])
    cases = {
        "old key is not the previous new key": [r1.raw, rotation(K[0], K[2], 2, r1.digest).raw],
        "sequence gap": [r1.raw, rotation(K[1], K[2], 3, r1.digest).raw],
        "wrong previous hash": [r1.raw, rotation(K[1], K[2], 2, bytes(range(32))).raw],
        "reordered": [rotation(K[1], K[2], 2, r1.digest).raw, r1.raw],
        "revocation signed by a former key": [r1.raw, revocation(K[0], K[2].key_id, 2, r1.digest)],
        "revocation of a key outside the chain": [r1.raw, revocation(K[1], K[3].key_id, 2, r1.digest).raw],
        "revocation before any rotation": [revocation(K[1], K[0].key_id, 1, GENESIS_HASH).raw],
    }
    for name, chain in cases.items():
        with pytest.raises(QflareError) as info:
            verify_chain(chain)  # type: ignore[arg-type]
        assert info.value.code in {"rotation_chain_broken", "bad_rotation_signature", "bad_rotation_record"}, name
        if name != "revocation signed by a former key":
            assert info.value.code in {"rotation_chain_broken", "bad_rotation_record"}, name


def test_revoked_key_is_never_trusted_again() -> None:
    r1 = rotation(K[0], K[1])
    r2 = revocation(K[1], K[0].key_id, 2, r1.digest)
    # after its revocation the old key cannot rotate again (it is not current) nor be rotated back to
    with pytest.raises(QflareError) as info:
        verify_chain([r1.raw, r2.raw, rotation(K[0], K[2], 3, r2.digest).raw])
    assert info.value.code == "rotation_chain_broken"
    with pytest.raises(QflareError) as info:
        verify_chain([r1.raw, r2.raw, rotation(K[1], K[0], 3, r2.digest).raw])
    assert info.value.code == "coordinator_key_revoked"
    with pytest.raises(QflareError) as info:
        verify_chain([r1.raw, r2.raw, revocation(K[1], K[0].key_id, 3, r2.digest).raw])  # revoked twice
    assert info.value.code == "rotation_chain_broken"
    with pytest.raises(ConfigError):
        revocation(K[1], K[1].key_id, 2, r1.digest)  # the current key cannot revoke itself


def test_follow_chain_refusals() -> None:
    r1 = rotation(K[0], K[1])
    r2 = rotation(K[1], K[2], 2, r1.digest)
    fork = rotation(K[0], K[3])  # a different history from the same first key
    cases = {
        "pin not in chain": ([r1.raw, r2.raw], K[3].key_id, K[2], ()),
        "served key is not the chain's end": ([r1.raw, r2.raw], K[0].key_id, K[1], ()),
        "does not extend the known chain": ([r1.raw, r2.raw], K[0].key_id, K[2], (fork.raw,)),
        "shorter than the known chain": ([r1.raw], K[0].key_id, K[1], (r1.raw, r2.raw)),
    }
    for name, (chain, pin, served, known) in cases.items():
        with pytest.raises(QflareError) as info:
            follow_chain(chain, pin, served.public, known=known)
        assert info.value.code == "rotation_chain_broken", name
    with pytest.raises(QflareError) as info:
        verify_chain([r1.raw] * (MAX_CHAIN_RECORDS + 1))
    assert info.value.code == "bad_rotation_record"


def test_signing_refuses_misuse() -> None:
    with pytest.raises(ConfigError):
        rotation(K[0], K[0])
    with pytest.raises(ConfigError):
        rotation(K[0], SigningKey.generate("ML-DSA-44"))
    with pytest.raises(ConfigError):
        rotation(K[0], K[1], reason="x" * 201)
    with pytest.raises(ConfigError):
        rotation(K[0], K[1], reason="line\nbreak")
    with pytest.raises(ConfigError):
        rotation(K[0], K[1], seq=0)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_GOOD = rotation(K[0], K[1], reason="fuzz")


@FUZZ
@given(st.binary(max_size=400))
def test_parse_is_total_on_random_bytes(data: bytes) -> None:
    for candidate in (data, b"QFKR\x01" + data, _GOOD.raw[:55] + data):
        with contextlib.suppress(QflareError):
            verify_chain([candidate])


@FUZZ
@given(st.integers(0, len(_GOOD.raw) - 1), st.integers(1, 255), st.integers(-5, 5))
def test_mutated_records_are_refused_with_a_code(pos: int, xor: int, cut: int) -> None:
    bad = bytearray(_GOOD.raw)
    bad[pos] ^= xor
    data = bytes(bad)[: len(bad) + cut] if cut < 0 else bytes(bad) + bytes(cut)
    with pytest.raises(QflareError) as info:
        verify_chain([data])
    assert info.value.code in {"bad_rotation_record", "bad_rotation_signature"}


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=12,
    )
)
def test_device_side_is_total_on_any_json(doc: object) -> None:
    from qflare.device.rekey import _records
    from qflare.device.state import served_key

    for candidate in (doc, {"records": doc}, {"alg": "ML-DSA-65", "public_key": doc}):
        with contextlib.suppress(QflareError):
            _records(candidate)
        with contextlib.suppress(QflareError):
            served_key(candidate)  # type: ignore[arg-type]
