"""Secure-aggregation wire formats: one valid encoding, signatures bound by context, every byte flipped."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_fixtures import advertise, identity, make_config, share, start

from qflare.crypto.suite import sha256
from qflare.errors import ConfigError, ErrorCode, QflareError
from qflare.secagg.messages import (
    HEADER_LEN,
    SecAggField,
    SecAggMessage,
    SecAggMsg,
    context_for,
    decode_entries,
    decode_indices,
    encode_indices,
)

F = SecAggField


@pytest.fixture(scope="module")
def samples() -> dict[SecAggMsg, tuple[bytes, object]]:
    """One real message of each type, with the key that verifies it (a digest for the unsigned SHARE)."""
    r = start(make_config(3, 2, 2, length=8))
    advertise(r)
    share(r)
    manifest, entry = r.server.shares_for(1)[0]
    env, blob = r.clients[1].masked_input(r.server.shares_for(1), np.zeros(8), 1)
    r.server.receive_masked(env, blob)
    out: dict[SecAggMsg, tuple[bytes, object]] = {
        SecAggMsg.ADVERTISE: (r.server.adverts_for(2)[0], identity(1).public),
        SecAggMsg.MANIFEST: (manifest, identity(2).public),
        SecAggMsg.SHARE: (entry, sha256(entry)),
        SecAggMsg.MASKED_INPUT: (env, identity(1).public),
    }
    for i in (2, 3):
        x, w = r.inputs[i]
        r.server.receive_masked(*r.clients[i].masked_input(r.server.shares_for(i), x, w))
    request = r.server.close_masked()
    out[SecAggMsg.UNMASK_REQUEST] = (request, identity(0).public)
    for i in (1, 2, 3):
        r.server.receive_consistency(r.clients[i].consistency(request))
    proof = r.server.close_consistency()
    out[SecAggMsg.CONSISTENCY] = (proof[1], identity(2).public)
    out[SecAggMsg.UNMASK_RESPONSE] = (r.clients[2].unmask(request, proof), identity(2).public)
    return out


def _check(raw: bytes, mt: SecAggMsg, key: object) -> None:
    msg = SecAggMessage.parse(raw, expected=mt)
    if isinstance(key, bytes):
        if sha256(msg.raw) != key:
            raise QflareError("digest", code=ErrorCode.BAD_SHARE)
    else:
        msg.verify(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("mt", list(SecAggMsg))
def test_every_flipped_byte_is_refused(samples: dict, mt: SecAggMsg) -> None:
    raw, key = samples[mt]
    _check(raw, mt, key)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(QflareError):
            _check(bytes(bad), mt, key)


@pytest.mark.parametrize("mt", list(SecAggMsg))
def test_truncation_and_trailing_bytes_are_refused(samples: dict, mt: SecAggMsg) -> None:
    raw, _ = samples[mt]
    for cut in (0, 2, HEADER_LEN - 1, HEADER_LEN, len(raw) // 2, len(raw) - 1):
        with pytest.raises(QflareError):
            SecAggMessage.parse(raw[:cut], expected=mt)
    with pytest.raises(QflareError):
        SecAggMessage.parse(raw + b"\x00", expected=mt)


def test_signatures_are_bound_to_their_message_type(samples: dict) -> None:
    raw, key = samples[SecAggMsg.ADVERTISE]
    msg = SecAggMessage.parse(raw, expected=SecAggMsg.ADVERTISE)
    assert context_for(SecAggMsg.ADVERTISE) == b"qflare/v1/secagg-advertise"
    with pytest.raises(QflareError) as info:  # same bytes claimed as another type
        SecAggMessage.parse(raw, expected=SecAggMsg.MANIFEST)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    key.verify(msg.signature, msg.body, context_for(SecAggMsg.ADVERTISE))
    with pytest.raises(QflareError):
        key.verify(msg.signature, msg.body, context_for(SecAggMsg.MANIFEST))


def test_share_pair_fields_are_present_exactly_from_lower_to_higher(samples: dict) -> None:
    raw, _ = samples[SecAggMsg.SHARE]
    msg = SecAggMessage.parse(raw, expected=SecAggMsg.SHARE)
    fields = dict(msg.fields)
    low_to_high = msg.get_int(F.FROM) < msg.get_int(F.TO)
    assert (F.CT_MASK in fields) == low_to_high
    swapped = {**fields, F.FROM: fields[F.TO], F.TO: fields[F.FROM]}
    with pytest.raises(ConfigError):  # the other direction takes the other field set
        SecAggMessage.build(msg.suite, SecAggMsg.SHARE, swapped, None)
    # the same bytes with FROM and TO exchanged no longer parse (the presence rule changes)
    a = HEADER_LEN + (5 + 8) + (5 + 32) + 5  # FROM's value, after ROUND and SESSION
    b = a + 4 + 5  # TO's value
    assert raw[a : a + 4] == fields[F.FROM] and raw[b : b + 4] == fields[F.TO]
    flipped = bytearray(raw)
    flipped[a : a + 4], flipped[b : b + 4] = fields[F.TO], fields[F.FROM]
    with pytest.raises(QflareError):
        SecAggMessage.parse(bytes(flipped), expected=SecAggMsg.SHARE)


def test_lists_must_be_strictly_increasing() -> None:
    assert decode_indices(encode_indices([1, 2, 9]), "x") == [1, 2, 9]
    for bad in ([2, 1], [3, 3], [0, 1]):
        with pytest.raises(QflareError):
            decode_indices(encode_indices(bad), "x")
    entry = (5).to_bytes(4, "big") + bytes(96)
    with pytest.raises(QflareError):
        decode_entries(entry + entry)


def test_build_refuses_wrong_fields_and_signing_rules() -> None:
    cfg = make_config(3, 2, 2)
    base = {F.ROUND: bytes(8), F.SESSION: bytes(32)}
    with pytest.raises(ConfigError):
        SecAggMessage.build(cfg.suite, SecAggMsg.UNMASK_REQUEST, base, identity(0))  # missing fields
    with pytest.raises(ConfigError):
        SecAggMessage.build(
            cfg.suite, SecAggMsg.UNMASK_REQUEST, {**base, F.SURVIVORS: b"\x00" * 3, F.DROPPED: b""}, identity(0)
        )
    with pytest.raises(ConfigError):
        SecAggMessage.build(cfg.suite, SecAggMsg.UNMASK_REQUEST, {**base, F.SURVIVORS: bytes(4), F.DROPPED: b""}, None)


def test_hostile_inputs_only_ever_raise_typed_errors() -> None:
    """Random garbage, truncations and splices at every entry point: QflareError, never anything else."""
    import contextlib
    import random

    rnd = random.Random(7)
    r = start(make_config(4, 3, 2, length=8))
    adverts = {i: c.advertise() for i, c in r.clients.items()}

    def mutations(raw: bytes) -> list[object]:
        cut = rnd.randrange(len(raw))
        return [
            b"",
            raw[:cut],
            raw + rnd.randbytes(5),
            raw[:cut] + rnd.randbytes(rnd.randrange(1, 64)) + raw[cut:],
            rnd.randbytes(len(raw)),
            None,
            "text",
            bytearray(raw[:cut]),
        ]

    def only_typed(fn: object, *args: object) -> None:
        with contextlib.suppress(QflareError):
            fn(*args)  # type: ignore[operator]

    for bad in mutations(adverts[1]):
        only_typed(r.server.receive_advert, bad)
        only_typed(r.clients[2].share_keys, [bad])
    for raw in adverts.values():
        r.server.receive_advert(raw)
    r.server.close_advertise()
    manifest, entries = r.clients[1].share_keys(r.server.adverts_for(1))
    for bad in mutations(manifest):
        only_typed(r.server.receive_shares, bad, entries)
    for bad in mutations(entries[0]):
        only_typed(r.server.receive_shares, manifest, [bad, *entries[1:]])
    r.server.receive_shares(manifest, entries)
    for i in (2, 3, 4):
        r.server.receive_shares(*r.clients[i].share_keys(r.server.adverts_for(i)))
    r.server.close_shares()
    relayed = r.server.shares_for(1)
    for bad in mutations(relayed[0][1]):
        only_typed(r.clients[1].masked_input, [(relayed[0][0], bad), *relayed[1:]], np.zeros(8), 1)
    env, blob = r.clients[1].masked_input(relayed, *r.inputs[1])
    for bad in mutations(env):
        only_typed(r.server.receive_masked, bad, blob)
    for bad in mutations(blob):
        only_typed(r.server.receive_masked, env, bad)
    r.server.receive_masked(env, blob)
    for i in (2, 3, 4):
        x, w = r.inputs[i]
        r.server.receive_masked(*r.clients[i].masked_input(r.server.shares_for(i), x, w))
    request = r.server.close_masked()
    for bad in mutations(request):
        only_typed(r.clients[1].consistency, bad)
        only_typed(r.clients[1].unmask, bad)
    signature = r.clients[1].consistency(request)
    for bad in mutations(signature):
        only_typed(r.server.receive_consistency, bad)
    r.server.receive_consistency(signature)
    for i in (2, 3, 4):
        r.server.receive_consistency(r.clients[i].consistency(request))
    proof = r.server.close_consistency()
    for bad in mutations(proof[1]):
        only_typed(r.clients[1].unmask, request, [proof[0], bad, *proof[2:]])
    for bad in (None, b"", "text", proof[0], [None], [proof[0], 5], [b"x"] * 10_000, {1: proof[0]}):
        only_typed(r.clients[1].unmask, request, bad)  # the list itself garbled
    answer = r.clients[1].unmask(request, proof)
    for bad in mutations(answer):
        only_typed(r.server.receive_unmask, bad)
    r.server.receive_unmask(answer)
    for i in (2, 3, 4):
        r.server.receive_unmask(r.clients[i].unmask(request, proof))
    res = r.server.finish()  # the hostile inputs left no trace: the round completes exactly
    assert np.array_equal(res.total, r.expected_total(range(1, 5)))
