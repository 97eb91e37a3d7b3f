"""Secure-aggregation rounds run by the round state machine over the Device/Coordinator protocol."""

from __future__ import annotations

import pytest
import torch
from protocol_fixtures import FakeClock, Federation

from qflare.crypto.payloads import Frame, seal_parts
from qflare.errors import QflareError
from qflare.ledger.canonical import decode
from qflare.protocol import Route, TaskInfo
from qflare.protocol.secure_device import SecureParticipant
from qflare.protocol.secure_round import NO_INPUT, NO_SHARES
from qflare.strategy import fedavg

N = 8


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def secure_fed(tmp_path, clock, n: int = N, **kw) -> Federation:
    return Federation(tmp_path, n=n, per_round=n, rounds=3, strategy=fedavg(secure_aggregation=True), clock=clock, **kw)


def run_round(fed: Federation, *, drop: dict[str, set[int]] | None = None, clock: FakeClock | None = None):
    """Drive every selected device through the five phases; ``drop[phase]`` = device positions that stop
    before that phase ("advertise", "share", "masked", "consistency", "unmask").  Between phases, when someone dropped,
    the clock passes the phase deadline and the coordinator ticks.  Returns (participants, deltas)."""
    drop = drop or {}
    fed.coordinator.rounds.open_next()
    devices = fed.selected()
    parts = [SecureParticipant.for_task(d, d.task()) for d in devices]
    gone: set[int] = set()
    deltas: dict[int, torch.Tensor] = {}

    def phase(name: str, act) -> None:
        if fed.coordinator.rounds.current is None:  # aborted
            return
        gone.update(drop.get(name, set()))
        for k, p in enumerate(parts):
            if k not in gone:
                act(k, p)
        if drop.get(name) and clock is not None:
            clock.advance(fed.coordinator.rounds.config.round_timeout_s + 1)
            fed.coordinator.rounds.tick()

    phase("advertise", lambda k, p: p.advertise())
    phase("share", lambda k, p: p.share_keys())

    def masked(k: int, p: SecureParticipant) -> None:
        task = p.device.task()
        fed_result = fed.result(seed=k, n=5 + k)
        assert task.secagg == "masked_input"
        deltas[k] = fed_result.delta
        p.masked_input(fed_result.delta, fed_result.num_examples)

    phase("masked", masked)
    phase("consistency", lambda k, p: p.consistency())
    phase("unmask", lambda k, p: p.unmask())
    return parts, deltas


def weighted_mean(deltas: dict[int, torch.Tensor]) -> torch.Tensor:
    total = sum((5 + k) * d.double() for k, d in deltas.items())
    return (total / sum(5 + k for k in deltas)).float()


def test_secure_round_publishes_the_weighted_mean_within_the_bound(tmp_path, clock):
    fed = secure_fed(tmp_path, clock)
    base = fed.coordinator.rounds.model.flat.clone()
    parts, deltas = run_round(fed)
    rm = fed.coordinator.rounds
    assert rm.model.version == 1 and rm.model.round_number == 1
    assert fed.store.get_round(1).state == "closed"
    q = parts[0].config.quant
    weight_sum = sum(5 + k for k in deltas)
    bound = N / (2 * q.scale * weight_sum) + 1e-6  # dequantisation + float32 rounding of the model
    assert (rm.model.flat - (base + weighted_mean(deltas))).abs().max().item() <= bound
    # the coordinator stored no update: it never had one
    assert fed.store.count_updates(1) == 0
    assert fed.store.get_model(1).metrics["secure_aggregation"] == {
        "n": N,
        "k": parts[0].config.params.k,
        "t": parts[0].config.params.t,
        "survivors": N,
        "dropped": 0,
        "weight_sum": sum(5 + k for k in deltas),
    }
    body = decode(fed.store.ledger_entry_for_round(1).body)
    assert body["outcome"] == "closed" and body["pipeline"]["secure_aggregation"] is True
    assert len(body["updates"]) == N and all(u[2] == 0 for u in body["updates"])
    assert {u[0] for u in body["updates"]} == {p.device.device_id for p in parts}
    assert body["left_out"] == []


def test_secure_round_survives_a_dropout_in_each_phase(tmp_path, clock):
    fed = secure_fed(tmp_path, clock)
    base = fed.coordinator.rounds.model.flat.clone()
    parts, deltas = run_round(fed, drop={"masked": {2}}, clock=clock)
    rm = fed.coordinator.rounds
    assert rm.model.version == 1
    assert set(deltas) == set(range(N)) - {2}
    weight_sum = sum(5 + k for k in deltas)
    bound = N / (2 * parts[0].config.quant.scale * weight_sum) + 1e-6
    assert (rm.model.flat - (base + weighted_mean(deltas))).abs().max().item() <= bound
    body = decode(fed.store.ledger_entry_for_round(1).body)
    assert [x[0] for x in body["left_out"]] == [parts[2].device.device_id]
    assert body["left_out"][0][2] == NO_INPUT
    # round 2: one device never shares its keys (k = 4, t = 3: one dropout per round is what n = 8 is sized for)
    parts, deltas = run_round(fed, drop={"share": {0}}, clock=clock)
    assert rm.model.version == 2
    reasons = {x[0]: x[2] for x in decode(fed.store.ledger_entry_for_round(2).body)["left_out"]}
    assert reasons == {parts[0].device.device_id: NO_SHARES}
    # round 3: one survivor does not answer the unmask request: its masked input still counts
    parts, deltas = run_round(fed, drop={"unmask": {5}}, clock=clock)
    assert rm.model.version == 3 and len(deltas) == N
    assert decode(fed.store.ledger_entry_for_round(3).body)["left_out"] == []


def test_too_many_dropouts_abort_the_round_and_publish_nothing(tmp_path, clock):
    fed = secure_fed(tmp_path, clock)
    run_round(fed, drop={"masked": {0, 1, 2, 3, 4, 5}}, clock=clock)
    rm = fed.coordinator.rounds
    assert rm.model.version == 0
    row = fed.store.get_round(1)
    assert row.state == "failed"
    body = decode(fed.store.ledger_entry_for_round(1).body)
    assert body["outcome"] == "failed" and body["reason"] == "secagg_aborted"
    assert rm.current is None  # the next round can open
    assert rm.open_next().number == 2


def test_plaintext_update_in_a_secure_round_is_refused(tmp_path, clock):
    fed = secure_fed(tmp_path, clock, n=4)
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    task = dev.task()
    assert task.secagg == "advertise" and task.selected and not task.submitted
    with pytest.raises(QflareError) as info:
        dev.submit(dev.prepare_update(task, dev.fetch_model(task), fed.result()))
    assert info.value.code == "secagg_mismatch"
    assert "secagg_mismatch" in fed.events()


def test_phase_messages_out_of_phase_or_under_another_index_are_refused(tmp_path, clock):
    fed = secure_fed(tmp_path, clock, n=4)
    fed.coordinator.rounds.open_next()
    a, b = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()[:2]]
    raw = a.client.advertise()
    with pytest.raises(QflareError) as info:  # b relays a's signed advert through its own session
        b.send(Route.SECAGG_ADVERTISE, Frame.SECAGG_ADVERTISE, [raw])
    assert info.value.code == "secagg_mismatch"
    with pytest.raises(QflareError) as info:  # a masked input in the advertise phase
        a.send(Route.SECAGG_MASKED, Frame.SECAGG_MASKED, [raw, b"\0" * 8])
    assert info.value.code == "secagg_mismatch"
    a.send(Route.SECAGG_ADVERTISE, Frame.SECAGG_ADVERTISE, [raw])
    assert a.device.task().submitted
    assert fed.events().count("secagg_mismatch") == 2


def test_secure_routes_in_a_plaintext_round_are_refused(tmp_path, clock):
    fed = Federation(tmp_path, n=3, per_round=3, clock=clock)
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    assert dev.task().secagg == ""
    with pytest.raises(QflareError) as info:
        SecureParticipant(dev, 1)
    assert info.value.code == "secagg_mismatch"


def test_plaintext_task_bytes_are_unchanged_and_secure_ones_parse():
    plain = TaskInfo(3, "open", True, "00" * 32, 2, 5.0, False)
    assert b"secagg" not in plain.to_bytes()
    assert TaskInfo.from_bytes(plain.to_bytes()) == plain
    for phase in ("consistency", "unmask"):
        secure = TaskInfo(3, "open", True, "00" * 32, 2, 5.0, False, phase)
        assert TaskInfo.from_bytes(secure.to_bytes()) == secure
    for bad in ("nonsense", "x" * 100):
        with pytest.raises(QflareError) as info:
            TaskInfo.from_bytes(TaskInfo(3, "open", True, "00" * 32, 2, 5.0, False, bad).to_bytes())
        assert info.value.code == "bad_task"


def restart(fed: Federation, blobs, clock) -> None:
    """A new coordinator process over the same store (the devices re-handshake on their next request)."""
    from qflare.protocol import Coordinator, RoundConfig

    fed.coordinator = Coordinator(
        layout=fed.layout,
        initial_flat=fed.coordinator.rounds.model.flat,
        strategy=fedavg(secure_aggregation=True),
        identity=fed.identity,
        store=fed.store,
        rounds=RoundConfig(rounds=3, per_round=len(fed.devices), seed=0),
        blobs=blobs,
        clock=clock,
    )
    fed.transport.inner.coordinator = fed.coordinator


def test_restart_in_every_phase_resumes_the_round(tmp_path, clock):
    from qflare.storage import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    fed = secure_fed(tmp_path, clock, n=5, blobs=blobs)
    base = fed.coordinator.rounds.model.flat.clone()
    fed.coordinator.rounds.open_next()
    parts = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()]
    restart(fed, blobs, clock)
    for p in parts:
        p.advertise()
    restart(fed, blobs, clock)
    assert fed.coordinator.rounds.current.secure.phase.value == "share_keys"
    for p in parts:
        p.share_keys()
        restart(fed, blobs, clock)  # after every accepted message, too
    deltas = {}
    for k, p in enumerate(parts):
        r = fed.result(seed=k, n=5 + k)
        deltas[k] = r.delta
        p.masked_input(r.delta, r.num_examples)
        restart(fed, blobs, clock)
    assert fed.coordinator.rounds.current.secure.phase.value == "consistency"
    assert all(p.device.task().secagg == "consistency" for p in parts)
    for p in parts:
        p.consistency()
        restart(fed, blobs, clock)
    assert fed.coordinator.rounds.current.secure.phase.value == "unmask"
    for p in parts[:2]:
        p.unmask()
    restart(fed, blobs, clock)
    for p in parts[2:]:
        p.unmask()
    rm = fed.coordinator.rounds
    assert rm.model.version == 1 and fed.store.get_round(1).state == "closed"
    bound = 5 / (2 * parts[0].config.quant.scale * sum(5 + k for k in deltas)) + 1e-6
    assert (rm.model.flat - (base + weighted_mean(deltas))).abs().max().item() <= bound
    assert decode(fed.store.ledger_entry_for_round(1).body)["left_out"] == []


def test_restart_after_the_unmasking_began_fails_the_round(tmp_path, clock):
    from qflare.storage import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    fed = secure_fed(tmp_path, clock, n=4, blobs=blobs)
    fed.coordinator.rounds.open_next()
    parts = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()]
    for p in parts:
        p.advertise()
    for p in parts:
        p.share_keys()
    for k, p in enumerate(parts):
        p.masked_input(fed.result(seed=k).delta, 5)
    for p in parts:
        p.consistency()
    for p in parts[:3]:
        p.unmask()
    stored = fed.store.get_secagg_round(1)
    assert stored is not None and stored.unmasking_at is None
    # a crash between storing "unmasking" and the publication: what the coordinator stores before finish()
    fed.store.save_secagg_round(
        1, config=stored.config, state=stored.state, total=None, phase_deadline=stored.phase_deadline, unmasking=True
    )
    restart(fed, blobs, clock)
    assert fed.coordinator.rounds.current is None
    assert fed.store.get_round(1).state == "failed" and fed.coordinator.rounds.model.version == 0
    assert decode(fed.store.ledger_entry_for_round(1).body)["reason"] == "secagg_aborted"
    assert "secagg_aborted" in fed.events()
    assert fed.coordinator.rounds.open_next().number == 2


def test_restart_with_a_damaged_state_fails_the_round_cleanly(tmp_path, clock):
    from qflare.storage import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    fed = secure_fed(tmp_path, clock, n=4, blobs=blobs)
    fed.coordinator.rounds.open_next()
    parts = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()]
    for p in parts:
        p.advertise()
    stored = fed.store.get_secagg_round(1)
    damaged = stored.state.replace('"adverts": ["', '"adverts": ["00', 1)
    fed.store.save_secagg_round(
        1, config=stored.config, state=damaged, total=None, phase_deadline=stored.phase_deadline
    )
    restart(fed, blobs, clock)
    assert fed.coordinator.rounds.current is None and fed.store.get_round(1).state == "failed"
    assert decode(fed.store.ledger_entry_for_round(1).body)["reason"] == "secagg_aborted"


def test_raw_relay_request_is_total(tmp_path, clock):
    fed = secure_fed(tmp_path, clock, n=4)
    fed.coordinator.rounds.open_next()
    dev = fed.selected()[0]
    for body in ([b""], [b"\x09"], [b"\x01\x02"]):
        with pytest.raises(QflareError):
            dev.exchange(
                Route.SECAGG_RELAY,
                lambda ch, body=body: seal_parts(ch, Frame.SECAGG_RELAY_REQUEST, 1, body),
                lambda ch, data: data,
            )


def test_part_lists_are_parsed_strictly():
    from qflare.crypto.payloads import pack_parts, unpack_parts

    raw = pack_parts([b"a", b"", b"xyz"])
    assert unpack_parts(raw) == [b"a", b"", b"xyz"]
    for bad in (raw[:-1], raw + b"\0", raw[:3], b"\xff\xff\xff\xff", pack_parts([b"a"])[:-2] + b"\0\0"):
        with pytest.raises(QflareError) as info:
            unpack_parts(bad)
        assert info.value.code in ("malformed", "truncated")
    with pytest.raises(QflareError):
        unpack_parts(pack_parts([b"a", b"b"]), max_parts=1)


def test_tampered_masked_input_is_refused_and_recorded(tmp_path, clock):
    fed = secure_fed(tmp_path, clock, n=4)
    fed.coordinator.rounds.open_next()
    parts = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()]
    for p in parts:
        p.advertise()
    for p in parts:
        p.share_keys()
    masked = [p.mask(fed.result(seed=k).delta, 5) for k, p in enumerate(parts)]
    bad = bytearray(masked[0][1])
    bad[7] ^= 1
    with pytest.raises(QflareError) as info:
        parts[0].send_masked([masked[0][0], bytes(bad)])
    assert info.value.code == "hash_mismatch"
    with pytest.raises(QflareError) as info:  # one word short
        parts[0].send_masked([masked[0][0], masked[0][1][:-4]])
    assert info.value.code == "bad_shape"
    events = [e for e in fed.store.security_events(limit=10) if e.reason in ("hash_mismatch", "bad_shape")]
    assert {e.device_id for e in events} == {parts[0].device.device_id}
    assert not parts[0].device.task().submitted
    for p, m in zip(parts, masked, strict=True):  # the genuine ones are still accepted
        p.send_masked(m)
    for p in parts:
        p.consistency()
    for p in parts:
        p.unmask()
    assert fed.coordinator.rounds.model.version == 1
    assert decode(fed.store.ledger_entry_for_round(1).body)["left_out"] == []
    # each device proves, from the signed ledger entry, that its masked vector was summed
    import hashlib

    for p, m in zip(parts, masked, strict=True):
        verified, _ = p.device.fetch_proof(1, hashlib.sha256(m[1]).hexdigest(), 0)
        assert verified.included


def test_dropout_in_the_consistency_phase_completes_while_the_quorum_holds(tmp_path, clock):
    fed = secure_fed(tmp_path, clock)  # n = 8: quorum 5 of the survivors must sign U3
    base = fed.coordinator.rounds.model.flat.clone()
    parts, deltas = run_round(fed, drop={"consistency": {5}}, clock=clock)
    rm = fed.coordinator.rounds
    assert parts[0].config.params.quorum == 5
    assert rm.model.version == 1 and len(deltas) == N  # device 5 sent its masked input: it still counts
    bound = N / (2 * parts[0].config.quant.scale * sum(5 + k for k in deltas)) + 1e-6
    assert (rm.model.flat - (base + weighted_mean(deltas))).abs().max().item() <= bound
    assert decode(fed.store.ledger_entry_for_round(1).body)["left_out"] == []
    # round 2: four of eight sign, one short of the quorum: no device would answer, the round fails
    run_round(fed, drop={"consistency": {0, 1, 2, 3}}, clock=clock)
    assert rm.model.version == 1 and fed.store.get_round(2).state == "failed"
    assert decode(fed.store.ledger_entry_for_round(2).body)["reason"] == "secagg_aborted"
    assert rm.current is None


def test_a_coordinator_splitting_the_survivor_set_gets_no_unmask_answer(tmp_path, clock, monkeypatch):
    """The attack the consistency round stops: the coordinator tells half the devices that device 1
    survived (they would reveal their share of its self mask) and the other half that it dropped (their
    share of its pairwise key): with both it could remove all of device 1's masks.  Each half signs the
    set it was shown; neither half is a quorum, so no device answers either request, whichever
    signatures come with it, and the round fails without a model."""
    from qflare.secagg.messages import SecAggField, SecAggMessage, SecAggMsg, encode_indices

    fed = secure_fed(tmp_path, clock)
    rm = fed.coordinator.rounds
    rm.open_next()
    parts = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()]
    for p in parts:
        p.advertise()
    for p in parts:
        p.share_keys()
    for k, p in enumerate(parts):
        p.masked_input(fed.result(seed=k).delta, 5)
    secure = rm.current.secure
    assert secure.phase.value == "consistency"
    genuine = secure.server.request
    fields = {
        SecAggField.ROUND: (1).to_bytes(8, "big"),
        SecAggField.SESSION: secure.config.session,
        SecAggField.SURVIVORS: encode_indices(list(range(2, N + 1))),
        SecAggField.DROPPED: encode_indices([1]),
    }
    forged = SecAggMessage.build(secure.config.suite, SecAggMsg.UNMASK_REQUEST, fields, fed.identity).raw
    honest_relay = secure.relay

    def relay(device_id: str, what: bytes) -> list[bytes]:  # indices 5..8 are shown the forged set
        out = honest_relay(device_id, what)
        return [forged, *out[1:]] if what == b"\x03" and secure.index_of(device_id) > N // 2 else out

    monkeypatch.setattr(secure, "relay", relay)
    first, second = parts[: N // 2], parts[N // 2 :]
    sigs_first = [p.sign_request()[0] for p in first]
    sigs_second = [p.sign_request()[0] for p in second]
    for p in first:  # the honest server accepts these; it would refuse the others
        p.send(Route.SECAGG_CONSISTENCY, Frame.SECAGG_CONSISTENCY, [p.sign_request()[0]])
    with pytest.raises(QflareError) as info:
        second[0].consistency()
    assert info.value.code == "hash_mismatch"
    # whatever the coordinator relays now, no device reveals a share
    for p in parts:
        for request in (genuine, forged):
            for sigs in (sigs_first, sigs_second, sigs_first + sigs_second):
                with pytest.raises(QflareError) as info:
                    p.client.unmask(request, sigs)
                assert info.value.code == "unmask_refused"
    # a device signs one survivor set per round: shown the other set afterwards, it refuses
    with pytest.raises(QflareError) as info:
        first[1].client.consistency(forged)
    assert info.value.code == "unmask_refused"
    # the honest coordinator's view: 4 signatures of 8 at the deadline, quorum 5: the round fails
    clock.advance(rm.config.round_timeout_s + 1)
    rm.tick()
    assert rm.current is None and rm.model.version == 0
    assert decode(fed.store.ledger_entry_for_round(1).body)["reason"] == "secagg_aborted"


def test_consistency_relay_and_route_only_serve_the_devices_of_the_phase(tmp_path, clock):
    fed = secure_fed(tmp_path, clock, n=5)  # (5, 4, 3), quorum 3
    rm = fed.coordinator.rounds

    def to_consistency(masking: int) -> list[SecureParticipant]:
        rm.open_next()
        parts = [SecureParticipant.for_task(d, d.task()) for d in fed.selected()]
        for p in parts:
            p.advertise()
        for p in parts:
            p.share_keys()
        with pytest.raises(QflareError) as info:  # no request before the masked phase closed
            parts[0].sign_request()
        assert info.value.code == "not_selected"
        for k, p in enumerate(parts[:masking]):
            p.masked_input(fed.result(seed=k).delta, 5)
        if masking < len(parts):
            clock.advance(rm.config.round_timeout_s + 1)
            rm.tick()
        assert rm.current.secure.phase.value == "consistency"
        assert parts[0].device.task().secagg == "consistency"
        return parts

    parts = to_consistency(4)  # the fifth drops: U3 = {1, 2, 3, 4}
    with pytest.raises(QflareError) as info:  # not in U3: nothing to sign
        parts[4].sign_request()
    assert info.value.code == "not_selected"
    for p in parts[:3]:
        p.consistency()
    parts[0].consistency()  # the same signature again is accepted again (a lost answer's resend)
    assert rm.current.secure.phase.value == "consistency" and parts[0].device.task().submitted
    parts[3].consistency()
    assert rm.current.secure.phase.value == "unmask"
    for p in parts[:4]:
        p.unmask()
    assert rm.model.version == 1
    assert [x[0] for x in decode(fed.store.ledger_entry_for_round(1).body)["left_out"]] == [parts[4].device.device_id]
    # round 2: all five mask, the fifth signs only after the deadline
    parts = to_consistency(5)
    for p in parts[:4]:
        p.consistency()
    late = parts[4].sign_request()
    clock.advance(rm.config.round_timeout_s + 1)
    rm.tick()
    assert rm.current.secure.phase.value == "unmask"
    with pytest.raises(QflareError) as info:  # its signature is out of phase now
        parts[4].send(Route.SECAGG_CONSISTENCY, Frame.SECAGG_CONSISTENCY, late)
    assert info.value.code == "secagg_mismatch"
    with pytest.raises(QflareError) as info:  # and it is not asked to unmask
        parts[4].answer()
    assert info.value.code == "not_selected"
    for p in parts[:4]:
        p.unmask()
    assert rm.model.version == 2
    body = decode(fed.store.ledger_entry_for_round(2).body)
    assert len(body["updates"]) == 5 and body["left_out"] == []  # the fifth is in U3: its input counts
    # round 3: two of five sign (quorum 3): the round fails at the phase's close, before any unmask
    parts = to_consistency(5)
    for p in parts[:2]:
        p.consistency()
    clock.advance(rm.config.round_timeout_s + 1)
    rm.tick()
    assert rm.current is None and fed.store.get_round(3).state == "failed"
    assert decode(fed.store.ledger_entry_for_round(3).body)["reason"] == "secagg_aborted"
