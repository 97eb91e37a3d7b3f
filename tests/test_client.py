"""DeviceClient against a real Coordinator through the in-process transport: state, pinning, the loop."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from qflare.crypto import DEFAULT_SUITE, HIGH_SUITE, SigningKey, VerifyKey
from qflare.device import (
    DeviceClient,
    DeviceState,
    Workload,
    load_workload,
    normalize_key_id,
    pin_server_key,
    read_pin_file,
)
from qflare.errors import AuthError, ConfigError, RevokedError, TokenError
from qflare.federation import FederationSpec
from qflare.models import create_model
from qflare.protocol import Coordinator, RoundConfig, Route
from qflare.storage import Database, Store
from qflare.strategy import build_strategy
from qflare.training import TrainConfig
from qflare.transport import InProcessTransport, ServerUnavailableError
from qflare.wire import ParamLayout


@pytest.fixture(scope="module")
def workloads() -> list[Workload]:
    return [
        load_workload(
            FederationSpec(
                dataset="digits", model="mlp", devices=4, partition="iid", seed=3, train=TrainConfig(batch_size=64)
            ),
            i,
        )
        for i in range(2)
    ]


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    torch.manual_seed(0)
    net = create_model("mlp", (1, 8, 8), 10)
    layout = ParamLayout.from_module(net)
    db = Database(f"sqlite:///{tmp_path}/coordinator.db")
    db.upgrade()
    coord = Coordinator(
        layout=layout,
        initial_flat=layout.module_to_flat(net),
        strategy=build_strategy("fedavg"),
        identity=SigningKey.generate("ML-DSA-65"),
        store=Store(db),
        rounds=RoundConfig(rounds=2, per_round=2, seed=1),
    )
    yield coord
    db.dispose()


def identity_doc(key: VerifyKey) -> dict[str, str]:
    """What GET /v1/identity serves for ``key``."""
    return {"alg": key.alg, "public_key": key.raw.hex(), "key_id": key.key_id, "suite": DEFAULT_SUITE.name}


def stepper(coord: Coordinator, limit: int = 200) -> Callable[[float], None]:
    """The client's sleep: one tick of the round loop (a loop that never ends fails the test instead)."""
    calls = [0]

    def sleep(seconds: float) -> None:
        calls[0] += 1
        assert calls[0] <= limit, "the device loop made no progress"
        coord.rounds.step()

    return sleep


def make_client(
    coord: Coordinator, state_dir: Path, workload: Workload, transport: object | None = None
) -> DeviceClient:
    state = DeviceState(state_dir)
    server_key, suite = pin_server_key(identity_doc(coord.public_key), state.pin(coord.public_key.key_id))
    return DeviceClient(
        transport=transport or InProcessTransport(coord),
        state=state,
        server_key=server_key,
        workload=workload,
        suite=suite,
        sleep=stepper(coord),
    )


def test_state_persists_key_and_enrollment(tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]) -> None:
    (token,) = coordinator.create_tokens(1)
    first = make_client(coordinator, tmp_path / "dev", workloads[0])
    assert first.ensure_enrolled(token) is True
    key_file = tmp_path / "dev" / "key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "dev" / "enrollment.record").stat().st_mode) == 0o600
    assert (tmp_path / "dev" / "server.keyid").read_text().strip() == coordinator.public_key.key_id

    # A restart reuses key and record: no token needed, same device id, and the handshake works.
    again = make_client(coordinator, tmp_path / "dev", workloads[0])
    assert again.device_id == first.device_id
    assert again.ensure_enrolled(None) is False
    assert again.device.enrollment_record == first.device.enrollment_record
    assert len(again.device.connect()) == 64
    # The token was consumed exactly once.
    with pytest.raises(TokenError):
        make_client(coordinator, tmp_path / "other", workloads[0]).ensure_enrolled(token)


def test_unenrolled_without_token_is_refused(
    tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]
) -> None:
    with pytest.raises(ConfigError) as info:
        make_client(coordinator, tmp_path / "dev", workloads[0]).ensure_enrolled(None)
    assert info.value.code == "not_enrolled"


def test_insecure_key_file_is_refused(tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]) -> None:
    make_client(coordinator, tmp_path / "dev", workloads[0])
    (tmp_path / "dev" / "key.pem").chmod(0o644)
    with pytest.raises(ConfigError) as info:
        make_client(coordinator, tmp_path / "dev", workloads[0])
    assert info.value.code == "insecure_key_file"


def test_pin_mismatch_refused(tmp_path: Path, coordinator: Coordinator) -> None:
    other = SigningKey.generate("ML-DSA-65").public
    with pytest.raises(AuthError) as info:
        pin_server_key(identity_doc(other), coordinator.public_key.key_id)
    assert info.value.code == "server_key_mismatch"
    # A document that *claims* the pinned key id but serves another key is refused too.
    forged = identity_doc(other) | {"key_id": coordinator.public_key.key_id}
    with pytest.raises(AuthError):
        pin_server_key(forged, coordinator.public_key.key_id)
    key, suite = pin_server_key(identity_doc(coordinator.public_key), coordinator.public_key.key_id.upper())
    assert key == coordinator.public_key and suite == DEFAULT_SUITE
    with pytest.raises(ConfigError):  # a suite whose signature differs from the key's algorithm
        pin_server_key(identity_doc(coordinator.public_key) | {"suite": HIGH_SUITE.name}, coordinator.public_key.key_id)


def test_state_dir_stays_pinned(tmp_path: Path, coordinator: Coordinator) -> None:
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(ConfigError):
        state.pin(None)
    pinned = state.pin(coordinator.public_key.key_id)
    with pytest.raises(ConfigError):  # given but not yet verified: nothing is stored
        state.pin(None)
    state.save_server_key(coordinator.public_key)  # the served key hashed to the pin
    assert state.pin(None) == pinned  # later starts need no --server-key-id
    with pytest.raises(AuthError) as info:
        state.pin("ab" * 32)
    assert info.value.code == "server_key_mismatch"
    with pytest.raises(AuthError):  # nor can another key be saved over the pin
        state.save_server_key(SigningKey.generate().public)


def test_enrollment_record_from_another_coordinator_is_refused(
    tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]
) -> None:
    (token,) = coordinator.create_tokens(1)
    make_client(coordinator, tmp_path / "dev", workloads[0]).ensure_enrolled(token)
    impostor = SigningKey.generate("ML-DSA-65").public
    with pytest.raises(AuthError) as info:  # the state dir is pinned to the real coordinator
        DeviceClient(
            transport=InProcessTransport(coordinator),
            state=DeviceState(tmp_path / "dev"),
            server_key=impostor,
            workload=workloads[0],
        )
    assert info.value.code == "server_key_mismatch"
    moved = tmp_path / "moved"  # the device's key and record, copied next to another coordinator's pin
    moved.mkdir(mode=0o700)
    for name in ("key.pem", "enrollment.record"):
        (moved / name).write_bytes((tmp_path / "dev" / name).read_bytes())
        (moved / name).chmod(0o600)
    client = DeviceClient(
        transport=InProcessTransport(coordinator), state=DeviceState(moved), server_key=impostor, workload=workloads[0]
    )
    with pytest.raises(AuthError) as info:
        client.ensure_enrolled(None)
    assert info.value.code == "enrollment_mismatch"


def test_pin_file_forms(tmp_path: Path, coordinator: Coordinator) -> None:
    (tmp_path / "coordinator.keyid").write_text(coordinator.public_key.key_id + "\n")
    (tmp_path / "coordinator.pub").write_text(coordinator.public_key.raw.hex())
    assert read_pin_file(tmp_path / "coordinator.keyid") == coordinator.public_key.key_id
    assert read_pin_file(tmp_path / "coordinator.pub") == coordinator.public_key.key_id
    assert normalize_key_id("SHA256:" + coordinator.public_key.key_id.upper()) == coordinator.public_key.key_id
    with pytest.raises(ConfigError):
        normalize_key_id("abc")


def test_run_loop_trains_every_round(tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]) -> None:
    tokens = coordinator.create_tokens(2)
    clients = [make_client(coordinator, tmp_path / f"dev{i}", workloads[i]) for i in range(2)]
    for c, t in zip(clients, tokens, strict=True):
        c.ensure_enrolled(t)
    initial = coordinator.rounds.model.sha256
    # Two devices, both selected each round; run one round at a time per device.
    for _ in range(2):
        for c in clients:
            summary = c.run(max_rounds=1, poll_interval=0.0)
            assert summary.reason == "max_rounds"
    assert coordinator.rounds.finished and coordinator.rounds.model.version == 2
    assert coordinator.rounds.model.sha256 != initial
    for c in clients:
        done = c.run(poll_interval=0.0)
        assert done.reason == "finished" and done.model_version == 2
        receipts = c.state.receipts()
        assert [r["round"] for r in receipts] == [1, 2] and not any(r["duplicate"] for r in receipts)
        stored = {(u.device_id, u.update_hash) for rnd in (1, 2) for u in coordinator.store.updates_for_round(rnd)}
        assert {(c.device_id, r["update_hash"]) for r in receipts} <= stored


class LoseFirstAck:
    """The coordinator handles the first update, then the answer is lost (as when the link drops)."""

    def __init__(self, inner: InProcessTransport) -> None:
        self.inner, self.lost = inner, 0

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        reply = self.inner.request(route, body, session_id)
        if route is Route.UPDATE and self.lost == 0:
            self.lost += 1
            raise ServerUnavailableError("connection reset while reading the answer")
        return reply


def test_lost_acknowledgement_is_resent_and_counted_once(
    tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]
) -> None:
    tokens = coordinator.create_tokens(2)
    flaky = LoseFirstAck(InProcessTransport(coordinator))
    a = make_client(coordinator, tmp_path / "a", workloads[0], transport=flaky)
    b = make_client(coordinator, tmp_path / "b", workloads[1])
    a.ensure_enrolled(tokens[0])
    b.ensure_enrolled(tokens[1])
    summary = a.run(max_rounds=1, poll_interval=0.0)
    assert flaky.lost == 1 and summary.sessions == 2  # reconnected after the lost answer
    assert [(r.round, r.duplicate) for r in summary.receipts] == [(1, True)]
    rows = coordinator.store.updates_for_round(1)
    assert [(u.device_id, u.update_hash) for u in rows] == [(a.device_id, summary.receipts[0].update_hash)]
    assert a.state.receipts()[0]["duplicate"] is True


def test_revoked_device_stops(tmp_path: Path, coordinator: Coordinator, workloads: list[Workload]) -> None:
    (token,) = coordinator.create_tokens(1)
    c = make_client(coordinator, tmp_path / "dev", workloads[0])
    c.ensure_enrolled(token)
    coordinator.revoke(c.device_id, "test")
    with pytest.raises(RevokedError):
        c.run(poll_interval=0.0)


def test_workload_matches_simulation_partition() -> None:
    from qflare.data import load_dataset, partition
    from qflare.training import client_seed

    spec = FederationSpec(dataset="digits", model="mlp", devices=5, partition="dirichlet", alpha=0.5, seed=7)
    w = load_workload(spec, 2)
    data = load_dataset("digits", "train")
    parts = partition("dirichlet", data.labels.numpy(), 5, seed=7, alpha=0.5)
    assert torch.equal(w.targets, data.labels[torch.from_numpy(parts[2])])
    assert torch.allclose(w.inputs, data.normalized(parts[2]))
    flat = w.layout.module_to_flat(w.trainer.model)
    r1, r2 = w.train(flat, 3), w.trainer.train(flat, w.inputs, w.targets, seed=client_seed(7, 3, 2))
    assert torch.equal(r1.delta, r2.delta)
    with pytest.raises(ConfigError):
        load_workload(spec, 5)
