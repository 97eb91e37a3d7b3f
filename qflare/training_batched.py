"""Training a round's sampled devices together: :class:`BatchedTrainer`.

On a GPU one device's local epoch is a few hundred tiny SGD steps, each bound by kernel launches rather
than arithmetic.  This backend trains the round's K devices at once: K copies of the global weights are
stacked into one ``[K, P]`` tensor, and each step is one ``torch.func.vmap`` of ``torch.func.grad``
over ``functional_call`` — a few large launches for all K devices instead of K sets of small ones.

It runs the same algorithm as :class:`~qflare.training.LocalTrainer`, device by device:

* each device shuffles its own examples with its own generator, seeded exactly as the per-device loop
  seeds it (``client_seed``), so it sees the same batches in the same order;
* batches are padded to ``batch_size`` with masked examples (a partial last batch weighs only its real
  examples, as the per-device mean does); a device with fewer steps than the longest one is padded with
  masked *steps*, in which neither its weights nor its momentum move;
* the SGD update is written on the stacked tensors as ``torch.optim.SGD`` computes it (weight decay
  added to the gradient, momentum buffer ``b = m·b + g`` without dampening, ``w -= lr·b``); FedProx's
  proximal term is part of the differentiated loss and gradient clipping uses each device's own total
  norm, as in ``clip_grad_norm_``.

The result per device is the :class:`~qflare.training.TrainResult` the per-device loop gives (flat
delta, example count, mean loss, steps), so each device still seals and signs its own update through
the unchanged protocol; only the compute is shared.  The two agree to float32 rounding, not bit for
bit: the batched kernels sum in another order (tests/test_training_batched.py states the tolerance).

Models whose training step depends on state or randomness beyond their parameters — BatchNorm running
statistics, dropout, any buffer — are refused with a clear error rather than trained differently.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import ConfigError, NonFiniteError, TrainingError
from .training import TrainConfig, TrainResult, resolve_device
from .wire import ParamLayout

__all__ = ["BatchedTrainer", "DeviceJob", "check_batchable"]

_REFUSED_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass(frozen=True)
class DeviceJob:
    """One device's share of a batched round: its normalised examples and its shuffle seed."""

    inputs: torch.Tensor
    targets: torch.Tensor
    seed: int


def check_batchable(model: nn.Module, layout: ParamLayout) -> None:
    """Refuse (:class:`ConfigError`) a model the batched backend cannot train exactly as the per-device loop.

    The flat vector must be exactly the model's trainable parameters (no float buffers such as BatchNorm
    running statistics, no frozen parameters), and no module may behave differently in training mode
    (batch normalisation, dropout: their state or randomness is per device)."""
    why = "--batched-devices trains only models whose state is their trainable parameters"
    for name, module in model.named_modules():
        if isinstance(module, _REFUSED_MODULES):
            raise ConfigError(
                f"{why}: {name or 'the model'} is a {type(module).__name__} (per-device running statistics or "
                "randomness); train this model without --batched-devices"
            )
    params = dict(model.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        raise ConfigError(f"{why}: parameter(s) {', '.join(frozen[:3])} are frozen (requires_grad=False)")
    if tuple(params) != layout.names:
        extra = [n for n in layout.names if n not in params]
        raise ConfigError(
            f"{why}: the model also holds float buffers ({', '.join(extra[:3]) or 'in another order'}); "
            "train this model without --batched-devices"
        )


def _plan(
    sizes: Sequence[int], seeds: Sequence[int], epochs: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every step's example indices into the concatenated data ``[T, K, batch]``, their mask, and each
    device's number of real steps.  Device d's batches are the per-device loop's: one
    ``randperm(n_d, generator=seeded(seed_d))`` per epoch, cut into runs of ``batch``."""
    per_epoch = [-(-n // batch) for n in sizes]
    steps = [epochs * p for p in per_epoch]
    t_max, k = max(steps), len(sizes)
    index = torch.zeros((t_max, k, batch), dtype=torch.int64)
    mask = torch.zeros((t_max, k, batch), dtype=torch.bool)
    offset = 0
    for d, (n, seed, per) in enumerate(zip(sizes, seeds, per_epoch, strict=True)):
        gen = torch.Generator().manual_seed(seed)
        real = (torch.arange(per * batch) < n).view(per, batch)
        for e in range(epochs):
            padded = torch.full((per * batch,), offset, dtype=torch.int64)
            padded[:n] = torch.randperm(n, generator=gen) + offset
            index[e * per : (e + 1) * per, d] = padded.view(per, batch)
            mask[e * per : (e + 1) * per, d] = real
        offset += n
    return index, mask, steps


class BatchedTrainer:
    """Trains K devices' local SGD at once from one global model (see the module docstring).

    ``input_shape`` (C, H, W), when given, runs one tiny probe step at construction, so a model whose
    forward pass cannot be vectorised (e.g. random ops) is refused before any round starts."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        layout: ParamLayout | None = None,
        *,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.layout = layout or ParamLayout.from_module(self.model)
        check_batchable(self.model, self.layout)
        self.model.train()
        self._grad: Callable[..., tuple[torch.Tensor, torch.Tensor]] = vmap(
            grad(self._device_loss, has_aux=True), in_dims=(0, None, 0, 0, 0)
        )
        if input_shape is not None:
            self._probe(input_shape)

    def _device_loss(
        self, w: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One device's loss on one padded batch: the mean cross-entropy over its real examples (plus
        FedProx's μ/2·‖w − w_global‖²), and that mean alone as the auxiliary output."""
        lay = self.layout
        params = {
            name: piece.view(shape)
            for name, piece, shape in zip(lay.names, torch.split(w, list(lay.sizes)), lay.shapes, strict=True)
        }
        out = functional_call(self.model, params, (x,))
        ce = nn.functional.cross_entropy(out, y, reduction="none")
        loss = (ce * m).sum() / m.sum().clamp(min=1.0)
        total = loss
        if self.config.prox_mu > 0:
            total = loss + 0.5 * self.config.prox_mu * ((w - anchor) ** 2).sum()
        return total, loss.detach()

    def _probe(self, input_shape: tuple[int, int, int]) -> None:
        w = torch.zeros((2, self.layout.numel), device=self.device)
        x = torch.zeros((2, 2, *input_shape), device=self.device)
        y = torch.zeros((2, 2), dtype=torch.int64, device=self.device)
        m = torch.ones((2, 2), device=self.device)
        try:
            self._grad(w, w[0], x, y, m)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"--batched-devices cannot vectorise this model's training step ({first}); "
                "train it without --batched-devices"
            ) from None

    def train_round(self, global_flat: torch.Tensor, jobs: Sequence[DeviceJob]) -> list[TrainResult | TrainingError]:
        """Train every job from ``global_flat``; one entry per job, in order: its :class:`TrainResult`, or
        the :class:`TrainingError` the per-device loop would have raised for it (non-finite loss or
        weights), so one diverging device does not discard the others' results."""
        cfg = self.config
        if not jobs:
            return []
        sizes = [int(j.targets.shape[0]) for j in jobs]
        if min(sizes) < 1:
            raise ConfigError("a device needs at least one example to train")
        shapes = {tuple(j.inputs.shape[1:]) for j in jobs}
        if len(shapes) != 1 or any(int(j.inputs.shape[0]) != n for j, n in zip(jobs, sizes, strict=True)):
            raise ConfigError(f"batched devices need inputs of one example shape, got {sorted(shapes)}")
        start = time.perf_counter()
        dev = self.device
        index, mask, steps = _plan(sizes, [j.seed for j in jobs], cfg.epochs, cfg.batch_size)
        index, weights = index.to(dev), mask.to(dev, dtype=torch.float32)
        counts = weights.sum(dim=2)  # [T, K] real examples per device and step
        active = (counts > 0).unsqueeze(2)  # [T, K, 1]: a device whose data is exhausted does not move
        x_all = torch.cat([j.inputs for j in jobs]).to(dev, dtype=torch.float32)
        y_all = torch.cat([j.targets for j in jobs]).to(dev)
        anchor = global_flat.to(dev, dtype=torch.float32)
        w = anchor.expand(len(jobs), -1).clone()
        buf = torch.zeros_like(w) if cfg.momentum > 0 else None
        loss_sum = torch.zeros(len(jobs), device=dev)
        for t in range(index.shape[0]):
            rows = index[t]
            g, loss = self._grad(w, anchor, x_all[rows], y_all[rows], weights[t])
            if cfg.max_grad_norm is not None:
                norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
                g = g * (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if cfg.weight_decay > 0:
                g = torch.add(g, w, alpha=cfg.weight_decay)
            if buf is not None:
                buf = torch.where(active[t], buf * cfg.momentum + g, buf)
                g = buf
            w = torch.where(active[t], torch.add(w, g, alpha=-cfg.lr), w)
            loss_sum += loss * counts[t]
        deltas = (w - anchor).cpu()
        sums = loss_sum.cpu().tolist()
        duration = time.perf_counter() - start
        results: list[TrainResult | TrainingError] = []
        for d, n in enumerate(sizes):
            mean_loss = sums[d] / (n * cfg.epochs)
            if not math.isfinite(mean_loss):
                results.append(
                    NonFiniteError(f"training loss became {mean_loss} after {steps[d]} steps; update discarded")
                )
            elif not bool(torch.isfinite(deltas[d]).all()):
                results.append(NonFiniteError("model weights became non-finite during training; update discarded"))
            else:
                results.append(TrainResult(deltas[d].clone(), n, mean_loss, duration, steps[d]))
        return results
