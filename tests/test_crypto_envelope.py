"""Canonical signed envelopes: round trips, strict parsing, tampering."""

from __future__ import annotations

import struct

import pytest

from qflare.crypto.envelope import (
    FIELD_SPECS,
    HEADER_LEN,
    SCHEMAS,
    Field,
    MsgType,
    SignedEnvelope,
    context_for,
    decode_fields,
    encode_fields,
    u64,
)
from qflare.crypto.identity import SigningKey
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Suite
from qflare.errors import BadSignatureError, ConfigError, MalformedError, OversizeError, QflareError


def sample_fields(mt: MsgType, suite: Suite) -> dict[Field, bytes]:
    out: dict[Field, bytes] = {}
    for i, tag in enumerate(SCHEMAS[mt]):
        spec = FIELD_SPECS[tag]
        n = spec.size_of(suite) if spec.size_of else spec.size if spec.size is not None else 17
        out[tag] = bytes((i * 7 + j) & 0xFF for j in range(n))
    return out


KEYS = {s: SigningKey.generate(s.sig) for s in (DEFAULT_SUITE, HIGH_SUITE)}


def make(mt: MsgType, suite: Suite = DEFAULT_SUITE) -> SignedEnvelope:
    fields = sample_fields(mt, suite)
    return SignedEnvelope.sign(suite, mt, fields, KEYS[suite])


@pytest.mark.parametrize("suite", [DEFAULT_SUITE, HIGH_SUITE], ids=lambda s: s.sig)
@pytest.mark.parametrize("mt", list(MsgType), ids=lambda m: m.name)
def test_round_trip_every_message(mt: MsgType, suite: Suite) -> None:
    env = make(mt, suite)
    raw = env.to_bytes()
    parsed = SignedEnvelope.parse(raw, expected_type=mt)
    assert parsed == env
    assert dict(parsed.fields) == sample_fields(mt, suite)
    assert parsed.suite == suite and parsed.msg_type is mt
    assert raw[:3] == b"QFL" and raw[3] == 1 and raw[4:9] == suite.to_bytes() and raw[9] == mt
    parsed.verify(KEYS[suite].public)
    assert SignedEnvelope.open(raw, KEYS[suite].public, expected_type=mt) == env
    assert raw[len(env.body) : len(env.body) + 4] == struct.pack(">I", suite.sig_alg.signature_len)
    assert decode_fields(mt, raw[HEADER_LEN : len(env.body)], suite) == sample_fields(mt, suite)


def test_contexts_are_distinct() -> None:
    ctxs = {context_for(mt) for mt in MsgType}
    assert len(ctxs) == len(MsgType)
    assert context_for(MsgType.UPDATE) == b"qflare/v1/update"


def test_encode_fields_checks() -> None:
    fields = sample_fields(MsgType.UPDATE, DEFAULT_SUITE)
    for bad in (
        {k: v for k, v in fields.items() if k is not Field.ROUND},
        {**fields, Field.STATUS: b"\x00"},
        {**fields, Field.ROUND: b"\x00" * 7},
    ):
        with pytest.raises(ConfigError):
            encode_fields(MsgType.UPDATE, bad, DEFAULT_SUITE)
    hello = sample_fields(MsgType.CLIENT_HELLO, DEFAULT_SUITE)
    with pytest.raises(ConfigError):  # the hello's timestamp is required
        SignedEnvelope.sign(
            DEFAULT_SUITE,
            MsgType.CLIENT_HELLO,
            {k: v for k, v in hello.items() if k is not Field.TIMESTAMP},
            KEYS[DEFAULT_SUITE],
        )
    with pytest.raises(ConfigError) as exc:
        SignedEnvelope.sign(DEFAULT_SUITE, MsgType.UPDATE, fields, KEYS[HIGH_SUITE])
    assert exc.value.code == "key_alg_mismatch"
    with pytest.raises(ConfigError):
        u64(2**64)


def test_every_truncation_is_truncated() -> None:
    raw = make(MsgType.CLIENT_FINISH).to_bytes()
    for n in range(len(raw)):
        with pytest.raises(MalformedError) as exc:
            SignedEnvelope.parse(raw[:n])
        assert exc.value.code == "truncated", n


def test_trailing_bytes_refused() -> None:
    for mt in (MsgType.CLIENT_FINISH, MsgType.CLIENT_HELLO):
        with pytest.raises(MalformedError) as exc:
            SignedEnvelope.parse(make(mt).to_bytes() + b"\x00")
        assert exc.value.code == "malformed"


def _tlv(tag: int, value: bytes) -> bytes:
    return struct.pack(">BI", tag, len(value)) + value


def _header(mt: MsgType) -> bytes:
    return b"QFL\x01" + DEFAULT_SUITE.to_bytes() + bytes([mt])


def test_unknown_duplicate_and_misordered_tags() -> None:
    kid, th = b"\x01" * 32, b"\x02" * 32
    sig = struct.pack(">I", 3309) + b"\x00" * 3309
    good = _header(MsgType.CLIENT_FINISH) + _tlv(Field.DEVICE_KEY_ID, kid) + _tlv(Field.TRANSCRIPT_HASH, th) + sig
    SignedEnvelope.parse(good)  # structurally fine
    cases = {
        "unknown": _header(MsgType.CLIENT_FINISH) + _tlv(0x7F, kid) + _tlv(Field.TRANSCRIPT_HASH, th) + sig,
        "foreign": _header(MsgType.CLIENT_FINISH) + _tlv(Field.ROUND, kid) + _tlv(Field.TRANSCRIPT_HASH, th) + sig,
        "duplicate": _header(MsgType.CLIENT_FINISH)
        + _tlv(Field.DEVICE_KEY_ID, kid)
        + _tlv(Field.DEVICE_KEY_ID, kid)
        + sig,
        "order": _header(MsgType.CLIENT_FINISH)
        + _tlv(Field.TRANSCRIPT_HASH, th)
        + _tlv(Field.DEVICE_KEY_ID, kid)
        + sig,
        "length": _header(MsgType.CLIENT_FINISH)
        + _tlv(Field.DEVICE_KEY_ID, kid + b"\x00")
        + _tlv(Field.TRANSCRIPT_HASH, th)
        + sig,
        "huge_length": _header(MsgType.CLIENT_FINISH) + struct.pack(">BI", Field.DEVICE_KEY_ID, 0xFFFFFFFF) + kid,
        "sig_length": _header(MsgType.CLIENT_FINISH)
        + _tlv(Field.DEVICE_KEY_ID, kid)
        + _tlv(Field.TRANSCRIPT_HASH, th)
        + struct.pack(">I", 3308)
        + b"\x00" * 3308,
        "magic": b"QFX\x01" + good[4:],
        "version": b"QFL\x02" + good[4:],
        "suite": b"QFL\x01" + bytes.fromhex("0109010101") + good[9:],
        "msg_type": good[:9] + b"\x7f" + good[10:],
    }
    for name, raw in cases.items():
        with pytest.raises(MalformedError) as exc:
            SignedEnvelope.parse(raw)
        assert exc.value.code == "malformed", name
    dup_rest = _header(MsgType.CLIENT_FINISH) + _tlv(Field.DEVICE_KEY_ID, kid) + _tlv(Field.DEVICE_KEY_ID, kid)
    with pytest.raises(MalformedError, match="duplicate"):
        SignedEnvelope.parse(dup_rest + sig)


def test_every_byte_region_tampered_is_refused_with_reason() -> None:
    env = make(MsgType.UPDATE)
    raw = env.to_bytes()
    key = KEYS[DEFAULT_SUITE].public
    sig_start = len(env.body) + 4
    positions = list(range(sig_start)) + list(range(sig_start, len(raw), 97)) + [len(raw) - 1]
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(QflareError) as exc:
            SignedEnvelope.open(bytes(bad), key, expected_type=MsgType.UPDATE)
        if pos < HEADER_LEN:
            # a flipped suite byte may still name a valid suite: then the signature (which covers it) fails
            allowed = {"malformed", "unexpected_message"} | ({"bad_signature"} if 4 <= pos < 9 else set())
            assert exc.value.code in allowed, pos
        elif pos < len(env.body):
            # value bytes are covered by the signature; tag/length bytes break the structure first
            assert exc.value.code in {"bad_signature", "malformed", "truncated"}, pos
        elif pos < sig_start:
            assert exc.value.code in {"malformed"}, pos
        else:
            assert isinstance(exc.value, BadSignatureError) and exc.value.code == "bad_signature", pos


def test_each_field_value_is_signed() -> None:
    env = make(MsgType.UPDATE)
    key = KEYS[DEFAULT_SUITE].public
    pos = HEADER_LEN
    for tag in SCHEMAS[MsgType.UPDATE]:
        n = len(env.fields[tag])
        bad = bytearray(env.to_bytes())
        bad[pos + 5 + n - 1] ^= 0xFF
        with pytest.raises(BadSignatureError) as exc:
            SignedEnvelope.open(bytes(bad), key, expected_type=MsgType.UPDATE)
        assert exc.value.code == "bad_signature", tag.name
        pos += 5 + n


def test_wrong_key_and_wrong_alg() -> None:
    raw = make(MsgType.GLOBAL_MODEL).to_bytes()
    with pytest.raises(BadSignatureError) as exc:
        SignedEnvelope.open(raw, SigningKey.generate().public, expected_type=MsgType.GLOBAL_MODEL)
    assert exc.value.code == "bad_signature"
    with pytest.raises(BadSignatureError) as exc:  # a key of another algorithm cannot verify it either
        SignedEnvelope.open(raw, KEYS[HIGH_SUITE].public, expected_type=MsgType.GLOBAL_MODEL)
    assert exc.value.code == "bad_signature"


def test_expected_type_and_oversize() -> None:
    raw = make(MsgType.GLOBAL_MODEL).to_bytes()
    with pytest.raises(MalformedError) as exc:
        SignedEnvelope.parse(raw, expected_type=MsgType.UPDATE)
    assert exc.value.code == "unexpected_message"
    with pytest.raises(OversizeError) as exc2:
        SignedEnvelope.parse(raw, max_size=len(raw) - 1)
    assert exc2.value.code == "oversized"
    SignedEnvelope.parse(raw, max_size=len(raw))


def test_signature_does_not_transfer_between_types() -> None:
    # Same field layout, different type byte: the per-type context (and header) keep them apart.
    key = KEYS[DEFAULT_SUITE]
    fin = SignedEnvelope.sign(
        DEFAULT_SUITE, MsgType.CLIENT_FINISH, sample_fields(MsgType.CLIENT_FINISH, DEFAULT_SUITE), key
    )
    with pytest.raises(BadSignatureError):
        key.public.verify(fin.signature, fin.body, context_for(MsgType.UPDATE))


def test_decode_fields_strict() -> None:
    fields = sample_fields(MsgType.GLOBAL_MODEL, DEFAULT_SUITE)
    enc = encode_fields(MsgType.GLOBAL_MODEL, fields, DEFAULT_SUITE)
    assert decode_fields(MsgType.GLOBAL_MODEL, enc, DEFAULT_SUITE) == fields
    with pytest.raises(MalformedError):
        decode_fields(MsgType.GLOBAL_MODEL, enc + b"\x00", DEFAULT_SUITE)
    with pytest.raises(MalformedError) as exc:
        decode_fields(MsgType.GLOBAL_MODEL, enc[:-1], DEFAULT_SUITE)
    assert exc.value.code == "truncated"
    with pytest.raises(MalformedError):
        decode_fields(0x99, enc, DEFAULT_SUITE)  # type: ignore[arg-type]


def test_non_bytes_input() -> None:
    with pytest.raises(MalformedError):
        SignedEnvelope.parse("QFL")  # type: ignore[arg-type]


def test_optional_metadata_field() -> None:
    key = KEYS[DEFAULT_SUITE]
    full = sample_fields(MsgType.UPDATE, DEFAULT_SUITE)
    bare = {k: v for k, v in full.items() if k is not Field.METADATA}
    with_meta = SignedEnvelope.sign(DEFAULT_SUITE, MsgType.UPDATE, full, key)
    without = SignedEnvelope.sign(DEFAULT_SUITE, MsgType.UPDATE, bare, key)
    assert len(with_meta.body) == len(without.body) + 5 + len(full[Field.METADATA])
    assert with_meta.body.startswith(without.body)  # metadata sits last, after PAYLOAD_SIZE
    p1 = SignedEnvelope.open(with_meta.to_bytes(), key.public, expected_type=MsgType.UPDATE)
    p2 = SignedEnvelope.open(without.to_bytes(), key.public, expected_type=MsgType.UPDATE)
    assert p1.fields[Field.METADATA] == full[Field.METADATA] and Field.METADATA not in p2.fields
    # stripping the metadata from a signed update breaks the signature
    stripped = without.body + with_meta.to_bytes()[len(with_meta.body) :]
    with pytest.raises(BadSignatureError):
        SignedEnvelope.open(stripped, key.public, expected_type=MsgType.UPDATE)
    # a duplicated optional field is refused
    dup = with_meta.body + with_meta.body[len(without.body) :]
    with pytest.raises(MalformedError):
        SignedEnvelope.parse(dup + with_meta.to_bytes()[len(with_meta.body) :])
    with pytest.raises(ConfigError):  # only UPDATE takes it
        encode_fields(
            MsgType.GLOBAL_MODEL,
            {**sample_fields(MsgType.GLOBAL_MODEL, DEFAULT_SUITE), Field.METADATA: b"x"},
            DEFAULT_SUITE,
        )
    for bad_len in (0, 4097):
        with pytest.raises(ConfigError):
            encode_fields(MsgType.UPDATE, {**bare, Field.METADATA: b"x" * bad_len}, DEFAULT_SUITE)


def test_every_truncation_of_update_is_truncated() -> None:
    for env in (make(MsgType.UPDATE), make(MsgType.CLIENT_HELLO)):
        raw = env.to_bytes()
        for n in range(0, len(raw), 7):
            with pytest.raises(MalformedError) as exc:
                SignedEnvelope.parse(raw[:n])
            assert exc.value.code == "truncated", n
