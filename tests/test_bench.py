"""The benchmark commands keep their JSON contracts (figures are printed by them, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (make data installs it)")


def _json(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "qflare", "bench", *args, "--json"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_fmnist
def test_fmnist_dir05_contract():
    res = _json("fmnist-dir05", "--rounds", "1")
    for key in (
        "qflare_wall_s",
        "bare_wall_s",
        "ratio",
        "qflare_final_accuracy",
        "bare_final_accuracy",
        "qflare_peak_rss_mb",
        "fedavg_gbps",
        "copy_gbps",
    ):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert abs(res["ratio"] - res["qflare_wall_s"] / res["bare_wall_s"]) < 0.01
    assert 0.1 < res["qflare_final_accuracy"] <= 1 and 0.1 < res["bare_final_accuracy"] <= 1


@pytest.mark.slow
@needs_fmnist
def test_crypto_contract():
    res = _json("crypto", "--repeats", "3")
    for key in ("handshake_ms_median", "seal_ms_median", "open_ms_median", "local_train_ms_median"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["payload_bytes"] == 6_653_480


@pytest.mark.slow
@needs_fmnist
def test_batched_devices_contract():
    res = _json("batched-devices", "--device", "cpu", "--rounds", "1")
    for key in ("loop_rounds_s", "batched_rounds_s", "speedup", "loop_final_accuracy", "batched_final_accuracy"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["meets_target"] is None  # the target is judged on a GPU only
    assert res["batched"]["accuracy"] and res["max_accuracy_gap"] < 0.02
