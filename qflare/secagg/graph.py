"""The neighbour graph of a round: a Harary graph over a ring order drawn from a public seed.

Devices are indexed ``1..n``.  The ring order is a Fisher-Yates shuffle driven by the AES-256-CTR stream
of ``seed`` (uniform integers by rejection sampling); each device is joined to the ``k/2`` devices before
and after it on the ring (``k = n - 1``: every other device, the complete graph).  The graph is therefore
``k``-regular and undirected, and a device's neighbourhood is a uniform ``k``-subset of the others, which
is what :mod:`qflare.secagg.params` assumes.  Everyone computes the same graph from the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType

from qflare.crypto.suite import sha256
from qflare.secagg.params import SecAggParams
from qflare.secagg.prg import mask

__all__ = ["neighbours", "ring_order"]


def _words(seed: bytes, n: int) -> Iterator[int]:
    chunk = 0
    while True:  # chunk 0 is the seed's own stream; further chunks (never needed in practice) re-key
        key = seed if chunk == 0 else sha256(b"qflare/secagg/graph", seed, chunk.to_bytes(8, "big"))
        yield from (int(w) for w in mask(key, 2 * n + 64))
        chunk += 1


def ring_order(n: int, seed: bytes) -> list[int]:
    """A uniformly random permutation of ``1..n`` from ``seed`` (32 bytes)."""
    order = list(range(1, n + 1))
    words = _words(seed, n)
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (2**32 // bound) * bound  # reject the biased top of the range
        w = next(words)
        while w >= limit:
            w = next(words)
        j = w % bound
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(params: SecAggParams, seed: bytes) -> Mapping[int, frozenset[int]]:
    """``{index: its k neighbours}`` for indices ``1..n``."""
    n, k = params.n, params.k
    if params.complete:
        everyone = frozenset(range(1, n + 1))
        return MappingProxyType({i: everyone - {i} for i in everyone})
    order = ring_order(n, seed)
    half = k // 2
    out: dict[int, frozenset[int]] = {}
    for p, dev in enumerate(order):
        out[dev] = frozenset(order[(p + d) % n] for d in range(-half, half + 1) if d != 0)
    return MappingProxyType(out)
