"""Local training on a device: :class:`LocalTrainer` and global-model evaluation.

A trainer owns one model instance and reuses it round after round: the global weights are copied in,
the device's examples are trained for ``epochs``, and the result is the flat float32 *delta*
``local - global`` that the device then seals and sends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, NonFiniteError
from .precision import Precision, check_precision, resolve_precision
from .wire import ParamLayout

__all__ = [
    "LocalTrainer",
    "TrainConfig",
    "TrainResult",
    "client_seed",
    "evaluate",
    "resolve_device",
]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one device's local training."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    """FedProx proximal term μ/2·‖w − w_global‖² (Li et al. 2020, "Federated Optimization in
    Heterogeneous Networks"); 0 disables it (plain FedAvg local SGD)."""
    max_grad_norm: float | None = None
    device: str = "cpu"
    channels_last: bool = True
    """Keep 4-D activations and conv weights in NHWC order: on CPU, oneDNN's convolutions run ~1.4x
    faster this way for the FedAvg CNN at batch 32 (``qflare/bench/eval_layout.py``).  Values are unchanged up
    to float rounding; the flat parameter vector is always in logical (NCHW) order."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (forward pass and loss under bfloat16 autocast) or ``auto`` (bf16 where the device
    runs it natively): :mod:`qflare.precision`.  Weights, optimiser step and the update stay float32."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("epochs must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr must be a positive finite number")
        if self.momentum < 0 or self.weight_decay < 0 or self.prox_mu < 0:
            raise ConfigError("momentum, weight_decay and prox_mu must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm must be > 0")
        check_precision(self.precision)


@dataclass
class TrainResult:
    delta: torch.Tensor
    num_examples: int
    mean_loss: float
    duration_s: float
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available). Asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available in this torch build")
    return dev


class LocalTrainer:
    """Trains one model instance on a device's examples.

    ``inputs`` given to :meth:`train` are already normalised float32 ``[n, C, H, W]`` and ``targets``
    int64 ``[n]``; the trainer moves them to its device once per call.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, layout: ParamLayout | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # real API; missing from the stubs
        self.layout = layout or ParamLayout.from_module(self.model)
        self.precision: Precision = resolve_precision(config.precision, self.device)
        self._loss = nn.CrossEntropyLoss()

    def train(
        self,
        global_flat: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        seed: int,
    ) -> TrainResult:
        cfg = self.config
        n = int(targets.shape[0])
        if n < 1:
            raise ConfigError("a device needs at least one example to train")
        start = time.perf_counter()
        dev = self.device
        global_dev = global_flat.to(dev, dtype=torch.float32)
        self.layout.load_into(self.model, global_dev)
        x = inputs.to(dev, non_blocking=True)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = targets.to(dev, non_blocking=True)
        model = self.model
        model.train()
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
        )
        params = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
        gen = torch.Generator().manual_seed(seed)
        loss_sum = torch.zeros((), device=dev)
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).to(dev)
            for s in range(0, n, cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                with self.precision.autocast():  # bf16: the forward pass and loss; the weights stay float32
                    loss = self._loss(model(x[idx]), y[idx]).float()
                total = loss
                if anchors is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    total = loss + 0.5 * cfg.prox_mu * prox
                total.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                loss_sum += loss.detach() * idx.numel()
                steps += 1
        mean_loss = float(loss_sum) / (n * cfg.epochs)
        delta = self.layout.module_to_flat(model).sub_(global_dev)
        if not math.isfinite(mean_loss):
            raise NonFiniteError(f"training loss became {mean_loss} after {steps} steps; update discarded")
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteError("model weights became non-finite during training; update discarded")
        return TrainResult(
            delta=delta.cpu(),
            num_examples=n,
            mean_loss=mean_loss,
            duration_s=time.perf_counter() - start,
            steps=steps,
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 128,
    channels_last: bool = True,
    precision: Precision | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on normalised ``inputs``.

    Small batches in NHWC order are the fast path on CPU (the activations of a batch stay in cache):
    for the FedAvg CNN on 10k images, batch 128 channels-last took 1.4 s on one core against 3.0 s for
    batch 1000 NCHW (``python qflare/bench/eval_layout.py``).  Under a bf16 ``precision`` the forward pass
    runs in autocast and the logits are cast to float32 before the loss and the arg-max."""
    model.eval()
    if channels_last and inputs.dim() == 4:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # real API; missing from the stubs
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    dev = next(model.parameters()).device
    loss_sum = 0.0
    correct = 0
    n = int(targets.shape[0])
    for s in range(0, n, batch_size):
        x = inputs[s : s + batch_size].to(dev)
        y = targets[s : s + batch_size].to(dev)
        if precision is None:
            out = model(x)
        else:
            with precision.autocast():
                out = model(x)
            out = out.float()
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss_sum / n, correct / n


def client_seed(seed: int, rnd: int, device: int) -> int:
    """The seed of device ``device``'s shuffles in round ``rnd`` (shared with the bare reference)."""
    return ((seed * 1_000_003 + rnd) * 1_000_003 + device) % (2**63)
