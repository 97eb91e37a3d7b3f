"""QFLARE: federated learning with post-quantum security (ML-KEM, ML-DSA).

The public surface, pinned by ``tests/test_public_api.py``::

    from qflare import Device, Coordinator, InProcessTransport, HttpTransport, run_simulation, ...

Subpackages hold the detail: :mod:`qflare.crypto`, :mod:`qflare.data`, :mod:`qflare.strategy`,
:mod:`qflare.protocol`, :mod:`qflare.server`.
"""

from .client import DeviceClient
from .crypto import DEFAULT_POLICY, DEFAULT_SUITE, HIGH_SUITE, Policy, SigningKey, Suite, VerifyKey
from .data import ArrayDataset, load_dataset, partition
from .errors import QflareError
from .models import create_model, register_model
from .protocol import Coordinator, CoordinatorConfig, Device, RoundConfig
from .simulation import SimulationConfig, SimulationResult, run_simulation
from .strategy import ClientUpdate, Pipeline, build_strategy
from .training import LocalTrainer, TrainConfig, TrainResult, evaluate
from .transport import HttpTransport, InProcessTransport
from .wire import ParamLayout, decode_blob, encode_model, encode_update

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "ClientUpdate",
    "Coordinator",
    "CoordinatorConfig",
    "DEFAULT_POLICY",
    "DEFAULT_SUITE",
    "Device",
    "DeviceClient",
    "HIGH_SUITE",
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
    "partition",
    "register_model",
    "run_simulation",
]
