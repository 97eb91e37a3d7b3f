"""The benchmark helper runs and reports sane numbers (tiny payload, few repeats)."""

from __future__ import annotations

from qflare.bench.crypto_ops import bench_crypto, summarize_ms
from qflare.crypto.suite import DEFAULT_SUITE, HIGH_SUITE


def test_bench_crypto_shape() -> None:
    for suite in (DEFAULT_SUITE, HIGH_SUITE):
        out = bench_crypto(suite, payload_bytes=4096, repeats=3)
        assert out["suite"] == suite.name
        for k in ("handshake_ms", "seal_sign_ms", "open_verify_ms"):
            stats = out[k]
            assert isinstance(stats, dict) and 0 < stats["median"] <= stats["p99"]
        sizes = out["bytes"]
        assert isinstance(sizes, dict) and sizes["update_frame_overhead"] > suite.sig_alg.signature_len


def test_summarize_ms() -> None:
    s = summarize_ms([0.001 * i for i in range(1, 101)])
    assert abs(s["median"] - 50.5) < 1e-9 and abs(s["p99"] - 99.0) < 1e-9
