"""The user's path through the CLI: shared options, start-up checks of the strategy, --config files,
help that fits 80 columns, one error style, --version and the server's Swagger UI."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
from fastapi.testclient import TestClient
from server_fixtures import make_runtime
from typer.testing import CliRunner

from qflare import __version__
from qflare.cli import app
from qflare.errors import ConfigError
from qflare.models import model_names
from qflare.server import create_app
from qflare.strategy import STRATEGIES, fedavg, fedmedian, fedtrimmedmean, krum, register_strategy
from qflare.strategy.pipeline import _REGISTRY

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "run.toml"
SMALL = ["--dataset", "digits", "--model", "mlp", "--workers", "1"]


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error(result: Any, code: int = 2) -> str:
    """The run failed with ``code`` and exactly one ``error [...]`` line; that line."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error [")]
    assert len(lines) == 1, result.output
    return str(lines[0])


# ------------------------------------------------------------------ item 8: what a strategy needs
def test_pipeline_checks_the_round_size_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"Krum with f=1 needs more than 2f\+2 = 4") as info:
        krum(f=1).check_round_size(4)
    assert info.value.code == "too_few_updates"
    krum(f=1).check_round_size(5)
    with pytest.raises(ConfigError, match=r"Multi-Krum with m=5, f=1 needs at least m\+f = 6"):
        krum(f=1, m=5).check_round_size(5)
    with pytest.raises(ConfigError, match=r"trims floor\(0.1\*5\) = 0 .* at least 10 updates"):
        fedtrimmedmean(beta=0.1).check_round_size(5)
    fedtrimmedmean(beta=0.1).check_round_size(10)
    fedtrimmedmean(beta=0.0).check_round_size(1)  # no trimming asked for: any size
    fedmedian().check_round_size(1)
    with pytest.raises(ConfigError, match="at least 1"):
        fedmedian().check_round_size(0)
    fedavg().check_round_size(1)


@pytest.mark.parametrize("command", ["simulate", "demo"])
def test_a_strategy_that_cannot_aggregate_the_rounds_is_refused_at_start(command: str) -> None:
    extra = ["--devices", "4"] if command == "simulate" else ["--devices", "3"]
    line = one_error(run(command, "--strategy", "krum", "--per-round", "2", *extra))
    assert "--strategy krum cannot aggregate rounds of --per-round 2" in line
    assert "needs more than 2f+2 = 4" in line and "too_few_updates" in line


def test_the_server_refuses_krum_with_too_few_participants(tmp_path: Path) -> None:
    line = one_error(
        run("server", "--data-dir", str(tmp_path / "srv"), "--strategy", "krum", "--min-participants", "3")
    )
    assert "--min-participants 3" in line and "Krum" in line
    assert not (tmp_path / "srv").exists()  # refused before anything was created


def test_per_round_above_devices_is_refused_not_clamped() -> None:
    line = one_error(run("simulate", "--devices", "3", "--per-round", "5", *SMALL))
    assert "--per-round 5 is more than --devices 3" in line
    line = one_error(run("demo", "--devices", "3", "--per-round", "4"))
    assert "--per-round 4 is more than --devices 3" in line


def test_demo_defaults_per_round_to_at_most_devices() -> None:
    # --devices 3 with the default --per-round passes the per-round check: the next check (an option that
    # does not apply) is what stops it, before any process starts.
    line = one_error(run("demo", "--devices", "3", "--server-lr", "0.5"))
    assert "--server-lr does not apply" in line


def test_a_run_where_every_round_failed_exits_non_zero(tmp_path: Path) -> None:
    saved = _REGISTRY.snapshot()
    # every aggregate is beyond the bound on the model's weights: each round fails, nothing is published
    register_strategy("never-publishes", lambda: fedavg(max_model_abs=1e-9))
    try:
        result = run("simulate", *SMALL, "--devices", "2", "--rounds", "2", "--strategy", "never-publishes")
    finally:
        _REGISTRY.restore(saved)
    line = one_error(result, code=1)
    assert "every one of the 2 rounds failed" in line and "all_rounds_failed" in line
    assert " ".join(result.output.split()).count("failed: the model stayed as it was") == 2


# ------------------------------------------------------------------ item 9: one set of options
def _options(*path: str, shown: bool = False) -> set[str]:
    """The command's options (``shown``: only those its --help lists, not the hidden ones)."""
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {opt for p in cmd.params for opt in p.opts if not (shown and getattr(p, "hidden", False))}


TRAINING = {"--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--prox-mu", "--max-grad-norm"}
DP = {"--noise-multiplier", "--dp-epsilon", "--dp-delta", "--dp-clip", "--dp-quantile"}
STRATEGY = {"--strategy", "--server-lr", "--selector", *DP}


def test_training_and_strategy_options_are_shared() -> None:
    for command in ("simulate", "client", "demo"):
        assert _options(command) >= TRAINING, command
    for command in ("simulate", "server", "demo"):
        assert _options(command) >= STRATEGY, command
    assert not _options("server") & TRAINING  # the server does not train
    assert not _options("client") & DP  # a device adds no central noise


def test_messages_name_options_not_fields() -> None:
    line = one_error(run("simulate", "--strategy", "fedavg", "--server-lr", "0.5", *SMALL))
    assert "--server-lr does not apply to --strategy fedavg" in line and "fedavgm" in line
    assert "server_lr" not in line and "pipeline" not in line
    assert "--lr must be a positive" in one_error(run("simulate", "--lr", "0", *SMALL))
    assert "--max-grad-norm" in one_error(run("client", "--server", "http://127.0.0.1:9", "--max-grad-norm", "-1"))
    line = one_error(run("server", "--strategy", "fedavg", "--server-lr", "1"))
    assert "--server-lr does not apply" in line


def test_unknown_registry_names_list_the_choices() -> None:
    line = one_error(run("simulate", "--strategy", "fedavgg", *SMALL))
    assert "fedavgg" in line and all(name in line for name in STRATEGIES)


# ------------------------------------------------------------------ item 10: the missing-data message
def test_missing_dataset_names_the_download_command(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("simulate", "--dataset", "fashion-mnist", "--data-root", str(empty), "--devices", "2")
    assert result.exit_code == 2
    assert f"qflare data download fashion-mnist --dest {empty}" in result.output
    assert "--download " not in result.output and "QFLARE_DATA_DIR" not in result.output


# ------------------------------------------------------------------ item 12: --config run.toml
def test_example_config_runs_and_flags_override_it(tmp_path: Path) -> None:
    doc = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert doc["rounds"] == 3
    out = tmp_path / "out"
    result = run("simulate", "--config", str(EXAMPLE), "--rounds", "1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert len(history["rounds"]) == 1  # the flag won
    cfg = history["config"]
    assert (cfg["strategy"], cfg["strategy_args"], cfg["per_round"], cfg["devices"]) == (
        "fedavgm",
        {"server_lr": 0.5},
        4,
        8,
    )
    assert cfg["train"]["momentum"] == 0.9 and cfg["train"]["batch_size"] == 16  # from [simulate]
    effective = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert effective["rounds"] == 1 and effective["per-round"] == 4 and effective["server-lr"] == 0.5
    # the effective configuration reproduces the run
    again = tmp_path / "again"
    result = run("simulate", "--config", str(out / "config.toml"), "--out", str(again), "--json")
    assert result.exit_code == 0, result.output
    first, second = (json.loads((d / "history.json").read_text())["rounds"] for d in (out, again))
    assert [r["model_sha256"] for r in first] == [r["model_sha256"] for r in second]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("per_round = 2\n", "unknown key 'per_round' (did you mean 'per-round'?)"),
        ("rounds = '3'\n", "key 'rounds' must be an integer, got '3'"),
        ("alpha = true\n", "key 'alpha' must be a number"),
        ("dataset = 5\n", "key 'dataset' must be a string"),
        ("protocol = 1\n", "key 'protocol' must be true or false"),
        ("rounds = \n", "is not valid TOML"),
        ("[simulat]\nrounds = 2\n", "unknown table [simulat]"),
        ("[server]\nnot-an-option = 1\n", None),  # another command's table is not read by simulate
    ],
)
def test_bad_config_files_are_refused_naming_the_key(tmp_path: Path, text: str, expected: str | None) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    if expected is None:
        line = one_error(run("simulate", "--config", str(path), "--lr", "0", *SMALL))
        assert "--lr" in line
        return
    assert expected in one_error(run("simulate", "--config", str(path), *SMALL))


def test_config_values_are_checked_like_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("devices = 0\n", encoding="utf-8")
    assert "--devices" in one_error(run("simulate", "--config", str(path)))
    path.write_text("[server]\nmin-participants = 20\n", encoding="utf-8")
    line = one_error(run("server", "--config", str(path), "--data-dir", str(tmp_path / "srv")))
    assert "--min-participants 20 is more than --per-round 10" in line
    assert "cannot read --config" in one_error(run("demo", "--config", str(tmp_path / "missing.toml")))


def test_config_and_federation_file_conflict(tmp_path: Path) -> None:
    spec = tmp_path / "fed.json"
    from qflare.federation import FederationSpec

    FederationSpec(dataset="digits", model="mlp", devices=2, per_round=2, rounds=1).save(spec)
    path = tmp_path / "run.toml"
    path.write_text("rounds = 4\n", encoding="utf-8")
    line = one_error(run("simulate", "--config", str(path), "--federation", str(spec)))
    assert "do not also pass --rounds" in line


# ------------------------------------------------------------------ item 15: help, version, errors, docs
@pytest.mark.parametrize("command", [("simulate",), ("server",), ("client",), ("demo",), ("data", "stats")])
def test_help_fits_80_columns_with_every_option_whole(command: tuple[str, ...]) -> None:
    result = run(*command, "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    words = set(result.output.replace(",", " ").replace("/", " ").split())
    missing = {opt for opt in _options(*command, shown=True) if opt.startswith("--")} - words
    assert not missing, missing


def test_server_help_lists_strategy_and_model_choices() -> None:
    words = set(run("server", "--help", env={"COLUMNS": "80"}).output.replace(",", " ").replace(".", " ").split())
    assert set(STRATEGIES) <= words and set(model_names()) <= words  # whole: never broken at a hyphen


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"qflare {__version__}"


def test_usage_errors_take_the_one_error_form() -> None:
    line = one_error(run("simulate", "--devices", "0"))
    assert "--devices" in line and "simulate --help" in line
    assert "--server is required" in one_error(run("client"))
    assert "No such option" in one_error(run("simulate", "--no-such-flag"))


def test_swagger_ui_is_served(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, evaluate=False)
    with TestClient(create_app(runtime)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text and "/openapi.json" in page.text
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and "/v1/status" in schema.json()["paths"]
        assert "/docs" not in schema.json()["paths"]


@pytest.mark.parametrize("command", ["simulate", "server", "demo"])
def test_secure_aggregation_option_reaches_the_federation_and_is_checked(command: str, tmp_path: Path) -> None:
    # An aggregator that needs single updates cannot run under secure aggregation: refused before anything starts.
    extra = ["--data-dir", str(tmp_path / "srv")] if command == "server" else []
    result = run(
        command, "--dataset", "digits", "--model", "mlp", "--secure-aggregation", "--aggregator", "median", *extra
    )
    assert result.exit_code != 0
    assert "secure aggregation" in result.output
