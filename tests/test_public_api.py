"""The public surface is what ``qflare.__all__`` says, and every name in it resolves."""

from __future__ import annotations

import qflare

EXPECTED = {
    "ArrayDataset",
    "ClientSelector",
    "ClientUpdate",
    "Coordinator",
    "CoordinatorConfig",
    "DEFAULT_POLICY",
    "DEFAULT_SUITE",
    "Device",
    "DeviceClient",
    "FederationSpec",
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
    "load_model",
    "load_plugins",
    "partition",
    "register_dataset",
    "register_model",
    "register_selector",
    "register_strategy",
    "run_simulation",
}


def test_public_api_is_pinned():
    assert set(qflare.__all__) == EXPECTED
    for name in qflare.__all__:
        assert getattr(qflare, name) is not None


def test_subpackages_declare_their_surface():
    import qflare.crypto
    import qflare.data
    import qflare.protocol
    import qflare.secagg
    import qflare.strategy
    import qflare.transport

    for mod in (qflare.crypto, qflare.data, qflare.protocol, qflare.secagg, qflare.strategy, qflare.transport):
        assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__), mod.__name__
