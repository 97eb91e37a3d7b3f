"""Dataset loading (IDX, CIFAR pickles, digits, synthetic), search order, and checksummed downloads."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from qflare.data import (
    DATASETS,
    KNOWN_FILES,
    ArrayDataset,
    MirrorFile,
    download_dataset,
    fetch,
    load_dataset,
    parse_idx,
    read_idx,
    sources,
)
from qflare.data.download import default_cache_dir, extract_tar
from qflare.errors import DataError, DatasetMissingError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
no_system_mnist = pytest.mark.skipif(
    Path("/usr/share/datasets/mnist").is_dir(), reason="a system MNIST copy would be found first"
)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QFLARE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    dt = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[code]
    head = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(dt).tobytes()


def write_mnist_like(directory: Path, n: int, *, gz: bool, split: str = "train", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    directory.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(arr, 0x08)
        name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
        (directory / name).write_bytes(gzip.compress(data) if gz else data)
    return images


# ------------------------------------------------------------------------------------ Fashion-MNIST
@pytest.fixture(scope="module")
def fashion_train() -> ArrayDataset:
    return load_dataset("fashion-mnist", "train", root=FASHION_DIR)


@needs_fashion
def test_fashion_mnist_train_from_debian_dir(fashion_train: ArrayDataset) -> None:
    ds = fashion_train
    assert len(ds) == 60000 and ds.images.shape == (60000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 6000))
    x = ds.normalized()
    assert x.dtype == torch.float32 and x.shape == ds.images.shape
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01


@needs_fashion
def test_fashion_mnist_test_split_and_alias() -> None:
    ds = load_dataset("fmnist", "test")
    assert ds.name == "fashion-mnist" and ds.images.shape == (10000, 1, 28, 28)
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9


@needs_fashion
def test_known_fashion_hashes_match_debian_copies() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"network used for {request.url}")

    with httpx.Client(transport=httpx.MockTransport(refuse)) as client:
        for file in KNOWN_FILES["fashion-mnist"]:
            assert fetch(file, FASHION_DIR, client=client) == FASHION_DIR / file.name


# ---------------------------------------------------------------------------------------------- IDX
def test_parse_idx_types_and_endianness() -> None:
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(u8, 0x08)), u8)
    i32 = np.array([258, -1, 1 << 30], dtype=np.int32)
    raw = idx_bytes(i32, 0x0C)
    assert raw[-12:-8] == b"\x00\x00\x01\x02"  # really big-endian on disk
    out = parse_idx(raw)
    assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == [258, -1, 1 << 30]
    f32 = np.array([[0.5, -2.25]], dtype=np.float32)
    assert np.array_equal(parse_idx(idx_bytes(f32, 0x0D)), f32)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_and_gz(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(60, dtype=np.uint8).reshape(5, 12)
    data = idx_bytes(arr, 0x08)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert np.array_equal(out, arr) and out.flags.writeable


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x42" + b[3:], "dtype code"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:2], "truncated"),
    ],
)
def test_read_idx_rejects_bad_files_naming_them(tmp_path: Path, mutate: Callable[[bytes], bytes], needle: str) -> None:
    path = tmp_path / "broken-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8), 0x08)))
    with pytest.raises(DataError, match=needle) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, dtype=np.uint8), 0x08))[:-10])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        read_idx(path)


# ---------------------------------------------------------------------------------- search order
def test_explicit_root_loads_raw_idx_and_ignores_other_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = write_mnist_like(tmp_path / "mine", 7, gz=False)
    write_mnist_like(tmp_path / "env" / "mnist", 3, gz=True)
    monkeypatch.setenv("QFLARE_DATA_DIR", str(tmp_path / "env"))
    ds = load_dataset("mnist", root=tmp_path / "mine")
    assert len(ds) == 7 and torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert len(load_dataset("mnist")) == 3  # no root: QFLARE_DATA_DIR/<name>


@no_system_mnist
def test_cache_dir_respects_xdg(tmp_path: Path) -> None:
    assert default_cache_dir() == tmp_path / "xdg-cache" / "qflare" / "datasets"
    write_mnist_like(default_cache_dir() / "mnist", 4, gz=True, split="test")
    assert len(load_dataset("mnist", "test")) == 4
    with pytest.raises(DatasetMissingError):
        load_dataset("mnist", "train")  # only the test split is there


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion-mnist", root=empty, download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert f"qflare data download fashion-mnist --dest {empty}" in msg and "download=True" in msg
    assert "--download" not in msg  # no such option
    assert "QFLARE_DATA_DIR" not in msg  # a given root replaces it: suggesting it would mislead
    assert str(empty) in msg
    assert isinstance(info.value, DataError) and info.value.code == "dataset_missing"


def test_missing_dataset_without_root_names_the_download_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QFLARE_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("cifar10")
    msg = str(info.value)
    assert "qflare data download cifar10," in msg and "--dest" not in msg
    assert "QFLARE_DATA_DIR" in msg and "--data-root" in msg


def test_load_dataset_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits", "validation")
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10", "digits", "synthetic"}


# ---------------------------------------------------------------------------------------- CIFAR-10
def write_cifar(root: Path, n: int, batches: tuple[str, ...]) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in batches:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=2)
        written[name] = (data, labels)
    return written


ALL_CIFAR = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def test_cifar10_from_pickle_batches(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, 4, ALL_CIFAR)
    train = load_dataset("cifar10", "train", root=tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    data1, labels1 = written["data_batch_1"]
    assert np.array_equal(train.images[0, 0].numpy(), data1[0, :1024].reshape(32, 32))  # red plane first
    assert np.array_equal(train.images[0, 2].numpy(), data1[0, 2048:].reshape(32, 32))
    assert train.labels[:4].tolist() == labels1
    assert train.labels[16:].tolist() == written["data_batch_5"][1]
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.std == (0.2470, 0.2435, 0.2616)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(test) == 4 and test.labels.tolist() == written["test_batch"][1]


def test_cifar10_missing_batch_is_missing(tmp_path: Path) -> None:
    write_cifar(tmp_path, 2, ALL_CIFAR[:4])
    with pytest.raises(DatasetMissingError, match="download=True"):
        load_dataset("cifar10", "train", root=tmp_path)


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.target),))


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path, 2, ALL_CIFAR)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_cifar10_bad_shape_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"\[N, 3072\]"):
        load_dataset("cifar10", "test", root=tmp_path)


# -------------------------------------------------------------------------------- digits/synthetic
def test_digits_split_is_deterministic_stratified_and_scaled() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.images.shape == (1438, 1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    full = np.bincount(load_digits().target, minlength=10)
    assert np.array_equal(np.bincount(test.labels.numpy(), minlength=10), np.round(0.2 * full).astype(int))
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    pixels = train.images.double() / 255.0
    assert train.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-6)
    assert train.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-6)


def test_synthetic_is_deterministic_balanced_and_learnable() -> None:
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    assert train.images.shape == (2000, 1, 8, 8) and test.images.shape == (500, 1, 8, 8)
    assert train.images.dtype == torch.float32
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 200))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 50))
    again = load_dataset("synthetic", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    x = train.normalized()
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    centroids = torch.stack([x[train.labels == c].flatten(1).mean(0) for c in range(10)])
    pred = torch.cdist(test.normalized().flatten(1), centroids).argmin(1)
    assert float((pred == test.labels).float().mean()) > 0.9
    assert not torch.equal(train.images[:500], test.images)


def test_array_dataset_normalized_and_validation() -> None:
    images = torch.tensor([[[[0, 255]]], [[[51, 102]]]], dtype=torch.uint8)  # [2, 1, 1, 2]
    ds = ArrayDataset("t", images, torch.tensor([0, 1]), 2, (0.2,), (0.5,))
    expected = (images.float() / 255 - 0.2) / 0.5
    assert torch.allclose(ds.normalized(), expected)
    assert torch.allclose(ds.normalized(torch.tensor([1])), expected[1:])
    assert torch.allclose(ds.normalized(np.array([1, 0])), expected[[1, 0]])
    assert ds.normalized(slice(0, 1)).shape == (1, 1, 1, 2)
    assert ds.normalized(torch.tensor(1)).shape == (1, 1, 1, 2)
    with pytest.raises(DataError, match="labels"):
        ArrayDataset("t", images, torch.tensor([0]), 2, (0.2,), (0.5,))
    with pytest.raises(DataError, match="outside"):
        ArrayDataset("t", images, torch.tensor([0, 2]), 2, (0.2,), (0.5,))
    with pytest.raises(DataError, match="mean/std"):
        ArrayDataset("t", images, torch.tensor([0, 1]), 2, (0.2, 0.1), (0.5, 0.5))


# ---------------------------------------------------------------------------------------- download
GOOD = b"the real payload " * 1000
BAD = b"a tampered payload" * 1000


def mirror_file(name: str = "f.bin", **kw: object) -> MirrorFile:
    return MirrorFile(name, hashlib.sha256(GOOD).hexdigest(), ("https://a.test/x/", "https://b.test/y"), **kw)


def client_for(routes: dict[str, Callable[[], httpx.Response]], log: list[str]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        log.append(str(request.url))
        make = routes.get(str(request.url))
        return make() if make else httpx.Response(404)

    return httpx.Client(transport=httpx.MockTransport(handler))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_fetch_downloads_and_verifies(tmp_path: Path) -> None:
    log: list[str] = []
    client = client_for({"https://a.test/x/f.bin": lambda: httpx.Response(200, content=GOOD)}, log)
    path = fetch(mirror_file(), tmp_path / "dl", client=client)
    assert path.read_bytes() == GOOD and log == ["https://a.test/x/f.bin"]
    assert leftovers(tmp_path / "dl") == ["f.bin"]


def test_fetch_skips_wrong_hash_mirror_and_follows_redirects(tmp_path: Path) -> None:
    log: list[str] = []
    client = client_for(
        {
            "https://a.test/x/f.bin": lambda: httpx.Response(200, content=BAD),
            "https://b.test/y/f.bin": lambda: httpx.Response(302, headers={"location": "https://c.test/f.bin"}),
            "https://c.test/f.bin": lambda: httpx.Response(200, content=GOOD),
        },
        log,
    )
    path = fetch(mirror_file(), tmp_path, client=client)
    assert path.read_bytes() == GOOD and len(log) == 3
    assert leftovers(tmp_path) == ["f.bin"]


def test_fetch_all_mirrors_bad_lists_each_failure(tmp_path: Path) -> None:
    client = client_for({"https://a.test/x/f.bin": lambda: httpx.Response(200, content=BAD)}, [])
    with pytest.raises(DataError) as info:
        fetch(mirror_file(), tmp_path, client=client)
    msg = str(info.value)
    assert "https://a.test/x/f.bin" in msg and "sha256 mismatch" in msg
    assert "https://b.test/y/f.bin" in msg and "404" in msg
    assert leftovers(tmp_path) == []


def test_fetch_checks_md5_and_size_too(tmp_path: Path) -> None:
    client = client_for({"https://a.test/x/f.bin": lambda: httpx.Response(200, content=GOOD)}, [])
    with pytest.raises(DataError, match="md5 mismatch"):
        fetch(mirror_file(md5="0" * 32), tmp_path, client=client)
    with pytest.raises(DataError, match="more than the expected"):
        fetch(mirror_file(size=len(GOOD) - 1), tmp_path, client=client)
    assert leftovers(tmp_path) == []
    good_md5 = hashlib.md5(GOOD).hexdigest()
    assert fetch(mirror_file(md5=good_md5, size=len(GOOD)), tmp_path, client=client).read_bytes() == GOOD


def test_fetch_uses_verified_cache_and_replaces_corrupt_one(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(GOOD)
    log: list[str] = []
    client = client_for({"https://a.test/x/f.bin": lambda: httpx.Response(200, content=GOOD)}, log)
    fetch(mirror_file(), tmp_path, client=client)
    assert log == []
    (tmp_path / "f.bin").write_bytes(BAD)
    assert fetch(mirror_file(), tmp_path, client=client).read_bytes() == GOOD and len(log) == 1


class _Dies(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield GOOD[:100]
        raise httpx.ReadError("connection reset")


def test_interrupted_download_leaves_no_partial_file(tmp_path: Path) -> None:
    client = client_for({"https://a.test/x/f.bin": lambda: httpx.Response(200, stream=_Dies())}, [])
    with pytest.raises(DataError, match="connection reset"):
        fetch(mirror_file(), tmp_path, client=client)
    assert leftovers(tmp_path) == []


def test_mirror_file_rejects_path_names() -> None:
    with pytest.raises(DataError):
        MirrorFile("../etc/passwd", "0" * 64, ("https://a.test/",))
    with pytest.raises(DataError):
        MirrorFile("ok", "xyz", ("https://a.test/",))


def test_extract_tar_refuses_path_traversal(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("good/ok.txt", "../escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="cannot extract"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_load_dataset_download_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "server"
    write_mnist_like(src, 5, gz=True)
    write_mnist_like(src, 2, gz=True, split="test")
    files = tuple(
        MirrorFile(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), ("https://m.test/",))
        for p in sorted(src.iterdir())
    )
    monkeypatch.setitem(KNOWN_FILES, "mnist", files)
    log: list[str] = []
    routes = {
        f"https://m.test/{f.name}": (lambda p=src / f.name: httpx.Response(200, content=p.read_bytes())) for f in files
    }
    client = client_for(routes, log)
    monkeypatch.setattr(sources, "download_dataset", lambda name, dest: download_dataset(name, dest, client=client))
    root = tmp_path / "root"
    with pytest.raises(DatasetMissingError):
        load_dataset("mnist", root=root)
    ds = load_dataset("mnist", "train", root=root, download=True)
    assert len(ds) == 5 and len(log) == 4
    assert len(load_dataset("mnist", "test", root=root)) == 2 and len(log) == 4
