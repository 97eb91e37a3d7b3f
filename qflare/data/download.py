"""Checksummed downloads with mirror fallback and a local cache.

A file is only ever exposed under its final name after its SHA-256 (and, where the publisher only gives
one, its MD5) matched: bytes are streamed into a temporary file in the destination directory, hashed while
they arrive, verified, and then atomically renamed.  A failed or interrupted transfer never leaves a
partial file behind, and a mismatching mirror is skipped in favour of the next one.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from qflare.errors import DataError

__all__ = [
    "KNOWN_FILES",
    "MirrorFile",
    "ProgressFn",
    "default_cache_dir",
    "download_dataset",
    "extract_tar",
    "fetch",
    "file_sha256",
]

_CHUNK = 1 << 20

ProgressFn = Callable[[str, int, int | None], None]
"""``progress(file name, bytes received, bytes expected or None)``, called as each chunk arrives."""


@dataclass(frozen=True)
class MirrorFile:
    """One published file: its name, expected digests, optional exact size, and mirrors tried in order.

    A mirror is a base URL; the file URL is ``mirror.rstrip('/') + '/' + name``.
    """

    name: str
    sha256: str
    mirrors: tuple[str, ...]
    md5: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in {".", ".."}:
            raise DataError(f"invalid file name {self.name!r}: must be a plain file name")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise DataError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if not self.mirrors:
            raise DataError(f"{self.name}: at least one mirror is required")

    def urls(self) -> tuple[str, ...]:
        return tuple(m.rstrip("/") + "/" + self.name for m in self.mirrors)


_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

KNOWN_FILES: dict[str, tuple[MirrorFile, ...]] = {
    # SHA-256 and sizes verified against the Debian package copies (dataset-fashion-mnist).
    "fashion-mnist": (
        MirrorFile(
            "train-images-idx3-ubyte.gz",
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            _FASHION_MIRRORS,
            size=26421856,
        ),
        MirrorFile(
            "train-labels-idx1-ubyte.gz",
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            _FASHION_MIRRORS,
            size=29491,
        ),
        MirrorFile(
            "t10k-images-idx3-ubyte.gz",
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            _FASHION_MIRRORS,
            size=4422079,
        ),
        MirrorFile(
            "t10k-labels-idx1-ubyte.gz",
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            _FASHION_MIRRORS,
            size=5125,
        ),
    ),
    # MNIST: UNVERIFIED on this machine (no copy, no internet).  The SHA-256s and sizes are the ones
    # published by TensorFlow Datasets / Keras and repeated across many independent projects.
    "mnist": (
        MirrorFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            _MNIST_MIRRORS,
            size=9912422,
        ),
        MirrorFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            _MNIST_MIRRORS,
            size=28881,
        ),
        MirrorFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            _MNIST_MIRRORS,
            size=1648877,
        ),
        MirrorFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            _MNIST_MIRRORS,
            size=4542,
        ),
    ),
    # CIFAR-10: the publisher gives only the MD5 (c58f...), which is checked too.  The SHA-256 is the one
    # Keras and torchvision use for the same archive; UNVERIFIED on this machine (no copy, no internet).
    "cifar10": (
        MirrorFile(
            "cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            ("https://www.cs.toronto.edu/~kriz/",),
            md5="c58f30108f718f92721af3b95e74349a",
            size=170498071,
        ),
    ),
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qflare/datasets`` (``~/.cache/qflare/datasets`` when XDG_CACHE_HOME is unset)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "qflare" / "datasets"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _matches(path: Path, file: MirrorFile) -> bool:
    if not path.is_file():
        return False
    if file.size is not None and path.stat().st_size != file.size:
        return False
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if file.md5 else None
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            sha.update(block)
            if md5 is not None:
                md5.update(block)
    return sha.hexdigest() == file.sha256 and (md5 is None or md5.hexdigest() == file.md5)


def _download_one(
    client: httpx.Client, url: str, file: MirrorFile, dest_dir: Path, progress: ProgressFn | None = None
) -> Path:
    """Stream ``url`` into a temp file in ``dest_dir``, verify, rename.  Raises on any failure."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        sha = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False) if file.md5 else None
        received = 0
        with os.fdopen(fd, "wb") as out:
            with client.stream("GET", url, follow_redirects=True) as response:
                response.raise_for_status()
                expected = file.size
                if expected is None and response.headers.get("Content-Length", "").isdigit():
                    expected = int(response.headers["Content-Length"])  # only for the display
                if progress is not None:
                    progress(file.name, 0, expected)
                for block in response.iter_bytes(_CHUNK):
                    received += len(block)
                    if file.size is not None and received > file.size:
                        raise DataError(f"more than the expected {file.size} bytes")
                    sha.update(block)
                    if md5 is not None:
                        md5.update(block)
                    out.write(block)
                    if progress is not None:
                        progress(file.name, received, expected)
            out.flush()
            os.fsync(out.fileno())
        if file.size is not None and received != file.size:
            raise DataError(f"got {received} bytes, expected {file.size}")
        if sha.hexdigest() != file.sha256:
            raise DataError(f"sha256 mismatch: got {sha.hexdigest()}, expected {file.sha256}")
        if md5 is not None and md5.hexdigest() != file.md5:
            raise DataError(f"md5 mismatch: got {md5.hexdigest()}, expected {file.md5}")
        target = dest_dir / file.name
        os.replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful rename


def fetch(
    file: MirrorFile, dest_dir: Path, *, client: httpx.Client | None = None, progress: ProgressFn | None = None
) -> Path:
    """Return ``dest_dir/file.name`` with verified contents, downloading it if needed.

    An existing file whose digests match is returned without any network access.  Otherwise each mirror
    is tried in order; the first one that delivers bytes with the right checksum wins.  When every mirror
    fails, :class:`DataError` lists each mirror's failure.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / file.name
    if _matches(target, file):
        return target
    own_client = client is None
    if client is None:
        client = httpx.Client(timeout=httpx.Timeout(30.0, read=120.0), follow_redirects=True)
    failures: list[str] = []
    try:
        for url in file.urls():
            try:
                return _download_one(client, url, file, dest_dir, progress)
            except (httpx.HTTPError, OSError, DataError) as exc:
                failures.append(f"  {url}: {type(exc).__name__}: {exc}")
    finally:
        if own_client:
            client.close()
    raise DataError(f"could not download {file.name} from any mirror:\n" + "\n".join(failures))


def extract_tar(archive: Path, dest_dir: Path) -> None:
    """Extract ``archive`` into ``dest_dir`` refusing absolute paths, ``..``, links out and devices."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest_dir, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot extract {archive}: {exc}") from exc


def download_dataset(
    name: str, dest_dir: Path, *, client: httpx.Client | None = None, progress: ProgressFn | None = None
) -> Path:
    """Fetch every file of a known dataset into ``dest_dir`` (extracting CIFAR-10); return ``dest_dir``.

    ``progress`` is told each file's bytes as they arrive (files already present are not reported)."""
    if name not in KNOWN_FILES:
        raise DataError(f"no download known for dataset {name!r}; known: {', '.join(sorted(KNOWN_FILES))}")
    dest_dir = Path(dest_dir)
    for file in KNOWN_FILES[name]:
        path = fetch(file, dest_dir, client=client, progress=progress)
        if file.name.endswith((".tar.gz", ".tgz", ".tar")):
            extract_tar(path, dest_dir)
    return dest_dir
