"""Micro-benchmarks of the crypto the protocol runs: handshake, sign+seal of an update as a device does
it, open+verify of it as the coordinator does it (the recipes of :mod:`qflare.crypto.payloads`).

``python -m qflare.bench.crypto_ops`` prints the figures for DEFAULT_SUITE and HIGH_SUITE as JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from qflare.crypto.handshake import ClientHandshake, ServerHandshake, handshake_in_process
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.payloads import open_update, seal_update, sign_update
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE, Policy, Suite, sha256

__all__ = ["bench_crypto", "summarize_ms"]


def summarize_ms(samples_s: list[float]) -> dict[str, float]:
    """Median and nearest-rank p99 of durations given in seconds, in milliseconds."""
    ordered = sorted(samples_s)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered) * 1e3, "p99": p99 * 1e3}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_crypto(suite: Suite = DEFAULT_SUITE, payload_bytes: int = 6_653_480, repeats: int = 30) -> dict[str, Any]:
    """Time the full in-process handshake, ``sign_update`` + ``seal_update`` (SHA-256 + ML-DSA sign +
    AES-GCM seal, what ``Device.prepare_update``/``submit`` run besides serialisation) and ``open_update``
    (AES-GCM open + ML-DSA verify + SHA-256 check, what ``Coordinator`` runs before decoding) for
    ``suite``."""
    if repeats < 1 or payload_bytes < 0:
        raise ValueError("repeats must be >= 1 and payload_bytes >= 0")
    policy = Policy(min_sig_level=0, min_kem_level=0, require_hybrid=False)  # benchmark any registered suite
    device = SigningKey.generate(suite.sig)
    server = SigningKey.generate(suite.sig)
    directory: dict[str, VerifyKey] = {device.key_id: device.public}

    def handshake() -> object:
        client = ClientHandshake(device, server.public, suite=suite, policy=policy)
        coordinator = ServerHandshake(server, directory.get, policy=policy)
        return handshake_in_process(client, coordinator)

    handshake()  # warm-up
    hs = [_timed(handshake) for _ in range(repeats)]

    client = ClientHandshake(device, server.public, suite=suite, policy=policy)
    coordinator = ServerHandshake(server, directory.get, policy=policy)
    hello = client.start()
    reply = coordinator.respond(hello)
    finish, c_chan = client.finish(reply)
    s_chan = coordinator.finish(finish)
    payload = os.urandom(payload_bytes)
    base = sha256(b"base model").hex()
    metrics = {"loss": 0.5, "steps": 40.0, "train_s": 1.0}
    seal_t: list[float] = []
    open_t: list[float] = []
    frame = b""
    for rnd in range(repeats + 1):  # the first iteration is a warm-up
        t0 = time.perf_counter()
        frame = seal_update(c_chan, sign_update(device, c_chan.suite, rnd, base, 1000, payload, metrics))
        t1 = time.perf_counter()
        open_update(s_chan, device.public, frame, rnd, base_model_hash=base).metrics()
        t2 = time.perf_counter()
        if rnd:
            seal_t.append(t1 - t0)
            open_t.append(t2 - t1)
    return {
        "suite": suite.name,
        "payload_bytes": payload_bytes,
        "repeats": repeats,
        "handshake_ms": summarize_ms(hs),
        "seal_sign_ms": summarize_ms(seal_t),
        "open_verify_ms": summarize_ms(open_t),
        "bytes": {
            "client_hello": len(hello),
            "server_hello": len(reply),
            "client_finish": len(finish),
            "update_frame_overhead": len(frame) - payload_bytes,
        },
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps([bench_crypto(DEFAULT_SUITE), bench_crypto(HIGH_SUITE)], indent=2))
