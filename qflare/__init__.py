"""QFLARE: federated learning with post-quantum security (ML-KEM, ML-DSA).

The public surface, pinned by ``tests/test_public_api.py``::

    from qflare import Device, Coordinator, InProcessTransport, HttpTransport, run_simulation, ...
    net = qflare.load_model("out/model.safetensors")  # the trained global model as an nn.Module

Subpackages hold the detail: :mod:`qflare.crypto`, :mod:`qflare.data`, :mod:`qflare.strategy`,
:mod:`qflare.protocol`, :mod:`qflare.storage`,
:mod:`qflare.device`, :mod:`qflare.server`.  Extending QFLARE (models, aggregation rules, data sets,
client selection, plugins): ``docs/extending.md``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .crypto import DEFAULT_POLICY, DEFAULT_SUITE, HIGH_SUITE, Policy, SigningKey, Suite, VerifyKey
from .data import ArrayDataset, load_dataset, partition, register_dataset
from .device import DeviceClient
from .errors import QflareError
from .federation import FederationSpec
from .model_file import load_model
from .models import create_model, register_model
from .plugins import load_plugins
from .protocol import ClientSelector, Coordinator, CoordinatorConfig, Device, RoundConfig, register_selector
from .strategy import ClientUpdate, Pipeline, build_strategy, register_strategy
from .training import LocalTrainer, TrainConfig, TrainResult, evaluate
from .transport import HttpTransport, InProcessTransport
from .wire import ParamLayout, decode_blob, encode_model, encode_update

__version__ = "0.1.0"

# The simulation pulls in the coordinator's SQL storage (SQLAlchemy); a device process that imports
# ``qflare`` must not pay for it, so these three names load on first use (PEP 562).
_LAZY = {"SimulationConfig": "simulation", "SimulationResult": "simulation", "run_simulation": "simulation"}

if TYPE_CHECKING:
    from .simulation import SimulationConfig, SimulationResult, run_simulation


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_SUITE",
    "HIGH_SUITE",
    "ArrayDataset",
    "ClientSelector",
    "ClientUpdate",
    "Coordinator",
    "CoordinatorConfig",
    "Device",
    "DeviceClient",
    "FederationSpec",
    "HttpTransport",
    "InProcessTransport",
    "LocalTrainer",
    "ParamLayout",
    "Pipeline",
    "Policy",
    "QflareError",
    "RoundConfig",
    "SigningKey",
    "SimulationConfig",
    "SimulationResult",
    "Suite",
    "TrainConfig",
    "TrainResult",
    "VerifyKey",
    "__version__",
    "build_strategy",
    "create_model",
    "decode_blob",
    "encode_model",
    "encode_update",
    "evaluate",
    "load_dataset",
    "load_model",
    "load_plugins",
    "partition",
    "register_dataset",
    "register_model",
    "register_selector",
    "register_strategy",
    "run_simulation",
]
