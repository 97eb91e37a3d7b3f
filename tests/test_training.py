"""Models and local training on a real small data set (scikit-learn's digits)."""

from __future__ import annotations

import pytest
import torch

from qflare.data import load_dataset
from qflare.errors import ConfigError, NonFiniteError
from qflare.models import count_parameters, create_model, register_model
from qflare.training import LocalTrainer, TrainConfig, evaluate
from qflare.wire import ParamLayout


def test_fedavg_cnn_has_the_papers_parameter_count():
    assert count_parameters(create_model("fedavg-cnn", (1, 28, 28), 10)) == 1_663_370


def test_user_registered_model_is_usable():
    register_model(
        "tiny-linear",
        lambda shape, k: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(shape[0] * shape[1] * shape[2], k)),
        replace=True,
    )
    m = create_model("tiny-linear", (1, 8, 8), 10)
    assert count_parameters(m) == 64 * 10 + 10
    with pytest.raises(ConfigError):
        create_model("no-such-model", (1, 8, 8), 10)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.mark.parametrize(
    "model_name,cfg",
    [
        ("mlp", TrainConfig(epochs=3, lr=0.1)),
        ("mlp", TrainConfig(epochs=3, lr=0.05, momentum=0.9, weight_decay=1e-4, prox_mu=0.01, max_grad_norm=5.0)),
    ],
)
def test_training_lowers_loss(digits, model_name, cfg):
    train, test = digits
    torch.manual_seed(0)
    model = create_model(model_name, train.input_shape, train.num_classes)
    layout = ParamLayout.from_module(model)
    start = layout.module_to_flat(model)
    before_loss, before_acc = evaluate(model, test.normalized(), test.labels)
    trainer = LocalTrainer(model, cfg, layout)
    result = trainer.train(start, train.normalized(), train.labels, seed=0)
    assert result.num_examples == len(train)
    assert result.steps == cfg.epochs * -(-len(train) // cfg.batch_size)
    assert result.delta.shape == start.shape and result.delta.abs().sum() > 0
    layout.load_into(model, start + result.delta)
    after_loss, after_acc = evaluate(model, test.normalized(), test.labels)
    assert after_loss < before_loss * 0.5
    assert after_acc > before_acc + 0.3


def test_same_seed_same_update(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = create_model("mlp", train.input_shape, train.num_classes)
    layout = ParamLayout.from_module(model)
    flat = layout.module_to_flat(model)
    trainer = LocalTrainer(model, TrainConfig(), layout)
    a = trainer.train(flat, train.normalized(), train.labels, seed=7).delta
    b = trainer.train(flat, train.normalized(), train.labels, seed=7).delta
    c = trainer.train(flat, train.normalized(), train.labels, seed=8).delta
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nan_in_data_is_refused(digits):
    train, _ = digits
    model = create_model("mlp", train.input_shape, train.num_classes)
    x = train.normalized()[:64].clone()
    x[5, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        LocalTrainer(model, TrainConfig()).train(
            ParamLayout.from_module(model).module_to_flat(model), x, train.labels[:64], seed=0
        )
    assert info.value.code == "non_finite"


def test_diverging_training_is_refused(digits):
    train, _ = digits
    model = create_model("mlp", train.input_shape, train.num_classes)
    layout = ParamLayout.from_module(model)
    flat = layout.module_to_flat(model) * 1e30  # weights that overflow on the first step
    with pytest.raises(NonFiniteError):
        LocalTrainer(model, TrainConfig(lr=1e10), layout).train(flat, train.normalized(), train.labels, seed=0)


def test_invalid_config_refused():
    for kwargs in ({"epochs": 0}, {"batch_size": 0}, {"lr": -1.0}, {"lr": float("nan")}, {"max_grad_norm": 0.0}):
        with pytest.raises(ConfigError):
            TrainConfig(**kwargs)
    with pytest.raises(ConfigError):
        LocalTrainer(
            create_model("mlp", (1, 8, 8), 10),
            TrainConfig(device="cuda" if not torch.cuda.is_available() else "cuda:99"),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_training_matches_cpu_shape(digits):
    train, _ = digits
    model = create_model("mlp", train.input_shape, train.num_classes)
    layout = ParamLayout.from_module(model)
    res = LocalTrainer(model, TrainConfig(device="cuda"), layout).train(
        layout.module_to_flat(model).cuda(), train.normalized(), train.labels, seed=0
    )
    assert res.delta.device.type == "cpu" and torch.isfinite(res.delta).all()
