"""A secure-aggregation round driven in-process, with dropouts at chosen phases (tests only)."""

from __future__ import annotations

import functools
import os
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from qflare.crypto.identity import SigningKey
from qflare.secagg import QuantSpec, SecAggClient, SecAggConfig, SecAggParams, SecAggResult, SecAggServer, quantize
from qflare.secagg.prg import Vector


@functools.lru_cache(maxsize=64)
def identity(i: int) -> SigningKey:
    return SigningKey.from_seed("ML-DSA-65", i.to_bytes(32, "big"))


def make_config(n: int, k: int, t: int, length: int = 50, round_: int = 1, seed: bytes = b"\x07" * 32) -> SecAggConfig:
    return SecAggConfig(
        round=round_,
        params=SecAggParams(n, k, t),
        graph_seed=seed,
        quant=QuantSpec(clip=1.0, max_devices=1000, max_weight=16),
        length=length,
        roster={i: identity(i).public for i in range(1, n + 1)},
        coordinator=identity(0).public,
    )


@dataclass
class Round:
    config: SecAggConfig
    server: SecAggServer
    clients: dict[int, SecAggClient]
    inputs: dict[int, tuple[np.ndarray, int]]
    request: bytes | None = None
    proof: list[bytes] | None = None

    def expected_total(self, survivors: Collection[int]) -> Vector:
        acc = np.zeros(self.config.length + 1, dtype=np.uint32)
        for i in survivors:
            x, w = self.inputs[i]
            acc += quantize(x, w, self.config.quant)
        return acc


def start(config: SecAggConfig, rng: np.random.Generator | None = None) -> Round:
    rng = rng or np.random.default_rng(int.from_bytes(os.urandom(4), "big"))
    n = config.params.n
    clients = {i: SecAggClient(config, i, identity(i)) for i in range(1, n + 1)}
    inputs = {
        i: (rng.normal(0.0, 0.3, config.length).astype(np.float32), int(rng.integers(1, 17))) for i in range(1, n + 1)
    }
    return Round(config, SecAggServer(config, identity(0)), clients, inputs)


def advertise(r: Round, drop: Collection[int] = ()) -> None:
    for i, c in r.clients.items():
        if i not in drop:
            r.server.receive_advert(c.advertise())
    r.server.close_advertise()


def share(r: Round, drop: Collection[int] = ()) -> None:
    for i in sorted(r.server.u1):
        if i not in drop:
            r.server.receive_shares(*r.clients[i].share_keys(r.server.adverts_for(i)))
    r.server.close_shares()


def mask(r: Round, drop: Collection[int] = ()) -> None:
    for i in sorted(r.server.u2):
        if i not in drop:
            x, w = r.inputs[i]
            r.server.receive_masked(*r.clients[i].masked_input(r.server.shares_for(i), x, w))
    r.request = r.server.close_masked()


def sign(r: Round, drop: Collection[int] = ()) -> None:
    """The consistency round: every device of U3 not in ``drop`` signs U3; the proof is collected."""
    assert r.request is not None
    for i in sorted(r.server.u3):
        if i not in drop:
            r.server.receive_consistency(r.clients[i].consistency(r.request))
    r.proof = r.server.close_consistency()


def unmask(r: Round, drop: Collection[int] = ()) -> SecAggResult:
    if r.proof is None:
        sign(r)
    assert r.request is not None and r.proof is not None
    for i in sorted(r.server.u3):
        if i not in drop:
            r.server.receive_unmask(r.clients[i].unmask(r.request, r.proof))
    return r.server.finish()


def run(
    config: SecAggConfig,
    *,
    drop_advertise: Collection[int] = (),
    drop_share: Collection[int] = (),
    drop_mask: Collection[int] = (),
    drop_unmask: Collection[int] = (),
    rng: np.random.Generator | None = None,
) -> tuple[Round, SecAggResult]:
    r = start(config, rng)
    advertise(r, drop_advertise)
    share(r, drop_share)
    mask(r, drop_mask)
    return r, unmask(r, drop_unmask)
