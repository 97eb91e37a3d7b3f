"""Bytes carried with the SHA-256 that was computed over exactly them: hash an update once.

The coordinator hashes each update's payload when it checks it against the device's signed envelope
(:func:`qflare.crypto.open_update`); the blob store then writes the same bytes under that digest.  A
:class:`HashedBytes` carries the digest from the one to the other so that the blob store need not hash
6.65 MB a second time, and only this type is trusted that way: a digest given as a plain string is
always re-checked (:meth:`qflare.storage.BlobStore.put`).

The guarantee rests on two things: a HashedBytes is made only by :meth:`HashedBytes.of`, which hashes
the bytes itself (the constructor refuses callers without the module's private token), and the bytes
cannot change afterwards (it keeps a read-only view of an immutable ``bytes`` object, copying anything
else first).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

__all__ = ["HashedBytes"]

_TOKEN = object()


class HashedBytes:
    """Immutable bytes and their SHA-256 (hex), computed here by :meth:`of`."""

    __slots__ = ("_data", "_sha256")

    def __init__(self, data: memoryview, sha256: str, token: object) -> None:
        if token is not _TOKEN:
            raise TypeError("a HashedBytes is made by HashedBytes.of(data), which hashes the data itself")
        self._data, self._sha256 = data, sha256

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> HashedBytes:
        """Hash ``data`` (SHA-256, pyca/cryptography).  A view of a ``bytes`` object is kept as it is
        (no copy); anything mutable is copied first, so the digest stays true of :attr:`data`."""
        view = memoryview(data)
        if not (isinstance(view.obj, bytes) and view.contiguous):
            view = memoryview(bytes(view))
        view = view.cast("B").toreadonly()
        h = hashes.Hash(hashes.SHA256())
        h.update(view)
        return cls(view, h.finalize().hex(), _TOKEN)

    @property
    def data(self) -> memoryview:
        """The bytes (a read-only view)."""
        return self._data

    @property
    def sha256(self) -> str:
        """Their SHA-256, lowercase hex."""
        return self._sha256

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"HashedBytes({len(self._data)} bytes, sha256={self._sha256[:16]}...)"
