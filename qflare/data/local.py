"""A device's own data: a NumPy ``.npz`` file or a folder of PNG images, checked before it is trusted.

* ``.npz`` with exactly two arrays: ``x`` - ``uint8`` pixels (0..255) or floating-point inputs, shaped
  ``[N, C, H, W]`` (or ``[N, H, W]`` for one channel) - and ``y`` - integer labels ``[N]``.
* a folder with one sub-folder per class holding ``*.png`` files; the class index of a sub-folder is its
  position among the sorted sub-folder names, so there must be exactly one per class of the model
  (empty ones allowed).  Images must already have the model's height and width; they are decoded with
  Pillow, as grey (one channel) or RGB (three).

``uint8`` pixels are normalised as the coordinator's own data set (the ``mean``/``std`` it announces);
floating-point ``x`` is taken as inputs already normalised for the model.

A file is a hostile input until checked, cheap checks first: its size; that it is a zip holding just
``x.npy`` and ``y.npy``; each member's uncompressed size (a zip bomb stops here, nothing is inflated);
each array's header (dtype, shape and byte count, against the model and the member's size) - only then
are the arrays read (``allow_pickle=False``); then labels against the model's classes and ``x`` for
NaN/Inf.  Every failure is one :class:`~qflare.errors.DataError` with code ``bad_local_data``.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..errors import DataError, ErrorCode
from .sources import ArrayDataset

__all__ = ["DEFAULT_MAX_BYTES", "load_local_data"]

DEFAULT_MAX_BYTES = 4 << 30
"""The most bytes a device's data may take once decoded (and the largest file read), 4 GiB."""
_MAX_FILES = 1_000_000


def _bad(source: Path | str, why: str) -> DataError:
    return DataError(f"{source}: {why}", code=ErrorCode.BAD_LOCAL_DATA)


def load_local_data(
    path: str | Path,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ArrayDataset:
    """The examples in ``path`` (a ``.npz`` file or an image folder) as an :class:`ArrayDataset` for a
    model taking ``input_shape`` and ``num_classes`` (see the module docstring)."""
    source = Path(path)
    try:
        if source.is_dir():
            images, labels = _read_folder(source, input_shape, num_classes, max_bytes)
        elif source.is_file():
            images, labels = _read_npz(source, input_shape, max_bytes)
        elif source.exists():
            raise _bad(source, "is neither a regular file nor a folder")
        else:
            raise _bad(source, "no such file or folder")
    except OSError as exc:  # unreadable: permissions, a vanished file, an I/O error
        raise _bad(source, f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None
    if len(labels) == 0:
        raise _bad(source, "holds no examples")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise _bad(
            source,
            f"labels range over {int(labels.min())}..{int(labels.max())}, but the model has {num_classes} classes "
            f"(0..{num_classes - 1})",
        )
    if images.dtype != np.uint8:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
            images = images.astype(np.float32, copy=False)
        if not np.isfinite(images).all():
            raise _bad(source, "x holds NaN or infinite values (or values beyond float32)")
        mean, std = (0.0,) * input_shape[0], (1.0,) * input_shape[0]  # already normalised inputs
    return ArrayDataset(
        source.name,
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        num_classes,
        tuple(mean),
        tuple(std),
    )


# ------------------------------------------------------------------------------------------ npz
def _read_npz(source: Path, shape: tuple[int, int, int], max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    size = source.stat().st_size
    if size > max_bytes:
        raise _bad(source, f"is {size} bytes, more than the {max_bytes} allowed")
    if not zipfile.is_zipfile(source):
        raise _bad(source, "is not a NumPy .npz archive (not a zip file)")
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            names = sorted(m.filename for m in members)
            if names != ["x.npy", "y.npy"]:
                raise _bad(source, f"must hold exactly the arrays 'x' and 'y', holds {_shown(names)}")
            if sum(m.file_size for m in members) > max_bytes:
                raise _bad(source, f"unpacks to more than the {max_bytes} bytes allowed (a zip bomb?)")
            headers = {}
            for m in members:
                with archive.open(m) as fh:
                    headers[m.filename[0]] = _npy_header(source, m, fh)
            x_shape, x_dtype = headers["x"]
            y_shape, y_dtype = headers["y"]
            _check_x(source, x_shape, x_dtype, shape)
            if y_dtype.kind not in "iu" or len(y_shape) != 1:
                raise _bad(source, f"y must be integer labels [N], is {y_dtype} {tuple(y_shape)}")
            if y_shape[0] != x_shape[0]:
                raise _bad(source, f"x has {x_shape[0]} examples but y has {y_shape[0]} labels")
        with np.load(source, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise _bad(source, f"unreadable .npz ({type(exc).__name__}: {str(exc)[:200]})") from None
    if x.ndim == 3:
        x = x[:, None, :, :]
    return x, y


def _shown(names: list[str]) -> str:
    shown = ", ".join(repr(n.removesuffix(".npy")) for n in names[:8])
    return (shown + (", ..." if len(names) > 8 else "")) or "nothing"


def _npy_header(source: Path, member: zipfile.ZipInfo, fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an ``.npy`` member declares, checked against the member's size (nothing
    beyond the header is read: numpy would allocate the declared shape before reading the data)."""
    name = member.filename.removesuffix(".npy")
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=10_000)
        elif version in ((2, 0), (3, 0)):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=10_000)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise _bad(source, f"array {name!r} has no valid .npy header ({str(exc)[:200]})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _bad(source, f"array {name!r} has dtype {dtype}: only plain numbers are accepted")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > member.file_size:
        raise _bad(source, f"array {name!r} declares {nbytes} bytes of data but the file holds fewer (truncated)")
    return tuple(shape), dtype


def _check_x(source: Path, x_shape: tuple[int, ...], dtype: np.dtype, shape: tuple[int, int, int]) -> None:
    if dtype.kind not in "uf" or (dtype.kind == "u" and dtype != np.uint8):
        raise _bad(source, f"x must be uint8 pixels or floating-point inputs, is {dtype}")
    per_example = x_shape[1:]
    fits = per_example == shape or (shape[0] == 1 and per_example == shape[1:])
    if len(x_shape) not in (3, 4) or not fits:
        want = f"[N, {shape[0]}, {shape[1]}, {shape[2]}]" + (
            f" or [N, {shape[1]}, {shape[2]}]" if shape[0] == 1 else ""
        )
        raise _bad(source, f"x has shape {list(x_shape)}, the coordinator's model takes {want}")


# ------------------------------------------------------------------------------------- image folder
def _read_folder(
    source: Path, shape: tuple[int, int, int], num_classes: int, max_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError  # only devices with image folders need Pillow

    classes = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) != num_classes:
        raise _bad(
            source,
            f"has {len(classes)} class folders, the model has {num_classes} classes: make one folder per class "
            "(empty ones allowed); the sorted folder names give the class index",
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for f in sorted((source / name).iterdir()):
            if f.name.startswith("."):
                continue
            if not f.is_file() or f.suffix.lower() != ".png":
                raise _bad(f, "is not a .png file (an image folder holds class_name/*.png only)")
            files.append((f, label))
            if len(files) > _MAX_FILES:
                raise _bad(source, f"holds more than {_MAX_FILES} images")
    c, h, w = shape
    if c not in (1, 3):
        raise _bad(source, f"the model takes {c}-channel inputs; image folders give 1 (grey) or 3 (RGB)")
    if len(files) * c * h * w > max_bytes:
        raise _bad(source, f"{len(files)} images of {c}x{h}x{w} would take more than the {max_bytes} bytes allowed")
    images = np.empty((len(files), c, h, w), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (f, label) in enumerate(files):
        if f.stat().st_size > 64 * c * h * w + 65_536:  # far more than any PNG of that size needs
            raise _bad(f, "is too large for an image of the model's input size")
        try:
            with Image.open(f, formats=["PNG"]) as img:
                if img.size != (w, h):
                    raise _bad(f, f"is {img.size[0]}x{img.size[1]} pixels, the model takes {w}x{h}")
                pixels = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _bad(f, f"is not a readable PNG ({type(exc).__name__}: {str(exc)[:200]})") from None
        images[i] = pixels[None, :, :] if c == 1 else pixels.transpose(2, 0, 1)
        labels[i] = label
    return images, labels
