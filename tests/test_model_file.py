"""Model files (safetensors + what rebuilds the module), the history files and plot, and the bounded mean
of device-reported training losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import qflare
from qflare.errors import ValidationError
from qflare.history import plot_history, write_history
from qflare.model_file import load_model, read_model_info, write_model_file
from qflare.models import create_model
from qflare.protocol.rounds import mean_reported_loss
from qflare.wire import ParamLayout, encode_model


def _saved(path: Path, model: str = "mlp", shape: tuple[int, int, int] = (1, 8, 8)) -> torch.nn.Module:
    torch.manual_seed(3)
    net = create_model(model, shape, 10)
    layout = ParamLayout.from_module(net)
    write_model_file(
        path,
        layout,
        layout.module_to_flat(net),
        model=model,
        input_shape=shape,
        num_classes=10,
        provenance={"round": "4", "source": "test"},
    )
    return net


def test_round_trip_rebuilds_the_same_module(tmp_path: Path) -> None:
    net = _saved(tmp_path / "m.safetensors")
    loaded = qflare.load_model(tmp_path / "m.safetensors")
    assert "load_model" in qflare.__all__ and type(loaded) is type(net) and not loaded.training
    for (n1, p1), (n2, p2) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    info = read_model_info(tmp_path / "m.safetensors")
    assert (info.model, info.input_shape, info.num_classes) == ("mlp", (1, 8, 8), 10)
    assert info.fingerprint == ParamLayout.from_module(net).fingerprint and info.provenance["round"] == "4"


def test_a_file_naming_an_unknown_model_is_refused(tmp_path: Path) -> None:
    net = create_model("mlp", (1, 8, 8), 10)
    layout = ParamLayout.from_module(net)
    md = {"model": "no-such-model", "input_shape": "1,8,8", "num_classes": "10"}
    (tmp_path / "m.safetensors").write_bytes(encode_model(layout, layout.module_to_flat(net), md))
    with pytest.raises(ValidationError) as exc:
        load_model(tmp_path / "m.safetensors")
    assert exc.value.code == "bad_model_file" and "no-such-model" in str(exc.value)


def test_a_file_whose_tensors_do_not_fit_the_named_model_is_refused(tmp_path: Path) -> None:
    net = create_model("mlp", (1, 8, 8), 10)
    layout = ParamLayout.from_module(net)
    md = {"model": "mlp", "input_shape": "1,8,8", "num_classes": "7"}  # claims 7 classes, holds 10
    (tmp_path / "m.safetensors").write_bytes(encode_model(layout, layout.module_to_flat(net), md))
    with pytest.raises(ValidationError) as exc:
        load_model(tmp_path / "m.safetensors")
    assert exc.value.code == "architecture_mismatch"


@pytest.mark.parametrize(
    "content",
    [b"", b"not safetensors at all", b"\xff" * 8 + b"{}", None],
)
def test_garbage_and_missing_files_are_one_clear_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "m.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValidationError) as exc:
        load_model(path)
    assert exc.value.code == "bad_model_file" and str(path) in str(exc.value)


def test_metadata_with_hostile_shapes_is_refused_before_building(tmp_path: Path) -> None:
    net = create_model("mlp", (1, 8, 8), 10)
    layout = ParamLayout.from_module(net)
    for shape in ("1,8", "1,8,8,8", "0,8,8", "1,8,99999999999", "-1,8,8", "a,b,c"):
        md = {"model": "mlp", "input_shape": shape, "num_classes": "10"}
        (tmp_path / "m.safetensors").write_bytes(encode_model(layout, layout.module_to_flat(net), md))
        with pytest.raises(ValidationError) as exc:
            load_model(tmp_path / "m.safetensors")
        assert exc.value.code == "bad_model_file", shape


def test_mean_reported_loss_ignores_hostile_values() -> None:
    reports = [
        {"loss": 1.0},
        {"loss": 3.0},
        {"loss": float("nan")},
        {"loss": float("inf")},
        {"loss": -2.0},
        {"loss": 1e300},
        {"loss": "2"},
        {"loss": True},
        {},
        "not a mapping",  # type: ignore[list-item]
    ]
    assert mean_reported_loss(reports) == 2.0  # type: ignore[arg-type]
    assert mean_reported_loss([{"loss": float("nan")}]) is None


def test_history_files_and_plot(tmp_path: Path) -> None:
    rows = [
        {"round": 1, "accuracy": 0.5, "loss": 1.2, "train_loss": 1.4},
        {"round": 2, "accuracy": 0.6, "loss": 1.0, "train_loss": None},  # a round without a train loss
    ]
    paths = write_history(tmp_path, {"rounds": rows}, rows, "title · digits")
    assert [p.name for p in paths] == ["history.json", "history.csv", "history.png"]
    assert json.loads(paths[0].read_text())["rounds"] == rows
    assert paths[1].read_text().splitlines()[0] == "round,accuracy,loss,train_loss"
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_has_integer_round_ticks_legend_and_title(monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    seen: list[Figure] = []
    real = Figure.savefig

    def spy(self: Figure, *args: object, **kwargs: object) -> None:
        seen.append(self)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "savefig", spy)
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 2.0 / r, "train_loss": 2.1 / r} for r in range(1, 4)]
    plot_history(rows, "QFLARE · digits · fedavg · 6 devices")
    ax = seen[0].axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(math.isclose(t, round(t)) for t in ticks)
    assert ax.get_title() == "QFLARE · digits · fedavg · 6 devices"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["test accuracy", "test loss", "train loss (mean over devices)"]
