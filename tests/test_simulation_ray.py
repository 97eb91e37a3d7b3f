"""`qflare simulate --backend ray`: devices in Ray actors, the coordinator in the driver, bit-identical models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qflare.cli import app
from qflare.errors import ConfigError, ErrorCode, RoundError, TrainingError
from qflare.federation import FederationSpec
from qflare.models import create_model
from qflare.simulation import SimulationConfig, run_simulation
from qflare.training import TrainConfig
from qflare.wire import ParamLayout

runner = CliRunner()
SPEC = FederationSpec(
    dataset="digits", model="mlp", devices=8, per_round=4, rounds=3, alpha=1.0, seed=3, train=TrainConfig(lr=0.1)
)
ARGS = ["simulate", "--dataset", "digits", "--model", "mlp", "--devices", "8", "--per-round", "4", "--rounds", "2"]


@pytest.fixture(scope="module")
def ray_session():
    """One small local Ray for the module (the backend joins a Ray that is already up, and leaves it up)."""
    ray = pytest.importorskip("ray", reason="the Ray backend needs pip install 'qflare[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


def _federation(ray_session, hosts: int = 2):
    from qflare.simulation_ray import RayFederation, RayOptions

    torch.manual_seed(SPEC.seed)
    model = create_model(SPEC.model, (1, 8, 8), 10)
    layout = ParamLayout.from_module(model)
    return RayFederation(SimulationConfig(SPEC), layout, layout.module_to_flat(model), RayOptions(hosts=hosts))


@pytest.mark.slow
def test_more_hosts_than_the_cluster_has_cpus_is_refused_not_a_hang(ray_session):
    with pytest.raises(ConfigError, match=r"3 device host\(s\) \(--workers\) need as many CPUs; the Ray cluster has 2"):
        _federation(ray_session, hosts=3)


@pytest.mark.slow
def test_ray_backend_is_bit_identical_to_the_thread_backend(ray_session, monkeypatch):
    from qflare.simulation_ray import RayOptions, ray_federation

    # One device per host starts per enrollment step: the 8 devices enroll through 4 steps of two lanes.
    monkeypatch.setattr("qflare.simulation_ray._ENROLL_CHUNK", 1)
    threads = run_simulation(SimulationConfig(SPEC, workers=2))
    actors = run_simulation(SimulationConfig(SPEC, workers=2), federation=ray_federation(RayOptions(hosts=2)))
    assert [r.model_sha256 for r in actors.rounds] == [r.model_sha256 for r in threads.rounds]
    assert len({r.model_sha256 for r in actors.rounds}) == 3  # every round published a new model
    for a, t in zip(actors.rounds, threads.rounds, strict=True):
        assert (a.accuracy, a.loss, a.train_loss, a.examples) == (t.accuracy, t.loss, t.train_loss, t.examples)
    assert actors.model is not None and threads.model is not None
    assert torch.equal(actors.model.flat, threads.model.flat)
    assert actors.config["backend"] == "ray" and actors.config["ray_hosts"] == 2
    # another seed gives another federation: the comparison can fail
    other = run_simulation(SimulationConfig(SPEC.replace(seed=4), workers=2), federation=ray_federation())
    assert other.rounds[-1].model_sha256 != threads.rounds[-1].model_sha256


@pytest.mark.slow
def test_devices_trained_on_other_hosts_give_the_same_bits(ray_session, monkeypatch):
    """Every training that may move is run on another host than its device's (its shard and the model it
    verified are sent there, the delta comes back to be signed): the models stay the thread backend's."""
    from qflare.simulation_ray import RayOptions, _TrainingSlots, ray_federation

    evaluated, trained = [], []
    real_acquire = _TrainingSlots.acquire

    def elsewhere_first(self, own, *, anywhere):
        if own is None:  # an evaluation chunk: the hosts evaluate, not the driver
            evaluated.append(own)
            return real_acquire(self, None, anywhere=True)
        k = real_acquire(self, (own + 1) % 2 if anywhere else own, anywhere=False)
        trained.append((k, own))
        return k

    monkeypatch.setattr(_TrainingSlots, "acquire", elsewhere_first)
    threads = run_simulation(SimulationConfig(SPEC, workers=2))
    moved = run_simulation(SimulationConfig(SPEC, workers=2), federation=ray_federation(RayOptions(hosts=2)))
    assert [r.model_sha256 for r in moved.rounds] == [r.model_sha256 for r in threads.rounds]
    assert [(r.accuracy, r.loss) for r in moved.rounds] == [(r.accuracy, r.loss) for r in threads.rounds]
    assert evaluated  # the test set's chunks went to the hosts
    assert len(trained) == SPEC.rounds * SPEC.per_round and all(k != own for k, own in trained)


@pytest.mark.slow
def test_pipelined_enrollment_reaches_the_coordinator_in_device_index_order(ray_session, monkeypatch):
    monkeypatch.setattr("qflare.simulation_ray._ENROLL_CHUNK", 1)  # 4 chunks of 2 devices, two lanes in flight
    fed = _federation(ray_session)
    try:
        enrolled = [fed.index[d.device_id] for d in fed.coordinator.store.list_devices()]
        assert enrolled == list(range(SPEC.devices))  # the enrollment order the selection draws from
        assert fed.coordinator.store.get_device(next(iter(fed.index))) is not None
        # This Ray was already up: the hosts got their two malloc arenas as a runtime environment.
        assert [s.malloc_arena_max for s in fed.host_stats()] == ["2", "2"]
        assert [s.devices for s in fed.host_stats()] == [4, 4]
    finally:
        fed.close()


_OWN_RAY = """
import json, os
from qflare.models import create_model
from qflare.simulation import SimulationConfig
from qflare.federation import FederationSpec
from qflare.simulation_ray import RayFederation, RayOptions
from qflare.training import TrainConfig
from qflare.wire import ParamLayout
SPEC = FederationSpec(dataset="digits", model="mlp", devices=8, per_round=4, rounds=3, alpha=1.0, seed=3,
                      train=TrainConfig(lr=0.1))
model = create_model(SPEC.model, (1, 8, 8), 10)
layout = ParamLayout.from_module(model)
fed = RayFederation(SimulationConfig(SPEC), layout, layout.module_to_flat(model), RayOptions(hosts=1))
try:
    stats = fed.host_stats()
    print(json.dumps({"arenas": [s.malloc_arena_max for s in stats], "devices": [s.devices for s in stats],
                      "driver": os.environ.get("MALLOC_ARENA_MAX")}))
finally:
    fed.close()
"""


@pytest.mark.slow
def test_a_local_ray_it_starts_gives_its_hosts_two_arenas_through_the_environment():
    """Started by the federation (here in a child process: this module's Ray is up), the local Ray
    inherits MALLOC_ARENA_MAX from the driver while it starts; the driver's environment is restored."""
    pytest.importorskip("ray", reason="the Ray backend needs pip install 'qflare[ray]'")
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "RAY_ADDRESS")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _OWN_RAY], env=env, cwd=root, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    seen = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert seen == {"arenas": ["2"], "devices": [SPEC.devices], "driver": None}


@pytest.mark.slow
def test_cli_backend_ray_records_the_backend(ray_session):
    result = runner.invoke(app, [*ARGS, "--backend", "ray", "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    hist = json.loads(result.output.strip().splitlines()[-1])
    assert [r["round"] for r in hist["rounds"]] == [1, 2]
    assert hist["config"]["backend"] == "ray" and hist["config"]["ray_hosts"] == 2


@pytest.mark.slow
def test_host_failures_surface_as_typed_errors(ray_session, monkeypatch):
    fed = _federation(ray_session)
    try:
        assert len(fed.index) == SPEC.devices  # every device enrolled, each under its own identity
        # Outside a round a device still fetches the model and trains (as in the thread backend) ...
        prepared, result = fed.work(0, lambda flat, rnd: pytest.fail("the Ray backend trains in its actors"))
        assert result.num_examples > 0 and result.delta.numel() == 0
        # ... but the coordinator refuses its update: the refusal reaches the device as its typed error,
        # and the driver the same way.
        with pytest.raises(RoundError):
            fed.submit(0, prepared)
        # Submitting the same prepared update again is refused in the driver, before any host or coordinator.
        with pytest.raises(TrainingError) as failed:
            fed.submit(0, prepared)
        assert failed.value.code == ErrorCode.DEVICE_HOST_FAILED and "submitted already" in failed.value.message
        # A failure outside the protocol in a host (here: a device index it does not hold) is device_host_failed.
        with pytest.raises(TrainingError) as failed:
            fed._drive({SPEC.devices: ("start", "fetch")})  # host 0 holds devices 0, 2, 4, 6
        assert failed.value.code == ErrorCode.DEVICE_HOST_FAILED and "KeyError" in failed.value.message
        # A host that dies: its devices' operations fail typed, not with Ray's exception.
        ray_session.kill(fed._hosts[0])
        with pytest.raises(TrainingError) as died:
            fed.work(2, lambda flat, rnd: pytest.fail("unreachable"))
        assert died.value.code == ErrorCode.DEVICE_HOST_FAILED and "died" in died.value.message
        # A training sent to the dead host for a device of the live one fails typed as well.
        monkeypatch.setattr(fed._slots, "acquire", lambda own, *, anywhere: 0)
        with pytest.raises(TrainingError) as died:
            fed.work(1, lambda flat, rnd: pytest.fail("unreachable"))
        assert died.value.code == ErrorCode.DEVICE_HOST_FAILED and "device host 0" in died.value.message
    finally:
        fed.close()


def test_backend_ray_without_ray_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    from qflare.simulation_ray import ray_federation

    with pytest.raises(ConfigError, match=r"qflare\[ray\]"):
        ray_federation()
    result = runner.invoke(app, [*ARGS, "--backend", "ray"])
    assert result.exit_code == 2 and "qflare[ray]" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "gpu"], "--backend must be thread or ray"),
        (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --backend ray"),
        (["--backend", "ray", "--batched-devices"], "--batched-devices"),
        (["--backend", "ray", "--no-protocol"], "--no-protocol"),
        (["--backend", "ray", "--secure-aggregation"], "secure aggregation"),
    ],
)
def test_backend_options_that_do_not_fit_are_refused(extra, message):
    result = runner.invoke(app, [*ARGS, *extra])
    assert result.exit_code == 2 and message in result.output
