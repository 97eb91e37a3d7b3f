"""Attacks from the security review of qflare/secagg: a malicious coordinator, rolled-back device state,
secrets left in saved state, and hostile arguments at every entry point."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_fixtures import Round, advertise, identity, make_config, mask, share, sign, start, unmask

from qflare.errors import ErrorCode, QflareError
from qflare.secagg import ClientPhase, SecAggClient, SecAggServer
from qflare.secagg.keys import mask_kem, open_sealed, pair_seed, self_mask_seed
from qflare.secagg.messages import (
    SecAggField,
    SecAggMessage,
    SecAggMsg,
    ShareKind,
    decode_share_records,
    encode_indices,
)
from qflare.secagg.prg import add_mask, sub_mask
from qflare.secagg.quantize import quantize
from qflare.secagg.shamir import decode_share, reconstruct, split

F = SecAggField


def refused(code: ErrorCode | str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> QflareError:
    with pytest.raises(QflareError) as info:
        fn(*args, **kwargs)
    assert info.value.code == ErrorCode(code), info.value
    return info.value


def _request(r: Round, survivors: list[int], dropped: list[int]) -> bytes:
    cfg = r.config
    fields = {
        F.ROUND: cfg.round.to_bytes(8, "big"),
        F.SESSION: cfg.session,
        F.SURVIVORS: encode_indices(survivors),
        F.DROPPED: encode_indices(dropped),
    }
    return SecAggMessage.build(cfg.suite, SecAggMsg.UNMASK_REQUEST, fields, identity(0)).raw


# -- 1. per-device unmask requests (the reviewer's attack) ----------------------------------------------


def _per_device_attack(
    n: int, k: int, t: int, v: int, sacrificial: set[int], honest_first: bool
) -> tuple[int, bool, set[str]]:
    """The coordinator sends each device w its own request, survivors {w, v} + padding that holds no
    neighbour of w, dropped N(w) - {v}: so every w gives v's self-mask share and the pairwise-key share of
    every other neighbour.  Returns (devices that answered, whether v's exact input was recovered, the
    last word of each refusal)."""
    r = start(make_config(n, k, t, length=64))
    advertise(r, drop=sacrificial)
    share(r)
    srv, graph = r.server, r.server._graph
    blobs: dict[int, bytes] = {}
    for i in sorted(srv.u2):
        x, w = r.inputs[i]
        raw, blob = r.clients[i].masked_input(srv.shares_for(i), x, w)
        srv.receive_masked(raw, blob)
        blobs[i] = blob
    if honest_first:  # the honest consistency round ran first: every device signed the real U3
        r.request = srv.close_masked()
        sign(r)
    u = srv.u2
    shares: dict[tuple[int, ShareKind], dict[int, int]] = {}
    answered = 0
    reasons: set[str] = set()
    for w in sorted(u - {v}):
        free = [f for f in range(1, n + 1) if f not in (graph[w] & u) and f not in (w, v)]
        free.sort(key=lambda f: f in u)
        # padded to the quorum where the graph allows it, so the size check alone does not refuse it
        survivors = sorted({w, v, *free[: max(0, t - 2, r.config.params.quorum - 2)]})
        request = _request(r, survivors, sorted((graph[w] & u) - set(survivors)))
        # the best the coordinator can relay: w's own signature on its set (if w gives one) and the real proof
        proof = [*(r.proof or [])]
        try:
            proof.append(r.clients[w].consistency(request))
        except QflareError as exc:
            assert exc.code is ErrorCode.UNMASK_REFUSED
        try:
            raw = r.clients[w].unmask(request, proof)
        except QflareError as exc:
            assert exc.code is ErrorCode.UNMASK_REFUSED, exc
            reasons.add(str(exc).split(" ")[-1])
            continue
        answered += 1
        resp = SecAggMessage.parse(raw, expected=SecAggMsg.UNMASK_RESPONSE)
        for rec in decode_share_records(resp.get(F.SHARES)):
            shares.setdefault((rec.peer, rec.kind), {})[w] = decode_share(rec.share)
    try:
        y = np.frombuffer(blobs[v], dtype="<u4").astype(np.uint32)
        sub_mask(y, self_mask_seed(r.config, reconstruct(shares[(v, ShareKind.SELF_MASK)], t)))
        for peer in sorted(graph[v] & u):
            msk = reconstruct(shares[(peer, ShareKind.PAIRWISE)], t)
            if peer < v:
                add_mask(y, pair_seed(r.config, msk, peer, v))
            else:
                e = srv._c.shared[v].entries[peer]
                kem = mask_kem(r.config, msk)
                sub_mask(y, open_sealed(r.config, b"pair", v, peer, kem, e.get(F.CT_MASK), e.get(F.SEALED_PAIR)))
    except (KeyError, QflareError):
        return answered, False, reasons
    x, wt = r.inputs[v]
    return answered, bool(np.array_equal(y, quantize(x, wt, r.config.quant))), reasons


@pytest.mark.parametrize(
    ("n", "k", "t", "v", "sacrificial"),
    # sparse as choose() makes them; complete, the coordinator ignoring t - 2 adverts
    [(20, 6, 4, 5, set()), (50, 22, 14, 7, set()), (8, 7, 4, 1, {7, 8})],
)
@pytest.mark.parametrize("honest_first", [False, True])
def test_per_device_unmask_requests_recover_no_input(
    n: int, k: int, t: int, v: int, sacrificial: set[int], honest_first: bool
) -> None:
    """Before the consistency round every device answered its own request and v's input came out exactly
    (the review's proof of concept); now no honest device answers a request whose survivor set lacks a
    quorum of signatures, so nothing is revealed (each refusal is ``unmask_refused``)."""
    answered, recovered, reasons = _per_device_attack(n, k, t, v, sacrificial, honest_first)
    assert answered == 0
    assert not recovered
    if k < n - 1:  # sparse: the sets are padded to the quorum, so the signatures are what refuses them
        assert reasons == ({"signed"} if honest_first else {"must"})  # "...not signed" / "..., N must"
    else:  # complete, 2 adverts ignored: no set without w's other neighbours reaches the quorum's size
        assert reasons == {"devices"}


def test_two_survivor_sets_cannot_both_reach_a_quorum() -> None:
    """A device signs one set; with quorum > (n + C) / 2 two sets would need a common honest signer."""
    r = start(make_config(8, 7, 4))
    advertise(r)
    share(r)
    mask(r)
    assert r.config.params.quorum == 5
    a, b = _request(r, [1, 2, 3, 4, 5, 6, 7], [8]), _request(r, [1, 2, 3, 4, 5, 6, 8], [7])
    sig_a = [r.clients[i].consistency(a) for i in (1, 2, 3, 4, 5)]
    for i in (1, 2, 3, 4, 5):
        refused("unmask_refused", r.clients[i].consistency, b)
    sig_b = [r.clients[i].consistency(b) for i in (6, 8)]
    refused("unmask_refused", r.clients[6].unmask, b, sig_b)  # 2 < 5
    refused("unmask_refused", r.clients[6].unmask, b, sig_a)  # signatures on another set
    refused("unmask_refused", r.clients[6].unmask, a, sig_a)  # 6 did not sign a
    answer = r.clients[1].unmask(a, sig_a)
    assert SecAggMessage.parse(answer, expected=SecAggMsg.UNMASK_RESPONSE).get_int(F.FROM) == 1


def test_the_coordinator_refuses_signatures_on_another_set_and_too_few() -> None:
    r = start(make_config(8, 7, 4))
    advertise(r)
    share(r)
    mask(r, {8})
    assert r.request is not None
    other = _request(r, [1, 2, 3, 4, 5, 6], [7, 8])
    refused("hash_mismatch", r.server.receive_consistency, r.clients[1].consistency(other))
    for i in (2, 3, 4, 5):
        r.server.receive_consistency(r.clients[i].consistency(r.request))
    refused("secagg_aborted", r.server.close_consistency)  # 4 < quorum 5: no device would answer


# -- 2. rollback: the answer is recorded, and a DONE state must carry it ---------------------------------


def test_a_done_state_without_its_answer_is_refused() -> None:
    r = start(make_config(6, 5, 3))
    advertise(r)
    share(r)
    mask(r)
    sign(r)
    assert r.request is not None and r.proof is not None
    c = r.clients[1]
    saved: list[str] = []
    answer = c.unmask(r.request, r.proof, persist=saved.append)
    doc = json.loads(saved[0])
    assert doc["phase"] == "done" and doc["answered"][1] == answer.hex()
    back = SecAggClient.from_json(r.config, identity(1), saved[0])
    assert back.unmask(r.request) == answer  # the same request gets the same answer, nothing else
    refused("unmask_refused", back.unmask, _request(r, [1, 2, 3, 4, 5], [6]), r.proof)
    doc["answered"] = None  # the review's rollback: DONE without the answer
    refused("bad_json", SecAggClient.from_json, r.config, identity(1), json.dumps(doc))
    masked = json.loads(c.to_json())
    masked["phase"] = "masked"  # DONE relabelled MASKED: no secrets left to answer with
    refused("bad_json", SecAggClient.from_json, r.config, identity(1), json.dumps(masked))


def test_persist_runs_before_the_answer_is_released() -> None:
    r = start(make_config(6, 5, 3))
    advertise(r)
    share(r)
    mask(r)
    sign(r)
    assert r.request is not None and r.proof is not None

    def disk_full(state: str) -> None:
        assert json.loads(state)["phase"] == "done"
        raise OSError("disk full")

    with pytest.raises(OSError):
        r.clients[1].unmask(r.request, r.proof, persist=disk_full)  # nothing returned, nothing sent


def test_a_rolled_back_device_still_cannot_answer_for_a_second_set() -> None:
    """Defence in depth: a device restored to before its signature could sign another set, but no quorum
    of the other (honest) devices signs it, so the second answer is still refused."""
    r = start(make_config(6, 5, 3))
    advertise(r)
    share(r)
    mask(r)
    before = r.clients[1].to_json()
    sign(r)
    assert r.request is not None and r.proof is not None
    r.clients[1].unmask(r.request, r.proof)
    old = SecAggClient.from_json(r.config, identity(1), before)
    other = _request(r, [1, 3, 4, 5, 6], [2])
    mine = old.consistency(other)
    refused("unmask_refused", old.unmask, other, [mine, *r.proof])


# -- 3. a restored device never masks a second update ---------------------------------------------------


def test_a_resumed_masked_input_is_the_same_bytes_and_another_update_is_refused() -> None:
    r = start(make_config(6, 5, 3))
    advertise(r)
    share(r)
    c = r.clients[1]
    x1, w = r.inputs[1]
    x2 = np.random.default_rng(5).normal(0, 0.3, 50).astype(np.float32)
    saved: list[str] = []
    env, blob = c.masked_input(r.server.shares_for(1), x1, w, persist=saved.append)
    back = SecAggClient.from_json(r.config, identity(1), saved[0])
    assert back.phase is ClientPhase.MASKED
    refused("duplicate_submission", back.masked_input, r.server.shares_for(1), x2, w)
    refused("duplicate_submission", back.masked_input, r.server.shares_for(1), x1, w - 1 or 2)
    assert back.masked_input(r.server.shares_for(1), x1, w) == (env, blob)
    assert c.masked_input([], x1, w) == (env, blob)  # nothing is opened again


# -- 4. what a saved state keeps ------------------------------------------------------------------------


def test_saved_state_drops_the_channel_key_once_opened_and_every_secret_once_done() -> None:
    r = start(make_config(5, 4, 3))
    advertise(r)
    share(r)
    c = r.clients[2]
    secrets_ = [c._s.b, c._s.msk, c._s.channel_seed]
    mask(r)
    assert json.loads(c.to_json())["channel_seed"] is None
    secrets_ += [h.pair_seed for h in c._s.held.values()]
    secrets_ += [h.pair_share for h in c._s.held.values()]  # every peer survives: these are never sent
    res = unmask(r)
    assert np.array_equal(res.total, r.expected_total(range(1, 6)))
    text = c.to_json()
    doc = json.loads(text)
    assert doc["b"] is None and doc["msk"] is None and doc["channel_seed"] is None
    assert doc["held"] == {} and doc["publics"] == {} and doc["masked"] is None
    for secret in secrets_:
        assert secret is not None and secret.hex() not in text
    back = SecAggClient.from_json(r.config, identity(2), text)
    assert r.request is not None and back.unmask(r.request) == bytes.fromhex(doc["answered"][1])


# -- 5. hostile arguments: typed errors only ------------------------------------------------------------


def test_hostile_arguments_raise_typed_errors() -> None:
    r = start(make_config(4, 3, 2, length=8))
    advertise(r)
    refused("malformed", r.clients[1].share_keys, None)
    refused("malformed", r.clients[1].share_keys, [None])
    manifest, entries = r.clients[1].share_keys(r.server.adverts_for(1))
    refused("malformed", r.server.receive_shares, manifest, None)
    refused("malformed", r.server.receive_shares, manifest, b"abc")
    r.server.receive_shares(manifest, entries)
    for i in (2, 3, 4):
        r.server.receive_shares(*r.clients[i].share_keys(r.server.adverts_for(i)))
    r.server.close_shares()
    c = r.clients[2]
    refused("malformed", c.masked_input, [b"x"], np.zeros(8), 1)
    refused("malformed", c.masked_input, None, np.zeros(8), 1)
    relayed = r.server.shares_for(2)
    refused("bad_shape", c.masked_input, relayed, np.array(["a"] * 8), 1)
    refused("bad_shape", c.masked_input, relayed, [object()] * 8, 1)
    refused("bad_shape", c.masked_input, relayed, None, 1)
    refused("bad_shape", c.masked_input, relayed, [[1.0], [1.0, 2.0]], 1)
    assert c.phase is ClientPhase.SHARED
    deep = "[" * 100_000 + "]" * 100_000
    refused("bad_json", SecAggClient.from_json, r.config, identity(1), deep)
    refused("bad_json", SecAggClient.from_json, r.config, identity(1), "x" * (16 * 1024 * 1024 + 1))
    refused("bad_json", SecAggClient.from_json, r.config, identity(1), None)
    refused("bad_json", SecAggServer.restore, r.config, identity(0), deep, b"")
    refused("bad_json", SecAggServer.restore, r.config, identity(0), "{}", None)
    x, w = r.inputs[2]
    r.server.receive_masked(*c.masked_input(relayed, x, w))  # the refusals left no trace


# -- 6. hardening -----------------------------------------------------------------------------------------


def test_reconstruct_refuses_a_threshold_below_one() -> None:
    shares = split(b"\x01" * 32, 2, [1, 2, 3])
    for bad in (0, -1, True):
        refused("bad_argument", reconstruct, shares, bad)


def test_a_rebuilt_self_mask_seed_must_match_the_advertised_commitment() -> None:
    """A device that commits to one self-mask seed and shares another is caught at unmasking (bad_share),
    rather than leaving a sum that depends on which t shares were used."""
    r = start(make_config(5, 4, 3))
    for c in r.clients.values():
        r.server.receive_advert(c.advertise())
    r.server.close_advertise()
    r.clients[3]._s.b = b"\x05" * 32  # after the advert: shares and masks use a seed it did not commit to
    share(r)
    mask(r)
    refused("bad_share", unmask, r)


# -- saved device state: any JSON-ish text is a typed refusal or a state that passes every check ----------

_DONE_STATE: dict[str, Any] = {}


def _done_state() -> tuple[Any, str]:
    if not _DONE_STATE:
        r = start(make_config(4, 3, 2, length=8))
        advertise(r)
        share(r)
        mask(r)
        unmask(r)
        _DONE_STATE["r"] = r
    r = _DONE_STATE["r"]
    return r.config, r.clients[1].to_json()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(["version", "phase", "b", "answered", "signed", "held", "publics", "index", "masked"]),
    value=json_values,
)
def test_an_edited_device_state_is_refused_with_a_typed_error(key: str, value: Any) -> None:
    config, text = _done_state()
    doc = json.loads(text)
    if doc[key] == value:
        return
    doc[key] = value
    try:
        back = SecAggClient.from_json(config, identity(1), json.dumps(doc))
    except QflareError as exc:
        assert exc.code in (ErrorCode.BAD_JSON, ErrorCode.WRONG_ROUND, ErrorCode.BAD_INDEX), exc
        return
    # what loads is still a state that answers once: DONE with its answer, and nothing secret in it
    assert back.phase is ClientPhase.DONE and back._s.answered is not None and back._s.b is None


def test_a_survivor_set_smaller_than_the_quorum_aborts_before_any_request() -> None:
    r = start(make_config(10, 9, 3))  # t = 3 alone would let 5 survivors through; the quorum is 6
    advertise(r)
    share(r)
    with pytest.raises(QflareError) as info:
        mask(r, {6, 7, 8, 9, 10})
    assert info.value.code is ErrorCode.SECAGG_ABORTED and "quorum" in str(info.value)
    assert r.request is None


def test_a_secret_with_fewer_than_t_signing_holders_aborts_at_the_consistency_close() -> None:
    """Only the signers of U3 are asked to unmask: a secret with fewer than t of them among its holders
    could not be rebuilt, so the round aborts when the consistency phase closes, before any device is
    asked for a share (not at ``finish``, after the shares were revealed)."""
    r = start(make_config(5, 4, 3))  # complete graph, quorum 3
    advertise(r)
    share(r)
    mask(r, {5})  # U3 = {1, 2, 3, 4}
    with pytest.raises(QflareError) as info:
        sign(r, {4})  # three signers, a quorum; device 1's neighbours among them: 2 and 3 only
    assert info.value.code is ErrorCode.SECAGG_ABORTED and "threshold" in str(info.value)
    assert r.server.phase.value == "aborted"
    r2 = start(make_config(5, 4, 3))  # the same with every device of U3 signing completes
    advertise(r2)
    share(r2)
    mask(r2, {5})
    sign(r2)
    assert np.array_equal(unmask(r2).total, r2.expected_total({1, 2, 3, 4}))
