"""Mixed precision: what ``auto`` picks, that bf16 really runs in autocast, that everything leaving the
computation stays float32, and that a short bf16 run lands within a stated tolerance of fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import qflare.precision as precision_mod
from qflare.cli import app
from qflare.data import load_dataset
from qflare.errors import ConfigError
from qflare.federation import FederationSpec
from qflare.models import create_model
from qflare.precision import PRECISIONS, cpu_native_bf16, resolve_precision
from qflare.simulation import SimulationConfig, run_simulation
from qflare.training import LocalTrainer, TrainConfig, evaluate
from qflare.wire import decode_blob, encode_update

runner = CliRunner()

ACCURACY_TOLERANCE = 0.03
"""A short bf16 run's accuracy stays within 3 points of fp32's, round by round (digits + mlp, 6 rounds;
measured differences were at most 0.3 points)."""


def _native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision_mod, "cpu_native_bf16", lambda: native)


def test_auto_is_fp32_without_native_bf16_and_bf16_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _native(monkeypatch, False)
    auto = resolve_precision("auto", "cpu")
    assert (auto.name, auto.native, auto.autocast_dtype) == ("fp32", False, None)
    assert auto.describe() == "fp32 (auto: no native bf16 on cpu)" and auto.warning is None
    forced = resolve_precision("bf16", "cpu")
    assert forced.name == "bf16" and forced.autocast_dtype is torch.bfloat16
    assert forced.warning is not None and "emulated" in forced.warning and "slower" in forced.warning
    _native(monkeypatch, True)
    auto = resolve_precision("auto", "cpu")
    assert (auto.name, auto.native) == ("bf16", True)
    assert auto.describe() == "bf16 (auto: native bf16 on cpu)" and auto.warning is None
    assert resolve_precision("bf16", "cpu").warning is None
    assert resolve_precision("fp32", "cpu").name == "fp32"  # fp32 is fp32, whatever the hardware


def test_cpu_detection_reads_the_bf16_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(precision_mod.platform, "machine", lambda: "x86_64")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision_mod, "_CPUINFO", info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cpu_native_bf16() is False  # AVX-512 without its BF16 extension only emulates bf16
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_native_bf16() is True
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert cpu_native_bf16() is True
    monkeypatch.setattr(precision_mod, "_CPUINFO", tmp_path / "missing")
    assert cpu_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_native_bf16() is True  # torch's own query counts first


def test_bad_precisions_are_refused() -> None:
    assert PRECISIONS == ("fp32", "bf16", "auto")
    for bad in ("fp16", "BF16", "", None, 16):
        with pytest.raises(ConfigError, match="precision"):
            TrainConfig(precision=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            resolve_precision(bad)  # type: ignore[arg-type]
    if not torch.cuda.is_available():  # bf16 on a CUDA device that cannot run it: refused, not emulated
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_precision("bf16", "cuda")
    assert resolve_precision("auto", "cuda" if not torch.cuda.is_available() else "cpu").name in ("fp32", "bf16")


def _digits_cnn(precision: str) -> tuple[LocalTrainer, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    net = create_model("fedavg-cnn", data.input_shape, data.num_classes)  # convolutions, channels-last
    trainer = LocalTrainer(net, TrainConfig(batch_size=32, lr=0.05, precision=precision))
    return trainer, data.normalized()[:64], data.labels[:64]


@pytest.mark.slow  # emulated bf16 convolutions: seconds a step on a CPU without native bf16
def test_bf16_step_is_autocast_and_keeps_float32_weights_and_update() -> None:
    t32, x, y = _digits_cnn("fp32")
    t16, _, _ = _digits_cnn("bf16")
    start = t32.layout.module_to_flat(t32.model)
    assert torch.equal(start, t16.layout.module_to_flat(t16.model))
    r32 = t32.train(start, x, y, seed=1)
    r16 = t16.train(start, x, y, seed=1)
    assert r16.delta.dtype == torch.float32 and r16.delta.shape == r32.delta.shape
    assert all(p.dtype == torch.float32 for p in t16.model.parameters())  # master weights
    assert bool(torch.isfinite(r16.delta).all())
    assert not torch.equal(r16.delta, r32.delta)  # the bf16 forward pass really ran in bfloat16
    rel = float((r16.delta - r32.delta).norm() / r32.delta.norm())
    assert rel < 0.1, rel  # ... and the update is the same one up to bf16 rounding
    blob = encode_update(t16.layout, r16.delta)  # the wire format is unchanged: a float32 update
    assert decode_blob(blob, t16.layout, kind="update").flat.dtype == torch.float32
    # evaluation under autocast: python floats, close to fp32's on the same weights
    t32.layout.load_into(t32.model, start + r16.delta)
    loss32, acc32 = evaluate(t32.model, x, y)
    loss16, acc16 = evaluate(t32.model, x, y, precision=resolve_precision("bf16"))
    assert isinstance(loss16, float) and isinstance(acc16, float)
    assert abs(acc16 - acc32) <= 0.05 and abs(loss16 - loss32) <= 0.05 * max(1.0, loss32)


SPEC = FederationSpec(
    dataset="digits", model="mlp", devices=8, per_round=4, rounds=6, alpha=1.0, seed=3, train=TrainConfig(lr=0.1)
)


def _curve(precision: str) -> tuple[list[float], list[float], dict[str, object]]:
    spec = SPEC.replace(train=TrainConfig(lr=0.1, precision=precision))
    res = run_simulation(SimulationConfig(spec, workers=1))  # the secure protocol: updates decoded as F32
    return [r.accuracy for r in res.rounds], [r.train_loss for r in res.rounds], res.config


@pytest.mark.slow
def test_short_bf16_run_is_within_tolerance_of_fp32() -> None:
    acc32, loss32, _ = _curve("fp32")
    acc16, loss16, config = _curve("bf16")
    assert config["precision"] == "bf16" and config["train"]["precision"] == "bf16"  # type: ignore[index]
    assert loss16 != loss32  # not silently fp32
    assert acc32[-1] > 0.6  # it learned, so the comparison means something
    for a, b in zip(acc16, acc32, strict=True):
        assert abs(a - b) <= ACCURACY_TOLERANCE, (acc16, acc32)


def test_simulate_cli_reports_what_auto_chose(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _native(monkeypatch, False)
    args = ["simulate", "--dataset", "digits", "--model", "mlp", "--devices", "4", "--per-round", "2"]
    result = runner.invoke(app, [*args, "--rounds", "1", "--precision", "auto", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "history.json").read_text())["config"]
    assert config["precision"] == "fp32" and config["train"]["precision"] == "auto"
    assert config["precision_detail"] == "fp32 (auto: no native bf16 on cpu)"
    assert 'precision = "auto"' in (tmp_path / "a" / "config.toml").read_text()

    spec_file = SPEC.replace(devices=4, per_round=2, rounds=1).save(tmp_path / "federation.json")
    result = runner.invoke(
        app, ["simulate", "--federation", str(spec_file), "--precision", "bf16", "--out", str(tmp_path / "b")]
    )  # precision is the process's own choice: allowed next to a spec file, like a client's --device
    assert result.exit_code == 0, result.output
    assert "emulated" in result.output  # the one-line warning
    config = json.loads((tmp_path / "b" / "history.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["precision_detail"] == "bf16 (emulated on cpu)"


@pytest.mark.parametrize("command", ["simulate", "demo", "server", "client"])
def test_cli_refuses_an_unknown_precision(command: str, tmp_path: Path) -> None:
    extra = {"server": ["--data-dir", str(tmp_path / "srv")], "client": ["--server", "http://127.0.0.1:9"]}
    result = runner.invoke(app, [command, "--dataset", "digits", "--precision", "fp16", *extra.get(command, [])])
    assert result.exit_code != 0
    assert "--precision must be one of: fp32, bf16, auto, got 'fp16'" in result.output
    assert "Traceback" not in result.output


def test_bench_auto_without_native_bf16_says_so_and_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from qflare.bench import fmnist

    _native(monkeypatch, False)
    monkeypatch.setattr(fmnist, "_simulate", lambda *a, **k: pytest.fail("must not run a second fp32 simulation"))
    out = fmnist._precision_comparison("auto", 2, workers=0, data_root=None, fp32={}, bare={})
    assert (out["requested"], out["resolved"], out["native_bf16"]) == ("auto", "fp32", False)
    assert "nothing to compare" in out["note"] and "bare PyTorch loop" in out["speed_reference"]
    result = runner.invoke(app, ["bench", "fmnist-dir05", "--precision", "fp16"])
    assert result.exit_code != 0 and "unknown precision 'fp16'" in result.output
