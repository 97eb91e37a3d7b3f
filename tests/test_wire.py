"""Tests for qflare.wire: layouts, fingerprints and safetensors blobs."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare.errors import ArchitectureMismatchError, ValidationError
from qflare.wire import Blob, ParamLayout, decode_blob, encode_model, encode_update, sha256_hex


class Net(torch.nn.Module):
    def __init__(self, conv_out: int = 32) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, conv_out, 5)
        self.bn = torch.nn.BatchNorm2d(conv_out)
        self.fc = torch.nn.Linear(conv_out, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv1(x)).mean(dim=(2, 3)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def layout(net: Net) -> ParamLayout:
    return ParamLayout.from_module(net)


CONV_MISMATCH = r"parameter conv1.weight: expected shape \(32, 1, 5, 5\), got \(16, 1, 5, 5\)"


def _md(layout: ParamLayout, kind: str) -> dict[str, str]:
    return {"qflare_format": "1", "qflare_kind": kind, "arch": layout.fingerprint}


def test_sha256_hex_known_vector() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(memoryview(b"abc")) == sha256_hex(b"abc")


def test_layout_from_module_skips_integer_buffers(net: Net, layout: ParamLayout) -> None:
    assert "bn.num_batches_tracked" in net.state_dict()
    assert "bn.num_batches_tracked" not in layout.names
    assert layout.names == (
        "conv1.weight",
        "conv1.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "fc.weight",
        "fc.bias",
    )
    assert layout.shapes[0] == (32, 1, 5, 5)
    assert layout.numel == sum(t.numel() for n, t in net.state_dict().items() if t.is_floating_point())
    assert layout.offsets[:3] == (0, 800, 832)


def test_layout_refuses_non_float32() -> None:
    with pytest.raises(ValidationError, match="float64"):
        ParamLayout.from_state({"w": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValidationError, match="float16"):
        ParamLayout.from_module(torch.nn.Linear(2, 2).half())
    with pytest.raises(ValidationError):
        ParamLayout(("a",), ((2,),), (torch.bfloat16,))


def test_fingerprint_stable_and_shape_sensitive(layout: ParamLayout) -> None:
    again = ParamLayout.from_module(Net())
    assert layout.fingerprint == again.fingerprint == ParamLayout.from_module(Net()).fingerprint
    assert len(layout.fingerprint) == 64
    assert ParamLayout.from_module(Net(conv_out=16)).fingerprint != layout.fingerprint
    shapes = list(layout.shapes)
    shapes[-1] = (11,)
    assert ParamLayout(layout.names, tuple(shapes), layout.dtypes).fingerprint != layout.fingerprint
    renamed = ("fc.b", *layout.names[1:])
    assert ParamLayout(renamed, layout.shapes, layout.dtypes).fingerprint != layout.fingerprint


def test_flatten_unflatten_views(net: Net, layout: ParamLayout) -> None:
    flat = layout.module_to_flat(net)
    assert flat.dtype == torch.float32 and flat.shape == (layout.numel,) and flat.is_contiguous()
    parts = layout.unflatten(flat)
    for name, tensor in net.state_dict().items():
        if name in parts:
            assert torch.equal(parts[name], tensor)
    parts["fc.bias"][0] = 123.0  # a view: writes through to flat
    assert flat[layout.offsets[-1]] == 123.0


def test_load_into_then_module_to_flat_round_trips(net: Net, layout: ParamLayout) -> None:
    target = Net()
    flat = torch.randn(layout.numel)
    layout.load_into(target, flat)
    assert torch.equal(layout.module_to_flat(target), flat)
    assert torch.equal(target.bn.running_var, flat[layout.offsets[5] : layout.offsets[6]])
    assert target.bn.num_batches_tracked.item() == 0  # integer buffer untouched
    assert target.conv1.weight.requires_grad  # parameters keep being parameters


def test_mismatch_messages_name_the_parameter(layout: ParamLayout) -> None:
    small = Net(conv_out=16)
    with pytest.raises(ArchitectureMismatchError, match=CONV_MISMATCH):
        layout.load_into(small, torch.zeros(layout.numel))
    state = {k: v for k, v in Net().state_dict().items() if k != "fc.bias"}
    with pytest.raises(ArchitectureMismatchError, match="parameter fc.bias: missing"):
        layout.flatten(state)
    state = dict(Net().state_dict(), extra=torch.zeros(2))
    with pytest.raises(ArchitectureMismatchError, match="unexpected parameter extra"):
        layout.flatten(state)
    state = dict(Net().state_dict())
    state["fc.bias"] = state["fc.bias"].double()
    with pytest.raises(ArchitectureMismatchError, match="parameter fc.bias: expected dtype float32, got float64"):
        layout.flatten(state)
    wrong_length = rf"expected shape \({layout.numel},\), got \({layout.numel - 1},\)"
    with pytest.raises(ArchitectureMismatchError, match=wrong_length):
        layout.unflatten(torch.zeros(layout.numel - 1))
    with pytest.raises(ArchitectureMismatchError, match="float64"):
        layout.unflatten(torch.zeros(layout.numel, dtype=torch.float64))


def test_model_round_trip_bit_exact(net: Net, layout: ParamLayout) -> None:
    flat = layout.module_to_flat(net)
    flat[0] = float("nan")  # bit patterns survive, even odd ones
    flat[1] = -0.0
    data = encode_model(layout, flat, {"round": "7"})
    blob = decode_blob(data, layout, kind="model", expected_sha256=sha256_hex(data))
    assert isinstance(blob, Blob)
    assert blob.kind == "model" and blob.metadata == {"round": "7"} and blob.nbytes == len(data)
    assert blob.sha256 == sha256_hex(data)
    assert torch.equal(blob.flat.view(torch.int32), flat.view(torch.int32))
    # usable by other tools: one named tensor per parameter, metadata in the header
    loaded = safetensors.torch.load(data)
    assert set(loaded) == set(layout.names)
    assert torch.equal(loaded["fc.weight"], net.fc.weight.detach())


def test_update_round_trip_bit_exact_and_owned(layout: ParamLayout) -> None:
    flat = torch.randn(layout.numel)
    data = encode_update(layout, flat)
    assert list(safetensors.torch.load(data)) == ["delta"]
    blob = decode_blob(bytearray(data), layout, kind="update")
    assert blob.kind == "update" and blob.metadata == {}
    assert torch.equal(blob.flat.view(torch.int32), flat.view(torch.int32))
    blob.flat.add_(1.0)  # writable and independent of the input bytes
    assert torch.equal(decode_blob(data, layout).flat, flat)


def test_verified_sha256_is_not_recomputed(layout: ParamLayout) -> None:
    data = encode_update(layout, torch.zeros(layout.numel))
    assert decode_blob(data, layout).sha256 == sha256_hex(data)
    # the caller's already-checked digest is taken as is (the protocol checks it against a signed hash)
    assert decode_blob(data, layout, verified_sha256="ab" * 32).sha256 == "ab" * 32


def test_reserved_or_non_str_metadata_refused(layout: ParamLayout) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        encode_update(layout, torch.zeros(layout.numel), {"arch": "x"})
    with pytest.raises(ValidationError):
        encode_update(layout, torch.zeros(layout.numel), {"n": 3})  # type: ignore[dict-item]


def test_wrong_arch_refused_naming_both_fingerprints(layout: ParamLayout) -> None:
    other = ParamLayout.from_module(Net(conv_out=16))
    data = encode_update(other, torch.zeros(other.numel))
    with pytest.raises(ArchitectureMismatchError) as info:
        decode_blob(data, layout)
    assert other.fingerprint in str(info.value) and layout.fingerprint in str(info.value)
    model = encode_model(other, torch.zeros(other.numel))
    with pytest.raises(ArchitectureMismatchError, match=CONV_MISMATCH):
        decode_blob(model, layout)


def test_model_blob_with_right_arch_but_wrong_tensor_refused(net: Net, layout: ParamLayout) -> None:
    tensors = dict(layout.unflatten(layout.module_to_flat(net)))
    tensors["fc.bias"] = torch.zeros(11)
    data = safetensors.torch.save(tensors, metadata=_md(layout, "model"))
    with pytest.raises(ArchitectureMismatchError, match=r"parameter fc.bias: expected shape \(10,\), got \(11,\)"):
        decode_blob(data, layout)
    del tensors["fc.bias"]
    data = safetensors.torch.save(tensors, metadata=_md(layout, "model"))
    with pytest.raises(ArchitectureMismatchError, match="parameter fc.bias: missing"):
        decode_blob(data, layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_wrong_dtype_refused(net: Net, layout: ParamLayout, dtype: torch.dtype) -> None:
    update = safetensors.torch.save({"delta": torch.zeros(layout.numel, dtype=dtype)}, metadata=_md(layout, "update"))
    with pytest.raises(ArchitectureMismatchError, match="expected dtype F32, got F(64|16)"):
        decode_blob(update, layout)
    tensors = {k: v.to(dtype) for k, v in layout.unflatten(layout.module_to_flat(net)).items()}
    model = safetensors.torch.save(tensors, metadata=_md(layout, "model"))
    with pytest.raises(ArchitectureMismatchError, match="parameter conv1.weight: expected dtype F32"):
        decode_blob(model, layout)


def test_wrong_length_update_refused(layout: ParamLayout) -> None:
    data = safetensors.torch.save({"delta": torch.zeros(layout.numel + 1)}, metadata=_md(layout, "update"))
    with pytest.raises(ArchitectureMismatchError, match="delta"):
        decode_blob(data, layout)


def test_wrong_kind_refused(layout: ParamLayout) -> None:
    data = encode_update(layout, torch.zeros(layout.numel))
    with pytest.raises(ValidationError) as info:
        decode_blob(data, layout, kind="model")
    assert info.value.code == "wrong_kind"


def test_wrong_hash_refused(layout: ParamLayout) -> None:
    data = encode_update(layout, torch.zeros(layout.numel))
    with pytest.raises(ValidationError) as info:
        decode_blob(data, layout, expected_sha256="0" * 64)
    assert info.value.code == "hash_mismatch"


def test_missing_metadata_and_wrong_format_refused(layout: ParamLayout) -> None:
    plain = safetensors.torch.save({"delta": torch.zeros(layout.numel)})
    with pytest.raises(ValidationError) as info:
        decode_blob(plain, layout)
    assert info.value.code == "malformed_blob"
    md = {**_md(layout, "update"), "qflare_format": "2"}
    future = safetensors.torch.save({"delta": torch.zeros(layout.numel)}, metadata=md)
    with pytest.raises(ValidationError) as info:
        decode_blob(future, layout)
    assert info.value.code == "unsupported_format"


def test_truncated_bytes_refused(layout: ParamLayout) -> None:
    data = encode_update(layout, torch.zeros(layout.numel))
    for cut in (0, 4, 8, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(ValidationError) as info:
            decode_blob(data[:cut], layout)
        assert info.value.code == "malformed_blob"


def test_overlapping_offsets_refused(layout: ParamLayout) -> None:
    header = {
        "__metadata__": _md(layout, "update"),
        "delta": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    raw = json.dumps(header).encode()
    with pytest.raises(ValidationError) as info:
        decode_blob(struct.pack("<Q", len(raw)) + raw + b"\0" * 4, layout)
    assert info.value.code == "malformed_blob"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_validation_errors(data: bytes) -> None:
    layout = ParamLayout(("w",), ((3,),), (torch.float32,))
    with pytest.raises(ValidationError):
        decode_blob(data, layout)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_corrupted_valid_blob_never_escapes_validation_error(data: st.DataObject) -> None:
    layout = ParamLayout(("a", "b"), ((2, 2), (3,)), (torch.float32,) * 2)
    blob = bytearray(encode_model(layout, torch.arange(7, dtype=torch.float32)))
    header_end = 8 + struct.unpack_from("<Q", blob)[0]
    pos = data.draw(st.integers(0, header_end - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    try:
        decode_blob(bytes(blob), layout)
    except ValidationError:
        pass


def test_random_large_bytes_refused(layout: ParamLayout) -> None:
    for _ in range(20):
        with pytest.raises(ValidationError):
            decode_blob(os.urandom(4096), layout)


def test_equal_content_has_equal_bytes_across_processes():
    """safetensors orders its metadata map differently in every process; the blob must not."""
    import subprocess
    import sys

    code = (
        "import torch; from qflare.wire import *; from qflare.models import create_model;"
        "torch.manual_seed(0); m=create_model('mlp',(1,8,8),10); l=ParamLayout.from_module(m); f=l.module_to_flat(m);"
        "print(sha256_hex(encode_model(l,f,{'version':'3','b':'x','a':'y'})), sha256_hex(encode_update(l,f,{'round':'1','z':'q'})))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(4)
    }
    assert len(outs) == 1, outs


def test_deeply_nested_header_is_malformed_not_a_crash() -> None:
    """json's RecursionError on 50,000 nested arrays used to escape the parser (a 500 on the coordinator)."""
    layout = ParamLayout.from_state({"w": torch.zeros(2)})
    header = b"[" * 50_000
    with pytest.raises(ValidationError) as info:
        decode_blob(struct.pack("<Q", len(header)) + header, layout)
    assert info.value.code == "malformed_blob"
