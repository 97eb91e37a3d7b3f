"""Secure-aggregation rounds: exact sums, dropouts at every phase, and what an honest party refuses."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from secagg_fixtures import advertise, identity, make_config, mask, run, share, sign, start, unmask

from qflare.crypto.suite import sha256
from qflare.errors import ErrorCode, QflareError
from qflare.secagg import ClientPhase, SecAggClient, SecAggServer, ServerPhase
from qflare.secagg.messages import (
    SecAggField,
    SecAggMessage,
    SecAggMsg,
    ShareKind,
    ShareRecord,
    decode_share_records,
    encode_indices,
    encode_share_records,
)
from qflare.secagg.shamir import P, encode_share

F = SecAggField


def refused(code: ErrorCode | str, fn: Callable[..., Any], *args: Any) -> QflareError:
    with pytest.raises(QflareError) as info:
        fn(*args)
    assert info.value.code == ErrorCode(code), info.value
    return info.value


@pytest.mark.parametrize(("n", "k", "t"), [(3, 2, 2), (8, 7, 5), (12, 4, 3), (20, 6, 4)])
def test_unmasked_sum_equals_the_quantised_sum_exactly(n: int, k: int, t: int) -> None:
    for trial in range(2):
        r, res = run(make_config(n, k, t, length=300), rng=np.random.default_rng(trial))
        assert res.total.dtype == np.uint32
        assert np.array_equal(res.total, r.expected_total(range(1, n + 1)))
        assert res.survivors == tuple(range(1, n + 1)) and res.dropped == ()
        xs = [r.inputs[i] for i in res.survivors]
        ref = sum(np.clip(x, -1, 1).astype(np.float64) * w for x, w in xs) / sum(w for _, w in xs)
        assert np.abs(res.mean - ref).max() <= r.config.quant.error_bound


# complete graph n=8, k=7, t=4: a device's shares sit with its 7 neighbours, so 3 may go missing
PHASES = ["drop_advertise", "drop_share", "drop_mask", "drop_unmask"]


@pytest.mark.parametrize("phase", PHASES)
def test_dropouts_up_to_the_threshold_complete_the_round(phase: str) -> None:
    dropped = {6, 7, 8}
    r, res = run(make_config(8, 7, 4), **{phase: dropped})
    expected = [i for i in range(1, 9) if phase == "drop_unmask" or i not in dropped]
    assert list(res.survivors) == expected
    assert np.array_equal(res.total, r.expected_total(expected))
    assert r.server.phase is ServerPhase.DONE


def test_dropouts_spread_over_every_phase_complete_the_round() -> None:
    r, res = run(make_config(8, 7, 4), drop_advertise={1}, drop_share={2}, drop_mask={3})
    assert res.survivors == (4, 5, 6, 7, 8) and res.dropped == (3,)
    assert np.array_equal(res.total, r.expected_total(res.survivors))


@pytest.mark.parametrize("phase", PHASES)
def test_one_dropout_more_aborts_with_a_typed_error_and_no_aggregate(phase: str) -> None:
    r = start(make_config(8, 7, 4))
    steps = {"drop_advertise": advertise, "drop_share": share, "drop_mask": mask, "drop_unmask": unmask}
    err: QflareError | None = None
    try:
        for name, step in steps.items():
            if name == phase:
                step(r, {5, 6, 7, 8})
            else:
                step(r)
    except QflareError as exc:
        err = exc
    assert err is not None and err.code is ErrorCode.SECAGG_ABORTED
    assert r.server.phase is ServerPhase.ABORTED
    refused("bad_transition", r.server.finish)


def test_sparse_round_survives_dropouts_its_neighbourhoods_tolerate() -> None:
    cfg = make_config(20, 6, 4)
    r, res = run(cfg, drop_share={1}, drop_mask={11})
    assert np.array_equal(res.total, r.expected_total(res.survivors))
    assert 1 not in res.survivors and 11 in res.dropped


def test_the_coordinator_never_unmasks_twice() -> None:
    r, res = run(make_config(5, 4, 3))
    assert res is not None
    refused("bad_transition", r.server.finish)
    refused("bad_transition", r.server.close_masked)


def test_a_single_masked_input_looks_uniform() -> None:
    """Chi-square on the top byte and a KS test on the words of one masked all-zero update."""
    r = start(make_config(4, 3, 2, length=200_000))
    advertise(r)
    share(r)
    c = r.clients[1]
    _, blob = c.masked_input(r.server.shares_for(1), np.zeros(200_000), 1)
    words = np.frombuffer(blob, dtype="<u4")
    counts = np.bincount(words >> 24, minlength=256)
    expected = words.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    k, z = 255, 4.75  # Wilson-Hilferty critical value at p ~ 1e-6
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    assert chi2 < crit
    u = np.sort(words.astype(np.float64) / 2**32)
    ecdf = np.arange(1, u.size + 1) / u.size
    d = float(np.max(np.maximum(ecdf - u, u - (ecdf - 1 / u.size))))
    assert d < math.sqrt(-math.log(1e-6 / 2) / 2) / math.sqrt(u.size)
    # and the unmasked quantised input (all zeros but the weight) is nothing like it
    assert np.count_nonzero(words[:-1]) > 0.99 * (words.size - 1)
    # each mask kind alone hides the input: without the self mask, or without the pair masks, still uniform
    from qflare.secagg.keys import self_mask_seed
    from qflare.secagg.prg import add_mask, sub_mask

    assert c._s.b is not None
    without_self = words.astype(np.uint32)
    sub_mask(without_self, self_mask_seed(r.config, c._s.b))
    without_pairs = words.astype(np.uint32)
    for peer, h in c._s.held.items():
        (sub_mask if peer > 1 else add_mask)(without_pairs, h.pair_seed)
    for rest in (without_self, without_pairs):
        assert _looks_uniform(rest)
    both = without_self.copy()
    for peer, h in c._s.held.items():
        (sub_mask if peer > 1 else add_mask)(both, h.pair_seed)
    assert not _looks_uniform(both)  # the check can fail: with both removed only the zero input is left


def _looks_uniform(words: np.ndarray) -> bool:
    counts = np.bincount(words >> 24, minlength=256)
    expected = words.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    k, z = 255, 4.75
    return chi2 < k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


# -- what an honest device refuses ------------------------------------------------------------------------


def _request(cfg: Any, survivors: list[int], dropped: list[int], round_: int | None = None) -> bytes:
    fields = {
        F.ROUND: (cfg.round if round_ is None else round_).to_bytes(8, "big"),
        F.SESSION: cfg.session,
        F.SURVIVORS: encode_indices(survivors),
        F.DROPPED: encode_indices(dropped),
    }
    return SecAggMessage.build(cfg.suite, SecAggMsg.UNMASK_REQUEST, fields, identity(0)).raw


def _masked_round() -> Any:
    r = start(make_config(6, 5, 3))
    advertise(r)
    share(r)
    mask(r)
    return r


def _signed_by(r: Any, request: bytes, signers: list[int]) -> list[bytes]:
    return [r.clients[i].consistency(request) for i in signers]


def test_a_device_refuses_to_reveal_both_share_kinds_of_one_peer() -> None:
    r = _masked_round()
    c = r.clients[1]
    assert r.config.params.quorum == 4
    for bad in (
        _request(r.config, [1, 2, 3, 4, 5, 6], [2]),  # 2 both survived and dropped
        _request(r.config, [2, 3, 4, 5, 6], [1]),  # this device "dropped"
        _request(r.config, [1, 2, 3], [4, 5]),  # leaves out 6
        _request(r.config, [1, 2], [3, 4, 5, 6]),  # fewer than t survivors
        _request(r.config, [1, 2, 3], [4, 5, 6]),  # fewer than the quorum
    ):
        refused("unmask_refused", c.consistency, bad)
        refused("unmask_refused", c.unmask, bad)
        assert c.phase is ClientPhase.MASKED
    good = _request(r.config, [1, 2, 3, 4], [5, 6])
    refused("unmask_refused", c.unmask, good)  # not signed by anyone yet
    proof = _signed_by(r, good, [1, 2, 3, 4])
    refused("unmask_refused", c.unmask, good, proof[:3])  # 3 signatures < quorum 4
    refused("unmask_refused", c.unmask, good, [*proof[:3], proof[2]])  # a signer counted twice
    first = c.unmask(good, proof)
    assert c.unmask(_request(r.config, [1, 2, 3, 4], [5, 6])) == first  # a retry gets the same answer
    # asking again with 5 now a survivor would give its self-mask share after its pairwise share: refused
    refused("unmask_refused", c.unmask, _request(r.config, [1, 2, 3, 4, 5], [6]), proof)
    refused("unmask_refused", c.consistency, _request(r.config, [1, 2, 3, 4, 5], [6]))  # signs one set
    kinds = {
        rec.peer: rec.kind
        for rec in decode_share_records(SecAggMessage.parse(first, expected=SecAggMsg.UNMASK_RESPONSE).get(F.SHARES))
    }
    assert kinds == {
        2: ShareKind.SELF_MASK,
        3: ShareKind.SELF_MASK,
        4: ShareKind.SELF_MASK,
        5: ShareKind.PAIRWISE,
        6: ShareKind.PAIRWISE,
    }


def test_a_device_refuses_requests_not_from_the_coordinator_or_for_another_round() -> None:
    r = _masked_round()
    c = r.clients[1]
    forged = SecAggMessage.build(
        r.config.suite,
        SecAggMsg.UNMASK_REQUEST,
        {
            F.ROUND: r.config.round.to_bytes(8, "big"),
            F.SESSION: r.config.session,
            F.SURVIVORS: encode_indices([1, 2, 3, 4, 5, 6]),
            F.DROPPED: b"",
        },
        identity(2),
    ).raw
    refused("bad_signature", c.unmask, forged)
    refused("wrong_round", c.unmask, _request(r.config, [1, 2, 3, 4, 5, 6], [], round_=2))
    assert c.phase is ClientPhase.MASKED


def test_substituted_or_unsigned_round_keys_are_refused() -> None:
    cfg = make_config(4, 3, 2)
    r = start(cfg)
    adverts = {i: c.advertise() for i, c in r.clients.items()}
    # device 3's advert re-signed by device 2's key (key substitution), and a key swapped inside a signed advert
    msg = SecAggMessage.parse(adverts[3], expected=SecAggMsg.ADVERTISE)
    resigned = SecAggMessage.build(cfg.suite, SecAggMsg.ADVERTISE, dict(msg.fields), identity(2)).raw
    swapped = bytearray(adverts[3])
    pos = adverts[3].index(msg.get(F.CHANNEL_PUBLIC))
    swapped[pos : pos + 32] = adverts[2][pos : pos + 32]
    for bad in (resigned, bytes(swapped)):
        refused("bad_signature", r.server.receive_advert, bad)
        refused("bad_signature", r.clients[1].share_keys, [adverts[2], bad, adverts[4]])
    assert r.clients[1].phase is ClientPhase.ADVERTISED
    # an advert of the same device for another round (replay across rounds)
    other = start(make_config(4, 3, 2, round_=2))
    old = other.clients[3].advertise()
    refused("wrong_round", r.server.receive_advert, old)
    refused("wrong_round", r.clients[1].share_keys, [adverts[2], old, adverts[4]])
    # the honest adverts still go through afterwards: the refusals left no state
    for raw in adverts.values():
        r.server.receive_advert(raw)
    r.server.close_advertise()
    share(r)
    mask(r)
    res = unmask(r)
    assert np.array_equal(res.total, r.expected_total(range(1, 5)))


def test_tampered_relayed_shares_are_refused_without_state_change() -> None:
    r = start(make_config(4, 3, 2))
    advertise(r)
    share(r)
    relayed = r.server.shares_for(1)
    manifest, entry = relayed[0]
    for i in (20, len(entry) - 5, len(entry) - 60):
        bad = bytearray(entry)
        bad[i] ^= 0x01
        refused("bad_share", r.clients[1].masked_input, [(manifest, bytes(bad)), *relayed[1:]], np.zeros(50), 1)
    # an entry from another sender under this manifest, or one entry twice
    refused("bad_share", r.clients[1].masked_input, [(manifest, relayed[1][1]), *relayed[1:]], np.zeros(50), 1)
    refused("duplicate_submission", r.clients[1].masked_input, [*relayed, relayed[0]], np.zeros(50), 1)
    assert r.clients[1].phase is ClientPhase.SHARED
    x, w = r.inputs[1]
    r.server.receive_masked(*r.clients[1].masked_input(relayed, x, w))


def test_the_coordinator_refuses_shares_that_break_their_commitment() -> None:
    r = _masked_round()
    request = r.request
    assert request is not None
    sign(r)
    honest = r.clients[1].unmask(request, r.proof)
    msg = SecAggMessage.parse(honest, expected=SecAggMsg.UNMASK_RESPONSE)
    records = decode_share_records(msg.get(F.SHARES))
    value = int.from_bytes(records[0].share, "big")
    records[0] = ShareRecord(records[0].peer, records[0].kind, encode_share((value + 1) % P))
    fields = dict(msg.fields)
    fields[F.SHARES] = encode_share_records(records)
    lying = SecAggMessage.build(r.config.suite, SecAggMsg.UNMASK_RESPONSE, fields, identity(1)).raw
    refused("bad_share", r.server.receive_unmask, lying)
    # a share of the wrong kind (pairwise share of a survivor) is refused too
    records[0] = ShareRecord(records[0].peer, ShareKind.PAIRWISE, records[0].share)
    fields[F.SHARES] = encode_share_records(records)
    wrong_kind = SecAggMessage.build(r.config.suite, SecAggMsg.UNMASK_RESPONSE, fields, identity(1)).raw
    refused("bad_share", r.server.receive_unmask, wrong_kind)
    r.server.receive_unmask(honest)
    for i in range(2, 7):
        r.server.receive_unmask(r.clients[i].unmask(request, r.proof))
    res = r.server.finish()
    assert np.array_equal(res.total, r.expected_total(range(1, 7)))


def test_masked_inputs_do_not_replay_across_rounds_or_change() -> None:
    r1, r2 = _masked_round(), start(make_config(6, 5, 3, round_=2))
    advertise(r2)
    share(r2)
    x, w = r1.inputs[1]
    # each phase runs once: another update under the same masks is refused
    refused("duplicate_submission", r1.clients[2].masked_input, r1.server.shares_for(2), x, w)
    env, blob = r2.clients[1].masked_input(r2.server.shares_for(1), x, w)
    old_env = SecAggMessage.build(
        r1.config.suite,
        SecAggMsg.MASKED_INPUT,
        {
            F.ROUND: (1).to_bytes(8, "big"),
            F.SESSION: r1.config.session,
            F.FROM: (1).to_bytes(4, "big"),
            F.VECTOR_HASH: sha256(blob),
            F.LENGTH: (51).to_bytes(8, "big"),
        },
        identity(1),
    ).raw
    refused("wrong_round", r2.server.receive_masked, old_env, blob)
    refused("hash_mismatch", r2.server.receive_masked, env, blob[:-4] + b"\x00\x00\x00\x01")
    r2.server.receive_masked(env, blob)
    r2.server.receive_masked(env, blob)  # the same message again is a no-op
    env2, blob2 = (
        SecAggMessage.build(
            r2.config.suite,
            SecAggMsg.MASKED_INPUT,
            {
                F.ROUND: (2).to_bytes(8, "big"),
                F.SESSION: r2.config.session,
                F.FROM: (1).to_bytes(4, "big"),
                F.VECTOR_HASH: sha256(bytes(204)),
                F.LENGTH: (51).to_bytes(8, "big"),
            },
            identity(1),
        ).raw,
        bytes(204),
    )
    refused("duplicate_submission", r2.server.receive_masked, env2, blob2)


def test_device_state_survives_a_restart_in_every_phase() -> None:
    r = start(make_config(5, 4, 3))

    def reload(i: int) -> None:
        r.clients[i] = SecAggClient.from_json(r.config, identity(i), r.clients[i].to_json())

    for i in r.clients:
        r.server.receive_advert(r.clients[i].advertise())
        reload(i)
    r.server.close_advertise()
    for i in r.clients:
        r.server.receive_shares(*r.clients[i].share_keys(r.server.adverts_for(i)))
        reload(i)
    r.server.close_shares()
    for i in r.clients:
        x, w = r.inputs[i]
        r.server.receive_masked(*r.clients[i].masked_input(r.server.shares_for(i), x, w))
        reload(i)
    request = r.server.close_masked()
    for i in r.clients:
        signature = r.clients[i].consistency(request)
        reload(i)
        assert r.clients[i].consistency(request) == signature
        r.server.receive_consistency(signature)
    proof = r.server.close_consistency()
    for i in r.clients:
        answer = r.clients[i].unmask(request, proof)
        reload(i)
        assert r.clients[i].unmask(request) == answer
        r.server.receive_unmask(answer)
    res = r.server.finish()
    assert np.array_equal(res.total, r.expected_total(range(1, 6)))
    other = make_config(5, 4, 3, round_=9)
    refused("wrong_round", SecAggClient.from_json, other, identity(1), r.clients[1].to_json())
    refused("bad_json", SecAggClient.from_json, r.config, identity(1), "{}")


def test_a_restarted_coordinator_resumes_every_phase_and_never_unmasks_twice() -> None:
    r = start(make_config(6, 5, 3))

    def restart() -> None:
        state, total = r.server.snapshot()
        r.server = SecAggServer.restore(r.config, identity(0), state, total)

    restart()
    for c in r.clients.values():
        r.server.receive_advert(c.advertise())
        restart()
    r.server.close_advertise()
    restart()
    for i in r.clients:
        if i != 6:  # 6 drops before sharing
            r.server.receive_shares(*r.clients[i].share_keys(r.server.adverts_for(i)))
            restart()
    r.server.close_shares()
    restart()
    for i in range(1, 5):  # 5 drops before its masked input
        x, w = r.inputs[i]
        r.server.receive_masked(*r.clients[i].masked_input(r.server.shares_for(i), x, w))
        restart()
    request = r.server.close_masked()
    restart()
    assert r.server.phase is ServerPhase.CONSISTENCY and r.server.request == request
    refused("bad_transition", r.server.close_masked)  # the survivor set is fixed across the restart
    for i in range(1, 5):
        r.server.receive_consistency(r.clients[i].consistency(request))
        restart()
    proof = r.server.close_consistency()
    restart()
    assert r.server.phase is ServerPhase.UNMASK and r.server.consistency_proof() == proof
    for i in range(1, 5):
        r.server.receive_unmask(r.clients[i].unmask(request, proof))
        restart()
    res = r.server.finish()
    assert np.array_equal(res.total, r.expected_total(range(1, 5)))
    restart()
    assert r.server.phase is ServerPhase.DONE
    refused("bad_transition", r.server.finish)


def test_a_restored_state_is_checked_again() -> None:
    r = _masked_round()
    state, total = r.server.snapshot()
    doc = json.loads(state)
    flipped = bytearray.fromhex(doc["adverts"][0])
    flipped[-1] ^= 1
    doc["adverts"][0] = flipped.hex()
    refused("bad_signature", SecAggServer.restore, r.config, identity(0), json.dumps(doc), total)
    refused("bad_json", SecAggServer.restore, r.config, identity(0), "[]", total)
    refused("bad_json", SecAggServer.restore, r.config, identity(0), state, total[:-4])
    other = make_config(6, 5, 3, round_=7)
    refused("bad_json", SecAggServer.restore, other, identity(0), state, total)
    aborted = start(make_config(4, 3, 3))
    for c in list(aborted.clients.values())[:2]:
        aborted.server.receive_advert(c.advertise())
    refused("secagg_aborted", aborted.server.close_advertise)
    back = SecAggServer.restore(aborted.config, identity(0), *aborted.server.snapshot())
    assert back.phase is ServerPhase.ABORTED
    refused("bad_transition", back.finish)


def test_the_coordinator_refuses_a_manifest_that_skips_a_neighbour() -> None:
    r = start(make_config(5, 4, 3))
    advertise(r)
    manifest, entries = r.clients[1].share_keys(r.server.adverts_for(1))
    refused("malformed", r.server.receive_shares, manifest, entries[:-1])
    shorter = r.clients[2].share_keys(r.server.adverts_for(2)[:-1])  # device 2 skips neighbour 5
    refused("malformed", r.server.receive_shares, *shorter)
    r.server.receive_shares(manifest, entries)
    refused("not_selected", r.server.shares_for, 1)  # nothing is relayed before the phase closes


def test_a_device_refuses_adverts_from_non_neighbours() -> None:
    cfg = make_config(12, 4, 3)
    r = start(cfg)
    adverts = {i: c.advertise() for i, c in r.clients.items()}
    outsider = next(i for i in range(2, 13) if i not in r.clients[1].neighbours)
    mine = [adverts[i] for i in sorted(r.clients[1].neighbours)]
    refused("unmask_refused", r.clients[1].share_keys, [*mine, adverts[outsider]])
    refused("duplicate_submission", r.clients[1].share_keys, [*mine, mine[0]])
    refused("secagg_aborted", r.clients[1].share_keys, mine[:2])  # fewer than t neighbours
    assert r.clients[1].phase is ClientPhase.ADVERTISED


def test_unmasking_on_several_threads_gives_the_same_sum() -> None:
    r = start(make_config(9, 8, 5))
    advertise(r)
    share(r)
    mask(r, {8, 9})
    sign(r)
    assert r.request is not None
    for i in range(1, 8):
        r.server.receive_unmask(r.clients[i].unmask(r.request, r.proof))
    state, total = r.server.snapshot()
    results = [SecAggServer.restore(r.config, identity(0), state, total, workers=w).finish() for w in (1, 2, 3, 64)]
    for res in results:
        assert np.array_equal(res.total, r.expected_total(range(1, 8)))
    refused("bad_argument", lambda: SecAggServer(r.config, identity(0), workers=0))


def test_an_advert_with_an_unusable_kem_key_is_refused() -> None:
    cfg = make_config(4, 3, 2)
    r = start(cfg)
    msg = SecAggMessage.parse(r.clients[1].advertise(), expected=SecAggMsg.ADVERTISE)
    fields = dict(msg.fields)
    public = bytearray(fields[F.MASK_PUBLIC])
    public[-32:] = bytes(32)  # X25519 all-zero point: low order
    fields[F.MASK_PUBLIC] = bytes(public)
    signed = SecAggMessage.build(cfg.suite, SecAggMsg.ADVERTISE, fields, identity(1)).raw
    refused("bad_kem_share", r.server.receive_advert, signed)
    fields[F.MASK_PUBLIC] = b"\xff" * len(public)  # ML-KEM coefficients out of range
    signed = SecAggMessage.build(cfg.suite, SecAggMsg.ADVERTISE, fields, identity(1)).raw
    refused("malformed", r.server.receive_advert, signed)


def test_a_doomed_round_aborts_before_any_share_is_revealed() -> None:
    r = start(make_config(12, 4, 3))
    advertise(r)
    share(r)
    two = sorted(r.clients[1].neighbours)[:2]  # device 1 keeps 2 < t neighbours that send masked inputs
    with pytest.raises(QflareError) as info:
        mask(r, set(two))
    assert info.value.code is ErrorCode.SECAGG_ABORTED
    assert r.request is None and r.server.phase is ServerPhase.ABORTED
    assert all(c.phase is ClientPhase.MASKED for i, c in r.clients.items() if i not in two)


def test_the_session_binds_every_public_parameter() -> None:
    import dataclasses

    from qflare.secagg import QuantSpec, SecAggParams

    base = make_config(5, 4, 3)
    variants = [
        dataclasses.replace(base, round=2),
        dataclasses.replace(base, params=SecAggParams(5, 4, 4)),
        dataclasses.replace(base, graph_seed=b"\x08" * 32),
        dataclasses.replace(base, quant=QuantSpec(clip=0.5)),
        dataclasses.replace(base, quant=QuantSpec(max_weight=8)),
        dataclasses.replace(base, length=51),
        dataclasses.replace(base, roster={**base.roster, 5: identity(9).public}),
        dataclasses.replace(base, coordinator=identity(9).public),
    ]
    sessions = {base.session, *(v.session for v in variants)}
    assert len(sessions) == len(variants) + 1
    assert make_config(5, 4, 3).session == base.session
