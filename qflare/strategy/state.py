"""Persisting the stateful parts of a pipeline (server-optimiser moments, noise generator, DP-FedAvg's
clip norm and accounted rounds).

A coordinator stores these bytes next to each published model, so a restarted server continues FedAvgM,
FedAdam, FedYogi, FedAdagrad and central-DP noise exactly where they were instead of resetting them.
Format: safetensors; tensors under ``<part>.<name>``, other values (ints, floats, None) as JSON in the
metadata under ``<part>.<name>``.
"""

from __future__ import annotations

import json
from typing import Any

import safetensors.torch
import torch

from qflare.errors import ValidationError
from qflare.strategy.pipeline import Pipeline

__all__ = ["encode_pipeline_state", "load_pipeline_state"]


def _parts(pipeline: Pipeline) -> dict[str, Any]:
    parts: dict[str, Any] = {"server_opt": pipeline.server_opt, "combine": pipeline.combine}
    if pipeline.noise is not None:
        parts["noise"] = pipeline.noise
    return {k: v for k, v in parts.items() if hasattr(v, "state_dict")}


def encode_pipeline_state(pipeline: Pipeline) -> bytes | None:
    """The pipeline's state as bytes, or None when it has none (e.g. plain FedAvg)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for part, obj in _parts(pipeline).items():
        for key, value in obj.state_dict().items():
            name = f"{part}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                meta[name] = json.dumps(value)
    if not tensors and not meta:
        return None
    return safetensors.torch.save(tensors, metadata=dict(sorted(meta.items())))


def load_pipeline_state(pipeline: Pipeline, data: bytes) -> None:
    try:
        tensors = safetensors.torch.load(data)
        with_meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own error types for malformed input
        raise ValidationError(f"pipeline state is not valid safetensors: {exc}", code="malformed_blob") from None
    for part, obj in _parts(pipeline).items():
        state: dict[str, object] = {}
        prefix = part + "."
        for name, tensor in tensors.items():
            if name.startswith(prefix):
                state[name[len(prefix) :]] = tensor
        for name, text in with_meta.items():
            if name.startswith(prefix):
                state[name[len(prefix) :]] = json.loads(text)
        obj.load_state_dict(state)
