"""``qflare bench network``: its JSON contract on a small federation (digits + MLP), both runs completing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qflare.bench.fmnist import FMNIST_DIR05
from qflare.bench.server_proc import ServerSpec
from qflare.federation import FederationSpec


def test_bench_server_gets_the_federation_as_a_file_and_only_its_own_options() -> None:
    fed = FMNIST_DIR05.replace(dataset="digits", model="mlp", devices=20, per_round=5)
    server = ServerSpec(fed, max_uploads=3).process()
    try:
        argv = server.command()

        def opt(flag: str) -> str:
            return argv[argv.index(flag) + 1]

        assert opt("--federation") == str(server.federation_file)
        assert opt("--min-devices") == "20" and opt("--max-uploads") == "3" and "--no-eval" in argv
        assert not {"--dataset", "--model", "--rounds", "--per-round", "--seed", "--strategy"} & set(argv)
    finally:
        server.close()
    assert FMNIST_DIR05.train.lr == 0.05 and (FMNIST_DIR05.devices, FMNIST_DIR05.per_round) == (100, 10)
    assert isinstance(FMNIST_DIR05, FederationSpec) and FMNIST_DIR05.alpha == 0.5


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
