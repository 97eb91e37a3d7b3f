"""Model zoo and registry.

Every model is a plain ``torch.nn.Module`` built by a factory ``(input_shape, num_classes) -> Module``.
Users register their own factory with :func:`register_model` (or ship it in a plugin, see
:mod:`qflare.plugins`) and refer to it by name everywhere a model name is accepted (CLI, simulation,
server), exactly like the built-in ones; :func:`create_model` also takes the factory itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .registry import Registry

__all__ = [
    "MLP",
    "CifarCNN",
    "FedAvgCNN",
    "ModelFactory",
    "ModelInfo",
    "count_parameters",
    "create_model",
    "model_names",
    "register_model",
]

ModelFactory = Callable[[tuple[int, int, int], int], nn.Module]
"""Builds a model for inputs of shape (C, H, W) and a number of classes."""


class FedAvgCNN(nn.Module):
    """The CNN of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS), for 28x28 grey images: conv5x5 32 → pool → conv5x5 64 → pool →
    fc 512 → fc classes, 'same' padding. 1,663,370 parameters for 10 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class CifarCNN(nn.Module):
    """The CIFAR-10 CNN used in FedAvg follow-ups (two 5x5 conv layers of 64, pooling, fc 384 → 192
    → classes; the TensorFlow CIFAR-10 tutorial model used by McMahan et al. 2017, without LRN)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(x)))


class MLP(nn.Module):
    """The "2NN" of McMahan et al. 2017: two hidden layers of 200 units with ReLU."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: int = 200) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its factory takes (input_shape (C, H, W), num_classes)."""

    name: str
    factory: ModelFactory
    description: str = ""


_REGISTRY: Registry[ModelInfo] = Registry("model")


def register_model(name: str, factory: ModelFactory, description: str = "", *, replace: bool = False) -> None:
    """Register ``factory(input_shape, num_classes) -> nn.Module`` under ``name`` (case-insensitive).

    A name that is taken raises :class:`ConfigError` unless ``replace=True``.
    """
    if not callable(factory):
        raise ConfigError(f"model {name!r}: the factory must be callable, got {type(factory).__name__}")
    _REGISTRY.register(name, ModelInfo(name.lower(), factory, description), replace=replace)


def model_names() -> tuple[str, ...]:
    """Every registered model name, sorted (built-in and plugin ones alike)."""
    return tuple(sorted(_REGISTRY.names()))


def create_model(model: str | ModelFactory, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a model for inputs of shape (C, H, W) and ``num_classes`` outputs.

    ``model`` is a registered name or a factory ``(input_shape, num_classes) -> nn.Module``.
    """
    if isinstance(model, str):
        factory, label = _REGISTRY.get(model).factory, model
    elif callable(model):
        factory, label = model, getattr(model, "__name__", repr(model))
    else:
        raise ConfigError(f"a model is a registered name or a factory, got {type(model).__name__}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise ConfigError(f"model {label!r}: input_shape must be (C, H, W), got {tuple(input_shape)}")
    built = factory((shape[0], shape[1], shape[2]), int(num_classes))
    if not isinstance(built, nn.Module):
        raise ConfigError(f"model {label!r}: the factory returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fedavg_cnn(shape: tuple[int, int, int], classes: int) -> nn.Module:
    c, h, w = shape
    if h != w or h % 4:
        raise ConfigError(f"fedavg-cnn needs square images with side divisible by 4, got {h}x{w}")
    return FedAvgCNN(c, classes, h)


def _cifar_cnn(shape: tuple[int, int, int], classes: int) -> nn.Module:
    c, h, w = shape
    if h != w or h % 4:
        raise ConfigError(f"cifar-cnn needs square images with side divisible by 4, got {h}x{w}")
    return CifarCNN(c, classes, h)


def _mlp(shape: tuple[int, int, int], classes: int) -> nn.Module:
    c, h, w = shape
    return MLP(c * h * w, classes)


register_model("fedavg-cnn", _fedavg_cnn, "McMahan et al. 2017 CNN (1,663,370 params on 28x28x1)")
register_model("cifar-cnn", _cifar_cnn, "CIFAR-10 CNN (conv64-conv64-fc384-fc192)")
register_model("mlp", _mlp, "McMahan et al. 2017 2NN (200-200)")
