"""Receipts with inclusion proofs: after a round, a device fetches the round's signed ledger entry and the
Merkle proof that its update is in ``updates_root`` (or the reason the entry leaves it out), over the
session, and checks it against its pinned coordinator key."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from ledger_fixtures import coordinator_key, h, round_entry
from protocol_fixtures import FakeClock, Federation

from qflare.crypto.identity import SigningKey
from qflare.errors import QflareError
from qflare.ledger import LeftOut, RoundUpdate, canonical
from qflare.protocol import Route
from qflare.protocol.proofs import answer_for, encode_answer, verify_answer
from qflare.protocol.provenance import entry_of
from qflare.strategy import krum

K = coordinator_key("proofs")
OTHER = coordinator_key("other")
DEVICES = [h("device", i) for i in range(5)]


def _entry(round_number: int = 3, key: SigningKey = K, seq: int = 3) -> object:
    updates = [RoundUpdate(DEVICES[i], h("u", round_number, i), 10 + i) for i in range(4)]
    return round_entry(
        key,
        seq=seq,
        prev=h("prev", seq),
        round_number=round_number,
        parent=h("m", round_number - 1),
        model=h("m", round_number),
        updates=updates,
        left_out=[LeftOut(DEVICES[4], h("u", round_number, 4), "not_combined")],
    )


def _check(raw: bytes, device: int, round_number: int = 3, examples: int | None = None, **kw: object):
    return verify_answer(
        raw,
        round_number=round_number,
        device_id=DEVICES[device],
        update_hash=h("u", round_number, device),
        examples=10 + device if examples is None else examples,
        keys=kw.pop("keys", {K.key_id: K.public}),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _refused(call, words: str) -> None:
    with pytest.raises(QflareError) as info:
        call()
    assert info.value.code == "bad_inclusion_proof", info.value
    assert words in str(info.value), str(info.value)


def test_proofs_verify_for_included_updates_and_left_out_ones() -> None:
    entry = _entry()
    for i in range(4):
        verified = _check(answer_for(entry, DEVICES[i]), i)
        assert verified.included and verified.proof is not None and verified.proof.index == i
        assert (verified.outcome, verified.model, verified.entry_hash) == ("closed", h("m", 3), entry.entry_hash)
    left = _check(answer_for(entry, DEVICES[4]), 4)
    assert not left.included and left.reason == "not_combined" and left.proof is None
    with pytest.raises(QflareError) as info:
        answer_for(entry, h("device", 99))
    assert info.value.code == "not_selected"


def test_proofs_fail_for_other_leaves_rounds_keys_and_tampering() -> None:
    entry = _entry()
    mine = answer_for(entry, DEVICES[1])
    # another device's answer presented as this device's
    _refused(lambda: _check(answer_for(entry, DEVICES[0]), 1), "another device")
    # another device's proof, relabelled for this device: the proof does not take this leaf to the root
    proof_of_0 = answer_for(entry, DEVICES[0])
    relabelled = proof_of_0.replace(DEVICES[0].encode() + b'","left_out"', DEVICES[1].encode() + b'","left_out"')
    assert relabelled != proof_of_0
    _refused(lambda: _check(relabelled, 1), "does not take this device's update")
    _refused(lambda: _check(mine, 1, examples=999), "does not take this device's update")  # another weight
    # round r's proof presented for round r + 1
    _refused(lambda: _check(mine, 1, round_number=4), "not of round 4")
    # a tampered audit path
    n = struct.unpack(">I", mine[:4])[0]
    tail = canonical.decode(mine[4 + n :])
    tail["proof"]["path"][0] = "00" * 32
    _refused(lambda: _check(mine[: 4 + n] + canonical.encode(tail), 1), "does not take this device's update")
    # a left-out reason the entry does not give
    tail = canonical.decode(answer_for(entry, DEVICES[4])[4 + n :])
    tail["left_out"][1] = "norm_exceeded"
    _refused(lambda: _check(mine[: 4 + n] + canonical.encode(tail | {"device": DEVICES[4]}), 4), "not the one")
    # signed by a key the device does not trust, or by a revoked one
    _refused(lambda: _check(answer_for(_entry(key=OTHER), DEVICES[1]), 1), "not the pinned coordinator key")
    _refused(lambda: _check(mine, 1, revoked={K.key_id}), "revoked")
    # a changed entry body (its signature no longer verifies)
    forged = mine.replace(b'"outcome":"closed"', b'"outcome":"failed"')
    _refused(lambda: _check(forged, 1), "differ from the entry body")  # entry_hash no longer matches
    other_sig = _entry(seq=4).signatures[0][1].hex().encode()
    swapped = mine.replace(entry.signatures[0][1].hex().encode(), other_sig)
    _refused(lambda: _check(swapped, 1), "the round entry")  # a signature over another body
    # garbage and truncation are refusals too, never another exception
    for raw in (b"", b"\x00\x00\x00\x05abc", mine[:-3], b"\xff" * 8):
        _refused(lambda raw=raw: _check(raw, 1), "")
    # both or neither of proof and left_out
    _refused(lambda: _check(encode_answer(entry, DEVICES[1], None, None), 1), "either")


def _submit(fed: Federation, devices: list) -> dict[str, tuple[str, int]]:
    sent = {}
    for k, dev in enumerate(devices):
        update = fed.prepare(dev, seed=k, n=5 + k)
        receipt = dev.submit(update)
        sent[dev.device_id] = (receipt.update_hash, 5 + k)
    return sent


def test_in_process_a_device_gets_and_checks_its_proof(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=3, per_round=2, rounds=2, clock=FakeClock())
    fed.coordinator.rounds.open_next()
    first, second = fed.selected()
    (outsider,) = fed.unselected()
    sent = _submit(fed, [first])
    digest, examples = sent[first.device_id]
    with pytest.raises(QflareError) as info:
        first.fetch_proof(1, digest, examples)
    assert info.value.code == "round_not_closed" and info.value.retry.value == "transient"
    sent |= _submit(fed, [second])  # quorum: round 1 closes
    for dev in (first, second):
        digest, examples = sent[dev.device_id]
        verified, _ = dev.fetch_proof(1, digest, examples)
        assert verified.included and verified.round_number == 1 and verified.signers == (fed.identity.key_id,)
        assert verified.entry_hash == entry_of(fed.store.ledger_entry_for_round(1)).entry_hash  # type: ignore[arg-type]
    with pytest.raises(QflareError) as info:
        outsider.fetch_proof(1, h("x"), 1)
    assert info.value.code == "not_selected"
    assert "not_selected" in fed.events() and "round_not_closed" in fed.events()
    with pytest.raises(QflareError) as info:
        first.fetch_proof(2, digest, examples)  # round 2 is not even open
    assert info.value.code == "round_not_closed"
    # round 1's PROOF frame replayed as the answer about round 2: the round is bound into the frame's AAD
    fed.coordinator.rounds.open_next()
    frames: list[bytes] = []

    def keep(route: Route, out: bytes) -> bytes:
        if route is Route.PROOF:
            frames.append(out)
        return frames[0] if route is Route.PROOF and len(frames) > 1 else out

    fed.transport.tamper_response = keep
    first.fetch_proof(1, digest, examples)
    sent2 = _submit(fed, fed.selected())
    dev2 = next(d for d in fed.devices if d.device_id in sent2)
    with pytest.raises(QflareError) as info:
        dev2.fetch_proof(2, *sent2[dev2.device_id])
    assert info.value.code == "wrong_round" and "frame is for round 1" in str(info.value)


def test_a_device_left_out_by_krum_gets_the_reason(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=3, per_round=3, rounds=1, strategy=krum(f=0, m=1))
    fed.coordinator.rounds.open_next()
    sent = _submit(fed, fed.selected())
    results = {d.device_id: d.fetch_proof(1, *sent[d.device_id])[0] for d in fed.devices}
    assert sorted((r.included, r.reason) for r in results.values()) == [
        (False, "not_combined"),
        (False, "not_combined"),
        (True, None),
    ]
    # a device that claims another update than the one it had acknowledged is refused
    dev = fed.devices[0]
    with pytest.raises(QflareError) as info:
        dev.fetch_proof(1, h("other update"), sent[dev.device_id][1])
    assert info.value.code == "bad_inclusion_proof"


def test_verify_answer_is_total_on_damaged_answers() -> None:
    import random

    entry = _entry()
    good = answer_for(entry, DEVICES[2])
    rng = random.Random(7)
    for _ in range(300):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(raw))
            if op < 0.5:
                raw[i] = rng.randrange(256)
            elif op < 0.75:
                del raw[i : i + rng.randint(1, 40)]
            else:
                raw[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            _check(bytes(raw), 2)
        except QflareError as exc:
            assert exc.code == "bad_inclusion_proof"
