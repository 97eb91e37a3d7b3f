"""``qflare bench network``: its JSON contract on a small federation (digits + MLP), both runs completing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qflare.bench.fmnist import WORKLOAD
from qflare.bench.network import workload_args


def test_workload_args_replace_only_the_named_options() -> None:
    args = workload_args("digits", "mlp", 20, 5)
    assert len(args) == len(WORKLOAD)
    opts = dict(zip(args[::2], args[1::2]))
    assert (opts["--dataset"], opts["--model"], opts["--devices"], opts["--per-round"]) == ("digits", "mlp", "20", "5")
    same = {
        k: v
        for k, v in zip(WORKLOAD[::2], WORKLOAD[1::2])
        if k not in ("--dataset", "--model", "--devices", "--per-round")
    }
    assert all(opts[k] == v for k, v in same.items())


@pytest.mark.slow
def test_network_contract() -> None:
    cmd = [
        sys.executable,
        "-m",
        "qflare",
        "bench",
        "network",
        "--rounds",
        "2",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--devices",
        "20",
        "--per-round",
        "5",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "inprocess_wall_s",
        "network_wall_s",
        "inprocess_mean_round_s",
        "network_mean_round_s",
        "inprocess_peak_rss_mb",
        "network_peak_rss_mb",
    ):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert isinstance(res["round_overhead_pct"], (int, float))
    assert len(res["inprocess"]["accuracy"]) == len(res["network"]["accuracy"]) == 2  # both runs completed
    assert 0 < res["inprocess_final_accuracy"] <= 1 and 0 < res["network_final_accuracy"] <= 1
    assert res["server_final_state"] == "finished"
    # Same seeds, same enrollment order, same selection stream: the server picks the devices the
    # in-process coordinator picks, so the curves are the same.
    assert res["selection_mismatches"] == 0
    assert res["same_accuracy_curve"] is True
