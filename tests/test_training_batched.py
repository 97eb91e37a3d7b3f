"""The batched backend (``--batched-devices``) computes the per-device loop's updates, on CPU.

Tolerance.  Both paths run the same float32 algorithm, but the batched kernels (one vectorised grouped
convolution / batched matmul for all devices, a masked sum divided by the real example count instead of
a mean) add in another order, so each step differs by a few float32 ulps (eps = 1.2e-7) of the weights
and momentum carries that forward.  Measured here: at most 4.5e-8 on weights of scale 0.2 after 10 steps
with momentum 0.9.  We allow ``1e-5 · max|w_global|`` (2e-6 for the CNN), ~40x the measured drift yet
~1000x below one SGD step (lr · gradient ≈ 1e-3): a padded step that moved an exhausted device, a wrong
shuffle, a missing weight-decay, prox or clipping term each break it by orders of magnitude.

Where the training path itself is ill-conditioned.  ReLU and max-pooling make the gradient jump where
an activation crosses zero or two pooled values tie, and digits (like Fashion-MNIST) have a constant
background, so a CNN's pooling windows hold exact ties: which tied activation receives the gradient then
depends on the last bit of two equal sums computed in different kernel orders.  Both choices are valid
subgradients, but the device's update then differs by up to about one SGD step.  The per-device loop is
as sensitive to this as the batched path: the loop alone, channels-last against NCHW, differed by
3.2e-4 on one 150-example CNN device of the cases below (2 epochs, momentum 0.9).  So the CNN is
compared with the loop in NCHW order (the batched path's layout), and the inputs are jittered by
0.01·N(0, 1) so that no exact ties exist; what is compared is the per-device arithmetic.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from qflare.cli import app
from qflare.data import load_dataset
from qflare.errors import ConfigError, NonFiniteError, TrainingError
from qflare.federation import FederationSpec
from qflare.models import _REGISTRY as _MODELS
from qflare.models import create_model, register_model
from qflare.simulation import SimulationConfig, _Batched, run_simulation
from qflare.training import LocalTrainer, TrainConfig, TrainResult, client_seed
from qflare.training_batched import BatchedTrainer, DeviceJob
from qflare.wire import ParamLayout

REL_TOL = 1e-5
CNN_TOL = 5e-4
"""The CNN with momentum over two epochs: float32 reductions that differ by an ulp (vmap's batched
convolution against the loop's) can flip a ReLU or a max-pool choice, and momentum carries that on; in a
full-suite run (other tests' thread settings) one element differed by 6.7e-5 at weight scale 0.2.  5e-4
of the weight scale is still far below one SGD step's change, so a masking, shuffle or optimiser bug
still fails."""

# Unequal devices: 5 examples (one partial batch) up to 150 (five batches); offsets into digits' train set.
DEVICES = [(0, 37), (40, 150), (200, 64), (300, 5), (320, 101)]

_VARIANTS = [
    TrainConfig(lr=0.05),
    TrainConfig(lr=0.05, epochs=2, batch_size=16),
    TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3),
    TrainConfig(lr=0.05, prox_mu=0.1),
    TrainConfig(lr=0.5, max_grad_norm=0.5),
    TrainConfig(lr=0.05, epochs=2, momentum=0.9, weight_decay=1e-3, prox_mu=0.1, max_grad_norm=1.0),
]
# every variant on the MLP; the CNN (slower under vmap on CPU) plain and with everything at once
CASES = [("mlp", c, 2) for c in _VARIANTS] + [("fedavg-cnn", _VARIANTS[0], 2), ("fedavg-cnn", _VARIANTS[-1], 2)]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _jobs(train, rnd: int) -> list[DeviceJob]:
    x, y = train.normalized(), train.labels
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # no max-pool ties
    return [DeviceJob(x[o : o + n], y[o : o + n], client_seed(0, rnd, d)) for d, (o, n) in enumerate(DEVICES)]


def _close(a: TrainResult, b: TrainResult | TrainingError, scale: float, tol: float = REL_TOL) -> None:
    assert isinstance(b, TrainResult), b
    assert (b.num_examples, b.steps) == (a.num_examples, a.steps)
    assert float((a.delta - b.delta).abs().max()) <= tol * scale
    assert b.mean_loss == pytest.approx(a.mean_loss, rel=tol)


def _case_id(case: tuple[str, TrainConfig, int]) -> str:
    m, c, _ = case
    return f"{m}-m{c.momentum}-wd{c.weight_decay}-mu{c.prox_mu}-clip{c.max_grad_norm}-e{c.epochs}-b{c.batch_size}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batched_updates_equal_the_per_device_loop(digits, case):
    model_name, cfg, rounds = case
    torch.manual_seed(0)
    make = lambda: create_model(model_name, digits.input_shape, digits.num_classes)  # noqa: E731
    model = make()
    layout = ParamLayout.from_module(model)
    flat = layout.module_to_flat(model)
    loop = LocalTrainer(make(), dataclasses.replace(cfg, channels_last=False), layout)
    batched = BatchedTrainer(make(), cfg, layout, input_shape=digits.input_shape)
    for rnd in range(1, rounds + 1):  # rounds of FedAvg, both paths from the same global model each round
        jobs = _jobs(digits, rnd)
        ref = [loop.train(flat, j.inputs, j.targets, seed=j.seed) for j in jobs]
        got = batched.train_round(flat, jobs)
        scale = float(flat.abs().max())
        for a, b in zip(ref, got, strict=True):
            _close(a, b, scale, REL_TOL if model_name == "mlp" else CNN_TOL)
        total = sum(r.num_examples for r in ref)
        flat = flat + sum(r.delta * (r.num_examples / total) for r in ref)


def test_a_device_trains_the_same_alone_or_among_longer_ones(digits):
    """Padding is invisible: the 5-example device (1 step) next to a 150-example one (5 steps) ends where
    it ends alone, momentum and weight decay included, so its masked steps moved nothing."""
    torch.manual_seed(0)
    cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-2)
    model = create_model("mlp", digits.input_shape, digits.num_classes)
    layout = ParamLayout.from_module(model)
    flat = layout.module_to_flat(model)
    trainer = BatchedTrainer(model, cfg, layout)
    jobs = _jobs(digits, 1)
    together = trainer.train_round(flat, jobs)
    alone = trainer.train_round(flat, [jobs[3]])[0]
    assert isinstance(alone, TrainResult) and alone.steps == 1
    _close(alone, together[3], float(flat.abs().max()))


def test_one_diverging_device_fails_alone(digits):
    torch.manual_seed(0)
    model = create_model("mlp", digits.input_shape, digits.num_classes)
    layout = ParamLayout.from_module(model)
    flat = layout.module_to_flat(model)
    jobs = _jobs(digits, 1)
    bad = jobs[2].inputs.clone()
    bad[3, 0, 0, 0] = float("nan")
    jobs[2] = DeviceJob(bad, jobs[2].targets, jobs[2].seed)
    got = BatchedTrainer(model, TrainConfig(), layout).train_round(flat, jobs)
    assert isinstance(got[2], NonFiniteError) and got[2].code == "non_finite"
    loop = LocalTrainer(create_model("mlp", digits.input_shape, digits.num_classes), TrainConfig(), layout)
    for d in (0, 1, 3, 4):
        _close(loop.train(flat, jobs[d].inputs, jobs[d].targets, seed=jobs[d].seed), got[d], float(flat.abs().max()))


class _WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("scale", torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * self.scale


class _RandomForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.fc(x.flatten(1)), 0.5, training=True)


@pytest.mark.parametrize(
    "build,words",
    [
        (_WithBatchNorm, "BatchNorm1d"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.2)), "Dropout"),
        (_WithBuffer, "float buffers (scale)"),
        (_RandomForward, "cannot vectorise"),
    ],
)
def test_models_it_cannot_train_exactly_are_refused(build, words):
    model = build()
    with pytest.raises(ConfigError) as info:
        BatchedTrainer(model, TrainConfig(), input_shape=(1, 8, 8))
    assert words in str(info.value) and "without --batched-devices" in str(info.value)


def test_frozen_parameters_are_refused():
    model = create_model("mlp", (1, 8, 8), 10)
    next(model.parameters()).requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        BatchedTrainer(model, TrainConfig())


def test_bad_jobs_are_refused(digits):
    model = create_model("mlp", digits.input_shape, digits.num_classes)
    layout = ParamLayout.from_module(model)
    trainer = BatchedTrainer(model, TrainConfig(), layout)
    flat = layout.module_to_flat(model)
    x, y = digits.normalized(), digits.labels
    assert trainer.train_round(flat, []) == []
    with pytest.raises(ConfigError, match="at least one example"):
        trainer.train_round(flat, [DeviceJob(x[:4], y[:4], 0), DeviceJob(x[:0], y[:0], 1)])
    with pytest.raises(ConfigError, match="one example shape"):
        trainer.train_round(flat, [DeviceJob(x[:4], y[:4], 0), DeviceJob(x[:4, :, :4], y[:4], 1)])


def test_a_result_is_handed_only_to_the_model_it_was_trained_from():
    flat = torch.zeros(4)
    res = TrainResult(torch.ones(4), 3, 0.5, 0.1, 1)
    pre = _Batched(2, flat, {7: res, 8: NonFiniteError("diverged")})
    with pytest.raises(TrainingError, match="not the one its update was computed from"):
        pre.result(7, flat + 1e-7, 2)
    with pytest.raises(TrainingError):
        pre.result(7, flat, 3)
    assert pre.result(7, flat.clone(), 2) is res
    with pytest.raises(NonFiniteError):
        pre.result(8, flat, 2)


SPEC = FederationSpec(
    dataset="digits", model="mlp", devices=8, per_round=4, rounds=3, alpha=1.0, seed=3, train=TrainConfig(lr=0.1)
)


@pytest.mark.parametrize("protocol", [True, False])
def test_simulation_history_matches_the_per_device_loop(protocol):
    spec = SPEC.replace(train=TrainConfig(lr=0.1, momentum=0.5, max_grad_norm=2.0))
    loop = run_simulation(SimulationConfig(spec, workers=2, protocol=protocol))
    together = run_simulation(SimulationConfig(spec, workers=2, protocol=protocol, batched_devices=True))
    assert together.config["batched_devices"] is True and loop.config["batched_devices"] is False
    assert [r.round for r in together.rounds] == [1, 2, 3]
    for a, b in zip(loop.rounds, together.rounds, strict=True):
        assert (b.updates, b.examples, b.published) == (a.updates, a.examples, a.published)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
        assert abs(b.accuracy - a.accuracy) <= 2 / 360  # at most two of digits' 360 test images flip
    assert together.model is not None and loop.model is not None
    assert float((together.model.flat - loop.model.flat).abs().max()) <= REL_TOL * float(loop.model.flat.abs().max())


def test_batched_simulation_refuses_a_federation_factory():
    with pytest.raises(ConfigError, match="no federation factory"):
        run_simulation(SimulationConfig(SPEC, batched_devices=True), federation=lambda *a: None)  # type: ignore[arg-type,return-value]


def test_simulate_cli_batched_devices(tmp_path):
    runner = CliRunner()
    args = ["simulate", "--dataset", "digits", "--model", "mlp", "--devices", "6", "--per-round", "3"]
    result = runner.invoke(app, [*args, "--rounds", "2", "--batched-devices", "--json"])
    assert result.exit_code == 0, result.output
    hist = json.loads(result.output.strip().splitlines()[-1])
    assert hist["config"]["batched_devices"] is True and len(hist["rounds"]) == 2
    saved = _MODELS.snapshot()
    register_model("bn-mlp-test", lambda shape, k: _WithBatchNorm(), replace=True)
    try:
        refused = runner.invoke(app, [*args, "--model", "bn-mlp-test", "--rounds", "1", "--batched-devices"])
    finally:
        _MODELS.restore(saved)  # other tests list the registered models
    assert refused.exit_code != 0 and "BatchNorm1d" in refused.output and "Traceback" not in refused.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_batched_updates_equal_the_per_device_loop(digits):
    """On a GPU (qflare/bench/gpu_batched.sh runs it): the MLP's updates, both paths on CUDA, momentum, weight
    decay, prox and clipping on; matmuls in full float32 (no TF32), so the same tolerance holds."""
    cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, prox_mu=0.1, max_grad_norm=1.0, device="cuda")
    torch.manual_seed(0)
    make = lambda: create_model("mlp", digits.input_shape, digits.num_classes)  # noqa: E731
    model = make()
    layout = ParamLayout.from_module(model)
    flat = layout.module_to_flat(model)
    jobs = _jobs(digits, 1)
    ref = [LocalTrainer(make(), cfg, layout).train(flat, j.inputs, j.targets, seed=j.seed) for j in jobs]
    got = BatchedTrainer(make(), cfg, layout, input_shape=digits.input_shape).train_round(flat, jobs)
    for a, b in zip(ref, got, strict=True):
        assert isinstance(b, TrainResult) and b.delta.device.type == "cpu"
        _close(a, b, float(flat.abs().max()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_bench_batched_devices_without_cuda_is_one_clear_line():
    result = CliRunner().invoke(app, ["bench", "batched-devices", "--device", "cuda", "--rounds", "1"])
    assert result.exit_code != 0 and "CUDA is not available" in result.output
    assert "Traceback" not in result.output
