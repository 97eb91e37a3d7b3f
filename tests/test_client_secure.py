"""The device loop (DeviceClient) in secure-aggregation rounds, devices running concurrently."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import torch
from test_client import identity_doc

from qflare.crypto import SigningKey
from qflare.device import DeviceClient, DeviceState, load_workload, pin_server_key
from qflare.device.secure import SECAGG_STATE
from qflare.federation import FederationSpec
from qflare.ledger.canonical import decode
from qflare.models import create_model
from qflare.protocol import Coordinator, RoundConfig, Route
from qflare.storage import Database, Store
from qflare.strategy import fedavg
from qflare.training import TrainConfig
from qflare.transport import InProcessTransport, ServerUnavailableError
from qflare.wire import ParamLayout

N = 4


class LoseFirstAck:
    """Checks the state file is private while a ``route`` message is in flight, and that it already holds
    the message (outbox) and the client state that released it; then loses its first answer."""

    def __init__(self, inner: InProcessTransport, state_dir: Path, route: Route) -> None:
        self.inner, self.state_dir, self.route = inner, state_dir, route
        self.lost, self.modes, self.docs = 0, [], []

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        if route is self.route:
            path = self.state_dir / SECAGG_STATE
            self.modes.append(stat.S_IMODE(path.stat().st_mode))
            self.docs.append(json.loads(path.read_text()))
        reply = self.inner.request(route, body, session_id)
        if route is self.route and self.lost == 0:
            self.lost += 1
            raise ServerUnavailableError("connection reset while reading the answer")
        return reply


def test_device_loops_run_secure_rounds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("mlp", (1, 8, 8), 10)
    layout = ParamLayout.from_module(net)
    db = Database(f"sqlite:///{tmp_path}/coordinator.db")
    db.upgrade()
    store = Store(db)
    coord = Coordinator(
        layout=layout,
        initial_flat=layout.module_to_flat(net),
        strategy=fedavg(secure_aggregation=True),
        identity=SigningKey.generate("ML-DSA-65"),
        store=store,
        rounds=RoundConfig(rounds=2, per_round=N, seed=1, min_devices=N),
    )
    spec = FederationSpec(dataset="digits", model="mlp", devices=N, partition="iid", seed=3, train=TrainConfig())
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        time.sleep(0.01)
        with lock:
            coord.rounds.step()

    clients, flaky = [], []
    for i, token in enumerate(coord.create_tokens(N)):
        state = DeviceState(tmp_path / f"dev{i}")
        key, suite = pin_server_key(identity_doc(coord.public_key), state.pin(coord.public_key.key_id))
        transport = InProcessTransport(coord)
        if i < 2:  # device 0 loses its first masked-input answer, device 1 its first consistency answer
            transport = LoseFirstAck(transport, state.dir, (Route.SECAGG_MASKED, Route.SECAGG_CONSISTENCY)[i])
            flaky.append(transport)
        c = DeviceClient(
            transport=transport, state=state, server_key=key, workload=load_workload(spec, i), suite=suite, sleep=sleep
        )
        c.ensure_enrolled(token)
        clients.append(c)
    coord.rounds.step()
    summaries: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            summaries[i] = clients[i].run(poll_interval=0.01, give_up_after_s=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and all(not t.is_alive() for t in threads)
    assert coord.rounds.finished and coord.rounds.model.version == 2
    for i in range(N):
        assert summaries[i].reason == "finished" and summaries[i].rounds_trained == [1, 2]
        assert not (clients[i].state.dir / SECAGG_STATE).exists()  # the round's secrets left the disk
    for f in flaky:
        assert f.lost == 1 and set(f.modes) == {0o600}
        assert all(d["outbox"][0] == f.route.value for d in f.docs)
    # in each round the signature on U3 was in the stored client state before it was sent (the lost
    # answer's message had been accepted: the task then says submitted, and nothing is sent again)
    assert len(flaky[1].docs) == 2
    for doc in flaky[1].docs:
        signed = json.loads(doc["client"])["signed"]
        assert signed is not None and signed[1] == doc["outbox"][1][0]
    for rnd in (1, 2):
        body = decode(store.ledger_entry_for_round(rnd).body)
        assert body["outcome"] == "closed" and len(body["updates"]) == N
    assert store.count_updates(1) == 0
    db.dispose()
