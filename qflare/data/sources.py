"""Datasets as in-memory tensors: MNIST, Fashion-MNIST, CIFAR-10, scikit-learn digits, and a synthetic set.

Image sets keep their raw ``uint8`` pixels (``[N, C, H, W]``); :meth:`ArrayDataset.normalized` converts the
rows a caller asks for.  Nothing here ever substitutes other or dummy data for a dataset that is missing:
:func:`load_dataset` raises :class:`~qflare.errors.DatasetMissingError` saying how to get it.

References: LeCun et al., "Gradient-based learning applied to document recognition", 1998 (MNIST, IDX
format); Xiao, Rasul & Vollgraf, "Fashion-MNIST", arXiv:1708.07747, 2017; Krizhevsky, "Learning multiple
layers of features from tiny images", 2009 (CIFAR-10); Alpaydin & Kaynak, UCI optical digits, 1998.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qflare.data.download import KNOWN_FILES, default_cache_dir, download_dataset
from qflare.errors import ConfigError, DataError, DatasetMissingError
from qflare.registry import RegisteredNames, Registry

__all__ = [
    "DATASETS",
    "SPLITS",
    "ArrayDataset",
    "DatasetLoader",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "register_dataset",
]

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole split in memory: ``images`` ``[N, C, H, W]`` (uint8 for image sets, float32 for synthetic)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be [N, C, H, W], got {tuple(self.images.shape)}")
        if self.images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"{self.name}: images must be uint8 or float32, got {self.images.dtype}")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise DataError(
                f"{self.name}: labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise DataError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"{self.name}: mean/std need {channels} entries")
        if any(not s > 0 for s in self.std):
            raise DataError(f"{self.name}: std must be positive")
        if self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise DataError(f"{self.name}: labels outside 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def normalized(self, index: torch.Tensor | np.ndarray | slice | None = None) -> torch.Tensor:
        """float32 ``[n, C, H, W]``: ``(x/255 - mean)/std`` for uint8 images, ``(x - mean)/std`` for float."""
        if index is None:
            x = self.images
        elif isinstance(index, np.ndarray):
            x = self.images[torch.as_tensor(index)]
        else:
            x = self.images[index]
        if x.dim() == 3:
            x = x.unsqueeze(0)
        out = x.to(torch.float32)
        if self.images.dtype == torch.uint8:
            out = out / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (out - mean) / std


# --------------------------------------------------------------------------------------------- IDX
_Norm = tuple[tuple[float, ...], tuple[float, ...]]
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format): magic ``00 00 <dtype> <ndim>``, ndim big-endian uint32
    dimensions, then exactly ``prod(dims)`` big-endian items.  Anything else raises :class:`DataError`.
    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated IDX file ({len(data)} bytes, no header)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(f"{source}: bad IDX magic number 0x{data[:4].hex()}")
    if code not in _IDX_DTYPES:
        raise DataError(f"{source}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{source}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header (needs {header} bytes, has {len(data)})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims, dtype=np.int64)) if dims else 0
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "inconsistent (trailing bytes)"
        raise DataError(f"{source}: {what} IDX file: dims {dims} need {expected} bytes, file has {len(data)}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file from disk, gunzipping it first when it starts with the gzip magic."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return parse_idx(raw, str(path))


def _idx_paths(directory: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    found: list[Path] = []
    for kind in ("images-idx3", "labels-idx1"):
        base = directory / f"{prefix}-{kind}-ubyte"
        hit = next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _load_mnist_like(name: str, norm: _Norm, paths: tuple[Path, ...]) -> ArrayDataset:
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: expected uint8 [N, 28, 28] images, got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths[1]}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{paths[1]}: label {int(labels.max())} outside 0..9")
    mean, std = norm
    return ArrayDataset(
        name, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10, mean, std
    )


# ---------------------------------------------------------------------------------------- CIFAR-10
# Per-channel statistics in the 0..1 scale, from the training set.
_CIFAR_NORM: _Norm = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else: a CIFAR batch cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return getattr(importlib.import_module(target[0]), target[1])


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # corrupt pickles raise many types; all mean "bad file"
        raise DataError(f"{path}: not a readable CIFAR-10 batch: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: CIFAR-10 batch is a {type(batch).__name__}, expected a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 [N, 3072] data, got {data.dtype} {data.shape}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"{path}: expected {len(data)} integer labels, got {lab.dtype} {lab.shape}")
    if len(lab) and (lab.min() < 0 or lab.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), lab.astype(np.int64)


def _cifar_paths(directory: Path, split: str) -> tuple[Path, ...] | None:
    for base in (directory / _CIFAR_DIR, directory):
        paths = tuple(base / f for f in _CIFAR_FILES[split])
        if all(p.is_file() for p in paths):
            return paths
    return None


def _load_cifar10(paths: tuple[Path, ...]) -> ArrayDataset:
    parts = [_cifar_batch(p) for p in paths]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    mean, std = _CIFAR_NORM
    return ArrayDataset(
        "cifar10", torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), 10, mean, std
    )


# ------------------------------------------------------------------------------- digits / synthetic
# Computed from the digits train split defined in _digits_split (tests recompute it).
_DIGITS_NORM: _Norm = ((0.30553290,), (0.37594736,))


def _digits_split(labels: np.ndarray) -> np.ndarray:
    """Boolean test mask: stratified 80/20, seed 0.  For each class in ascending order, a permutation from
    one ``default_rng(0)`` stream puts the first ``round(0.2 * n_class)`` examples in test (359 of 1797).
    Implemented here rather than via scikit-learn so the split cannot change with its version."""
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: round(0.2 * len(idx))]] = True
    return test


def _load_digits(split: str, root: str | Path | None = None, download: bool = False) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 ``[N, 1, 8, 8]``, ``rint(x * 255 / 16)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetMissingError(
            "the 'digits' dataset ships with scikit-learn, which is not installed: "
            "pip install scikit-learn (or qflare[dev])"
        ) from exc
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.data, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    test = _digits_split(labels)
    keep = test if split == "test" else ~test
    mean, std = _DIGITS_NORM
    return ArrayDataset(
        "digits", torch.from_numpy(images[keep].reshape(-1, 1, 8, 8)), torch.from_numpy(labels[keep]), 10, mean, std
    )


def _load_synthetic(split: str, root: str | Path | None = None, download: bool = False) -> ArrayDataset:
    """Smoke-test data only, not a benchmark: 10 Gaussian blobs in 64 dimensions, reshaped ``[N, 1, 8, 8]``.

    ``default_rng(0)`` draws class means ~ N(0, I) then, for train (2000, 200 per class) and test (500,
    50 per class) in that order, shuffled labels and isotropic noise of std 1.5.  Mean distance between
    class means is ~11, far above the noise, so any sane model learns it.  Mean/std come from train.
    """
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 1.0, size=(10, 64))
    draws = {}
    for name, per_class in (("train", 200), ("test", 50)):
        y = rng.permutation(np.repeat(np.arange(10, dtype=np.int64), per_class))
        x = means[y] + rng.normal(0.0, 1.5, size=(len(y), 64))
        draws[name] = (x.astype(np.float32).reshape(-1, 1, 8, 8), y)
    train_x = draws["train"][0]
    mean, std = (float(train_x.mean()),), (float(train_x.std()),)
    x, y = draws[split]
    return ArrayDataset("synthetic", torch.from_numpy(x), torch.from_numpy(y), 10, mean, std)


# ------------------------------------------------------------------------------ file-backed sets
@dataclass(frozen=True)
class _FileBacked:
    """A data set read from files: where to look, how to recognise and read a split, how to get it.

    Search order: ``root`` (itself or ``root/<name>``; when given, nothing else is searched and downloads
    go there), ``$QFLARE_DATA_DIR/<name>``, ``system_dir``, then ``$XDG_CACHE_HOME/qflare/datasets/<name>``.
    """

    name: str
    locate: Callable[[Path, str], tuple[Path, ...] | None]
    read: Callable[[tuple[Path, ...]], ArrayDataset]
    layout: str
    system_dir: Path | None = None
    hint: str | None = None

    def __call__(self, split: str, root: str | Path | None, download: bool) -> ArrayDataset:
        searched = self._search_dirs(root)
        for directory in searched:
            paths = self.locate(directory, split)
            if paths is not None:
                return self.read(paths)
        if not download:
            raise DatasetMissingError(self._missing_message(split, searched, root))
        dest = download_dataset(self.name, self._download_dir(root))
        paths = self.locate(dest, split)
        if paths is None:
            raise DataError(f"downloaded {self.name} into {dest} but the expected files are not there")
        return self.read(paths)

    def _search_dirs(self, root: str | Path | None) -> list[Path]:
        if root is not None:
            return [Path(root), Path(root) / self.name]
        dirs: list[Path] = []
        env = os.environ.get("QFLARE_DATA_DIR")
        if env:
            dirs.append(Path(env) / self.name)
        if self.system_dir is not None:
            dirs.append(self.system_dir)
        dirs.append(default_cache_dir() / self.name)
        return dirs

    def _download_dir(self, root: str | Path | None) -> Path:
        if root is not None:
            return Path(root)
        env = os.environ.get("QFLARE_DATA_DIR")
        return Path(env) / self.name if env else default_cache_dir() / self.name

    def _missing_message(self, split: str, searched: list[Path], root: str | Path | None = None) -> str:
        lines = [f"dataset {self.name!r} ({split} split) not found; looked in:"]
        lines += [f"  {d}" for d in searched]
        lines.append("To get it, do one of:")
        if self.hint:
            lines.append(f"  - {self.hint}")
        if self.name in KNOWN_FILES:
            command = f"qflare data download {self.name}" + (f" --dest {root}" if root is not None else "")
            lines.append(f"  - download it (checksums are verified): {command}, or load_dataset(..., download=True)")
        if root is not None:  # --data-root replaces every other place: QFLARE_DATA_DIR is not read
            lines.append(f"  - put {self.layout} in {root} or {Path(root) / self.name}")
        else:
            lines.append(
                f"  - set QFLARE_DATA_DIR (or pass --data-root) to a folder holding {self.name}/ with {self.layout}"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- registry
DatasetLoader = Callable[[str, str | Path | None, bool], ArrayDataset]
"""``loader(split, root, download) -> ArrayDataset``: one split ("train" or "test") of a data set.

``root`` is the folder the caller named (or None: search the usual places); ``download`` allows fetching
missing files.  A set that needs no files ignores both."""

_REGISTRY: Registry[DatasetLoader] = Registry("dataset", unknown=lambda text: DataError(text))
DATASETS: Sequence[str] = RegisteredNames(_REGISTRY)
"""Every registered data set name, built-in ones first; follows later registrations (plugins)."""


def register_dataset(name: str, loader: DatasetLoader, *, aliases: Sequence[str] = (), replace: bool = False) -> None:
    """Register ``loader(split, root, download) -> ArrayDataset`` under ``name`` (case-insensitive).

    A name or alias that is taken raises :class:`~qflare.errors.ConfigError` unless ``replace=True``.
    """
    if not callable(loader):
        raise ConfigError(f"dataset {name!r}: the loader must be callable, got {type(loader).__name__}")
    _REGISTRY.register(name, loader, aliases=aliases, replace=replace)


def load_dataset(
    dataset: str | DatasetLoader, split: str = "train", root: str | Path | None = None, download: bool = False
) -> ArrayDataset:
    """Load one split of a data set into memory; ``dataset`` is a registered name or a loader.

    File-backed built-in sets search ``root`` (itself or ``root/<name>``; when given, nothing else is
    searched and downloads go there), ``$QFLARE_DATA_DIR/<name>``, the Debian package folder
    (``/usr/share/datasets/<name>``, MNIST-likes only), then ``$XDG_CACHE_HOME/qflare/datasets/<name>``.
    With ``download=True`` a missing set is fetched (mirrors, checksums) into ``root``, else
    ``$QFLARE_DATA_DIR/<name>``, else the cache.  ``digits`` and ``synthetic`` need no files.
    """
    if isinstance(dataset, str):
        loader, label = _REGISTRY.get(dataset), _REGISTRY.canonical(dataset)
    elif callable(dataset):
        loader, label = dataset, getattr(dataset, "__name__", repr(dataset))
    else:
        raise DataError(f"a dataset is a registered name or a loader, got {type(dataset).__name__}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    data = loader(split, root, download)
    if not isinstance(data, ArrayDataset):
        raise DataError(f"dataset {label!r}: the loader returned a {type(data).__name__}, not an ArrayDataset")
    return data


def _mnist_like(name: str, norm: _Norm) -> Callable[[tuple[Path, ...]], ArrayDataset]:
    return lambda paths: _load_mnist_like(name, norm, paths)


# The built-in sets, one registration each (per-channel mean/std in the 0..1 scale, from the train sets).
register_dataset(
    "mnist",
    _FileBacked(
        "mnist",
        _idx_paths,
        _mnist_like("mnist", ((0.1307,), (0.3081,))),
        "the four IDX files",
        Path("/usr/share/datasets/mnist"),
    ),
)
register_dataset(
    "fashion-mnist",
    _FileBacked(
        "fashion-mnist",
        _idx_paths,
        _mnist_like("fashion-mnist", ((0.2860,), (0.3530,))),
        "the four IDX files",
        Path("/usr/share/datasets/fashion-mnist"),
        "apt-get install dataset-fashion-mnist   (installs /usr/share/datasets/fashion-mnist)",
    ),
    aliases=("fmnist", "fashion_mnist"),
)
register_dataset(
    "cifar10", _FileBacked("cifar10", _cifar_paths, _load_cifar10, f"{_CIFAR_DIR}/"), aliases=("cifar-10",)
)
register_dataset("digits", _load_digits)
register_dataset("synthetic", _load_synthetic)
