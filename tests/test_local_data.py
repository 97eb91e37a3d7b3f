"""A device's own data (``qflare client --data``): good files load, every bad one is one clear error."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflare.data import ArrayDataset, load_local_data
from qflare.errors import DataError

SHAPE = (1, 8, 8)
KW = {"input_shape": SHAPE, "num_classes": 10, "mean": (0.5,), "std": (0.25,)}


def npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def refused(path: Path, match: str, **kw: object) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_local_data(path, **{**KW, **kw})  # type: ignore[arg-type]
    assert info.value.code == "bad_local_data"


def test_uint8_pixels_are_normalised_as_the_server_says(tmp_path: Path) -> None:
    x = np.full((5, 8, 8), 255, np.uint8)
    data = load_local_data(npz(tmp_path / "a.npz", x=x, y=np.arange(5)), **KW)  # type: ignore[arg-type]
    assert data.input_shape == SHAPE and data.num_classes == 10 and len(data) == 5
    assert torch.allclose(data.normalized(), torch.full((5, 1, 8, 8), 2.0))  # (1 - 0.5) / 0.25
    assert data.labels.tolist() == [0, 1, 2, 3, 4]


def test_float_inputs_are_taken_as_normalised(tmp_path: Path) -> None:
    x = np.full((3, 1, 8, 8), -1.5, np.float64)
    data = load_local_data(npz(tmp_path / "f.npz", x=x, y=np.array([9, 0, 1], np.uint8)), **KW)  # type: ignore[arg-type]
    assert torch.equal(data.normalized(), torch.full((3, 1, 8, 8), -1.5))


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 8, 8), np.uint8)}, r"exactly the arrays 'x' and 'y', holds 'x'$"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(2, int)}, "holds 'images', 'labels'"),
        (
            {"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(2, int)},
            r"shape \[2, 28, 28\], the coordinator's model takes",
        ),
        ({"x": np.zeros((2, 3, 8, 8), np.uint8), "y": np.zeros(2, int)}, "shape"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(3, int)}, "2 examples but y has 3 labels"),
        (
            {"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, 10])},
            r"labels range over 0..10, but the model has 10 classes",
        ),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([-1, 0])}, "labels range over -1..0"),
        ({"x": np.full((2, 8, 8), np.nan, np.float32), "y": np.zeros(2, int)}, "NaN or infinite"),
        ({"x": np.full((2, 8, 8), 1e300), "y": np.zeros(2, int)}, "NaN or infinite"),
        ({"x": np.zeros((0, 8, 8), np.uint8), "y": np.zeros(0, int)}, "holds no examples"),
        ({"x": np.zeros((2, 8, 8), np.int32), "y": np.zeros(2, int)}, "uint8 pixels or floating-point"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, np.float32)}, "integer labels"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros((2, 1), int)}, "integer labels"),
    ],
)
def test_bad_npz_files(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    refused(npz(tmp_path / "bad.npz", **arrays), match)


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"hello, not a zip")
    refused(tmp_path / "x.npz", "not a NumPy .npz archive")
    refused(tmp_path / "missing.npz", "no such file or folder")


def test_pickled_objects_are_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([object()] * 2, dtype=object), y=np.zeros(2, int))
    refused(path, "only plain numbers")


def test_a_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((20_000, 8, 8), np.uint8), y=np.zeros(20_000, int))
    assert path.stat().st_size < 100_000  # 1.4 MB of zeros in a few KB
    refused(path, "unpacks to more than the 1000000 bytes", max_bytes=1_000_000)
    refused(path, "is .* bytes, more than the 100 allowed", max_bytes=100)


def test_a_header_that_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    """A header declaring a billion examples over a few bytes of data: numpy would allocate first."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 8, 8)})
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 64)
        y = io.BytesIO()
        np.save(y, np.zeros(2, int))
        z.writestr("y.npy", y.getvalue())
    refused(path, "declares 64000000000 bytes of data but the file holds fewer")


def test_a_zip_with_garbage_members_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"not an npy")
        z.writestr("y.npy", b"nor this")
    refused(path, "array 'x' has no valid .npy header")


# ------------------------------------------------------------------------------------- image folders
def png(path: Path, size: tuple[int, int] = (8, 8), value: int = 255, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_image_folder_class_index_is_the_sorted_folder_name(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    names = [f"class_{c}" for c in "abcdefghij"]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        if i in (1, 7):
            png(root / name / "a.png", value=255)
            png(root / name / "b.png", value=0)
    data = load_local_data(root, **KW)  # type: ignore[arg-type]
    assert data.labels.tolist() == [1, 1, 7, 7] and data.input_shape == SHAPE
    assert data.images.dtype == torch.uint8 and data.images[0].max() == 255 and data.images[1].max() == 0


def test_rgb_folder_for_a_three_channel_model(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    png(root / "0" / "a.png", mode="RGB")
    (root / "1").mkdir()
    data = load_local_data(root, input_shape=(3, 8, 8), num_classes=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert data.images.shape == (1, 3, 8, 8) and data.images[0, 0].min() == 255 and data.images[0, 1].max() == 0


def test_bad_image_folders(tmp_path: Path) -> None:
    root = tmp_path / "few"
    png(root / "0" / "a.png")
    refused(root, "has 1 class folders, the model has 10 classes")
    kw = {"num_classes": 2}
    root = tmp_path / "size"
    png(root / "0" / "a.png", size=(9, 8))
    (root / "1").mkdir()
    refused(root, "is 9x8 pixels, the model takes 8x8", **kw)
    root = tmp_path / "jpeg"
    png(root / "0" / "a.png")
    (root / "1").mkdir()
    (root / "1" / "b.jpg").write_bytes(b"\xff\xd8")
    refused(root, r"b.jpg: is not a .png file", **kw)
    root = tmp_path / "corrupt"
    (root / "0").mkdir(parents=True)
    (root / "1").mkdir()
    (root / "0" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    refused(root, "is not a readable PNG", **kw)
    root = tmp_path / "empty"
    (root / "0").mkdir(parents=True)
    (root / "1").mkdir()
    refused(root, "holds no examples", **kw)
    root = tmp_path / "huge"
    png(root / "0" / "a.png", size=(100_000, 8))  # a small file declaring a large image
    (root / "1").mkdir()
    refused(root, "is 100000x8 pixels", **kw)


def test_a_plugin_data_set_can_be_a_devices_whole_data() -> None:
    """A data set a plugin registers, read from the device's own folder, trained on whole (documented as
    ``--dataset NAME --data-root DIR --devices 1 --partition iid``)."""
    from qflare.data.sources import _REGISTRY, register_dataset
    from qflare.device import load_workload
    from qflare.federation import FederationSpec

    seen: list[object] = []

    def loader(split: str, root: object, download: bool) -> ArrayDataset:
        seen.append(root)
        images = torch.arange(37 * 64, dtype=torch.float32).reshape(37, 1, 8, 8) / 1000
        return ArrayDataset("mine", images, torch.arange(37) % 3, 3, (0.0,), (1.0,))

    saved = _REGISTRY.snapshot()
    try:
        register_dataset("my-sensor-data", loader)
        spec = FederationSpec(dataset="my-sensor-data", data_root="/srv/mine", model="mlp", devices=1, partition="iid")
        workload = load_workload(spec, 0)
    finally:
        _REGISTRY.restore(saved)
    assert len(workload.targets) == 37 and sorted(workload.targets.tolist()) == sorted((torch.arange(37) % 3).tolist())
    assert seen == ["/srv/mine"]


def test_a_path_that_is_neither_file_nor_folder(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")
    refused(tmp_path / "fifo", "neither a regular file nor a folder")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads mode-000 folders: permissions do not bind"
)
def test_an_unreadable_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "locked"
    (root / "0").mkdir(parents=True)
    (root / "1").mkdir()
    (root / "0").chmod(0)
    try:
        refused(root, "cannot be read", num_classes=2)
    finally:
        (root / "0").chmod(0o700)
