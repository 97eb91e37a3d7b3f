"""A device enrolled under one coordinator key keeps working after ``rotate-key`` and a server restart:
it follows the verified rotation chain, moves its pin, and never re-enrolls.  A forged chain moves nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from server_fixtures import SPEC, AppTransport, make_runtime
from typer.testing import CliRunner

from qflare.cli import app
from qflare.crypto import DEFAULT_SUITE, MsgType, SignedEnvelope, SigningKey
from qflare.crypto.rotation import GENESIS_HASH, ROTATION_NEW_CONTEXT, sign_revocation, sign_rotation
from qflare.device import DeviceClient, DeviceState, load_workload, repin
from qflare.device.rekey import follow_rotations
from qflare.errors import QflareError, error_from_code
from qflare.server import create_app
from qflare.server.rotation import rotate_key

pytestmark = pytest.mark.timeout(240)
ONE = {"per_round": 1, "min_participants": 1, "min_devices": 1, "round_loop": True, "step_interval_s": 0.05}


def _get_json(transport: AppTransport) -> Any:
    def get(path: str) -> Any:
        resp = transport.client.get(path)
        if resp.status_code != 200:
            err = resp.json()
            raise error_from_code(err["code"], err["message"], resp.status_code)
        return resp.json()

    return get


def test_device_follows_a_rotation_across_a_server_restart(tmp_path: Path) -> None:
    server_dir, state = tmp_path / "server", DeviceState(tmp_path / "device")
    workload = load_workload(SPEC, 0)
    runtime = make_runtime(server_dir, **ONE)
    old_key_id = runtime.identity.key_id
    with TestClient(create_app(runtime)) as client:
        transport = AppTransport(client)
        get_json = _get_json(transport)
        assert get_json("/v1/rotations") == {"current_key_id": old_key_id, "head_sha256": "00" * 32, "records": []}
        key, suite = repin(state, get_json, old_key_id)  # nothing is pinned until a session verifies
        dc = DeviceClient(
            transport=transport, state=state, server_key=key, workload=workload, suite=suite,
            rekey=lambda: repin(state, get_json),
        )  # fmt: skip
        token = runtime.coordinator.create_tokens(1)[0]
        assert dc.ensure_enrolled(token)
        first = dc.run(max_rounds=1, poll_interval=0.05, give_up_after_s=60)
        assert first.rounds_trained == [1]
    record = state.load_record()

    result = rotate_key(server_dir, reason="yearly", revoke_old=True)  # the server is down meanwhile
    runtime = make_runtime(server_dir, **ONE)
    new_key = runtime.identity.public
    assert new_key.key_id == result.new_key_id != old_key_id
    with TestClient(create_app(runtime)) as client:
        transport.client = client  # the same device process, talking to the restarted coordinator
        served = get_json("/v1/rotations")
        assert [bytes.fromhex(r) for r in served["records"]] == [r.raw for r in result.chain.records]
        second = dc.run(max_rounds=1, poll_interval=0.05, give_up_after_s=60)
        assert second.rounds_trained == [2]  # round 2's model and ack verified under the new key
        assert dc.server_key == new_key
        # a retried enrollment (a lost reply) gets its record again, now signed by the current key
        retried = dc.device.enroll(token)
        SignedEnvelope.open(retried, new_key, expected_type=MsgType.ENROLL_RECORD)
        devices = runtime.store.list_devices()
        assert [d.device_id for d in devices] == [dc.device_id]  # enrolled once, never again
    assert state.pin(None) == new_key.key_id and state.load_server_key() == new_key
    assert state.pin(old_key_id) == new_key.key_id  # the old pin still names this coordinator
    assert state.load_record() == record  # the enrollment record is the one signed by the old key
    assert state.rotation_chain().revoked == {old_key_id}
    acks = [bytes.fromhex(r["ack"]) for r in state.receipts()]
    assert [r["round"] for r in state.receipts()] == [1, 2]
    SignedEnvelope.open(acks[1], new_key, expected_type=MsgType.UPDATE_ACK)
    with pytest.raises(QflareError):
        SignedEnvelope.open(acks[1], state.former_server_keys()[0], expected_type=MsgType.UPDATE_ACK)
    checks = state.verify_receipts(new_key, former=state.former_server_keys())
    assert [c.ok for c in checks] == [True, True]
    assert [c.ok for c in state.verify_receipts(new_key)] == [False, True]  # round 1 was signed by the old key
    # the restarted device process (a fresh DeviceClient on the same state) accepts its old enrollment
    again = DeviceClient(transport=transport, state=state, server_key=new_key, workload=workload)
    assert again.ensure_enrolled(None) is False
    # round 1's proof was asked once round 2 was open: its entry is signed by the old key, now revoked
    assert second.proof_failures == [1]
    # the ledger: round 1 (old key), the rotation and the revocation (appended at the restart, signed by
    # the new key: rotate_key ran without the database here), round 2 (new key); verifiable from the old pin
    runner, out = CliRunner(), tmp_path / "ledger.jsonl"
    exported = runner.invoke(app, ["ledger", "export", "--data-dir", str(server_dir), "--out", str(out)])
    assert exported.exit_code == 0 and "1 rotation(s)" in " ".join(exported.output.split()), exported.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["kind"], x["body"]["signers"]) for x in lines[1:]] == [
        ("round", [old_key_id]),
        ("key_rotation", [new_key.key_id]),
        ("key_revocation", [new_key.key_id]),
        ("round", [new_key.key_id]),
    ]
    verified = runner.invoke(app, ["ledger", "verify", str(out), "--pin", old_key_id, "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert report["key_chain"] == [old_key_id, new_key.key_id] and report["revoked"] == [old_key_id]


def _pinned_state(tmp_path: Path, key: SigningKey) -> DeviceState:
    state = DeviceState(tmp_path / "device")
    state.pin(key.key_id)
    state.save_server_key(key.public)
    return state


def _identity(key: SigningKey) -> dict[str, str]:
    return {"alg": key.alg, "public_key": key.public.raw.hex(), "key_id": key.key_id, "suite": DEFAULT_SUITE.name}


def _files(state: DeviceState) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state.dir.iterdir()}


def test_a_chain_signed_by_the_new_key_alone_moves_nothing(tmp_path: Path) -> None:
    old, attacker = SigningKey.generate(), SigningKey.generate()
    state = _pinned_state(tmp_path, old)
    before = _files(state)
    good = sign_rotation(old, attacker, sequence=1, prev_hash=GENESIS_HASH, timestamp=1)
    forged = good.body + attacker.sign(good.body, ROTATION_NEW_CONTEXT) * 2  # no signature by the old key
    docs = {"/v1/identity": _identity(attacker), "/v1/rotations": {"records": [forged.hex()]}}
    with pytest.raises(QflareError) as info:
        repin(state, docs.__getitem__)
    assert info.value.code == "bad_rotation_signature"
    assert state.pin(None) == old.key_id and _files(state) == before


def test_chain_refusals_leave_the_pin(tmp_path: Path) -> None:
    k0, k1, k2 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    state = _pinned_state(tmp_path, k0)
    r1 = sign_rotation(k0, k1, sequence=1, prev_hash=GENESIS_HASH, timestamp=1)
    r2 = sign_revocation(k1, k0.key_id, sequence=2, prev_hash=r1.digest, timestamp=2)
    before = _files(state)
    cases: list[tuple[dict[str, Any], Any, str]] = [
        (_identity(k2), {"records": [r1.raw.hex()]}, "rotation_chain_broken"),  # chain ends elsewhere
        (_identity(k1), {"records": "nope"}, "bad_rotation_record"),
        (_identity(k1), {"records": ["zz"]}, "bad_rotation_record"),
        (_identity(k1), {"records": [r1.raw.hex()] * 40}, "bad_rotation_record"),
        (_identity(k1), {"records": [r1.raw[:-1].hex()]}, "bad_rotation_record"),
        (_identity(k1), {"records": []}, "server_key_mismatch"),  # nothing served: the plain pin refusal
        (_identity(k1), {"detail": "x"}, "server_key_mismatch"),
        (_identity(k2), {"records": [sign_rotation(k1, k2, sequence=1, prev_hash=GENESIS_HASH, timestamp=1).raw.hex()]},
         "server_key_mismatch"),  # a chain that does not start from the pin
    ]  # fmt: skip
    for identity, rotations, code in cases:
        with pytest.raises(QflareError) as info:
            follow_rotations(state, identity, rotations)
        assert info.value.code == code, (rotations, info.value)
        assert _files(state) == before
    # the genuine chain moves the pin; the device then knows k0 is revoked and refuses a rotation out of it
    assert follow_rotations(state, _identity(k1), {"records": [r1.raw.hex(), r2.raw.hex()]})[0] == k1.public
    assert state.pin(None) == k1.key_id and state.rotation_chain().revoked == {k0.key_id}
    fork = sign_rotation(k0, k2, sequence=1, prev_hash=GENESIS_HASH, timestamp=3)  # signed with the stolen k0
    with pytest.raises(QflareError) as info:
        follow_rotations(state, _identity(k2), {"records": [fork.raw.hex()]})
    assert info.value.code == "server_key_mismatch"  # not from the pin (k1) any more
    state.dir.joinpath(DeviceState.PIN).write_text(k0.key_id + "\n")  # even a device still on k0 ...
    with pytest.raises(QflareError) as info:
        follow_rotations(state, _identity(k2), {"records": [fork.raw.hex()]})
    assert info.value.code == "rotation_chain_broken"  # ... refuses a fork of the chain it verified
    assert json.loads(state.dir.joinpath(DeviceState.SERVER_KEY).read_text())["public_key"] == k1.public.raw.hex()


@pytest.mark.slow
def test_rotate_key_cli_with_real_server_and_client_processes(tmp_path: Path) -> None:
    """``qflare server`` + ``qflare client`` processes: the operator stops the server, runs ``qflare server
    rotate-key --revoke-old``, starts it again; the device, still given the OLD key file, follows."""
    import shutil
    import subprocess
    import sys

    from http_fixtures import Federation

    from qflare.processes import client_command

    fed = Federation(tmp_path, devices=1, rounds=2, per_round=1)
    try:
        fed.start_server()
        fed.wait_ready()
        old_key_file = tmp_path / "distributed.keyid"  # what the operator gave devices at enrollment
        shutil.copy(fed.data_dir / "coordinator.keyid", old_key_file)
        server = fed.servers["server"]

        def device(token: str | None) -> subprocess.CompletedProcess[str]:
            argv = client_command(
                server_url=fed.url,
                federation_file=server.federation_file,
                key_file=old_key_file,
                state_dir=fed.state_dir(0),
                index=0,
                poll_interval_s=0.1,
                give_up_after_s=60.0,
            )
            env = {**fed.env, "QFLARE_ENROLL_TOKEN": token} if token else fed.env
            return subprocess.run([*argv, "--max-rounds", "1"], env=env, capture_output=True, text=True, timeout=120)

        first = device(fed.tokens_via_cli(1)[0])
        assert first.returncode == 0, first.stderr[-3000:]
        assert server.stop(timeout_s=15.0) in (0, -15)

        rotated = subprocess.run(
            [sys.executable, "-m", "qflare", "server", "rotate-key", "--data-dir", str(fed.data_dir), "--revoke-old"],
            env=fed.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr
        new_key_id = (fed.data_dir / "coordinator.keyid").read_text().strip()
        assert new_key_id != old_key_file.read_text().strip() and new_key_id in rotated.stdout

        fed.start_server("server2")
        fed.wait_ready("server2")
        assert len(fed.api.get_json("/v1/rotations")["records"]) == 2
        second = device(None)  # no token: the enrollment made under the old key still holds
        assert second.returncode == 0, second.stderr[-3000:]
        state = DeviceState(fed.state_dir(0))
        assert state.pin(None) == new_key_id
        assert [r["round"] for r in fed.receipts(0)] == [1, 2]
        db, store = fed.store()
        try:
            assert len(store.list_devices()) == 1
        finally:
            db.dispose()
    finally:
        fed.close()
