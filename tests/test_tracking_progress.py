"""Progress within a simulated round, per-round tracking (TensorBoard, MLflow) and download progress."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_fixtures import make_runtime
from typer.testing import CliRunner

from qflare.cli import app
from qflare.data.download import KNOWN_FILES, MirrorFile, fetch
from qflare.federation import FederationSpec
from qflare.server import create_app
from qflare.simulation import RoundProgress, SimulationConfig, run_simulation
from qflare.tracking import open_trackers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
runner = CliRunner()
SMALL = ["--dataset", "digits", "--model", "mlp", "--devices", "4", "--per-round", "3", "--rounds", "2"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_progress_within_each_round_and_before_its_evaluation() -> None:
    spec = FederationSpec(dataset="digits", model="mlp", devices=4, per_round=3, rounds=2)
    events: list[tuple[str, object]] = []
    lock = threading.Lock()

    def on_progress(p: RoundProgress) -> None:
        with lock:
            events.append(("progress", p))

    result = run_simulation(
        SimulationConfig(spec, workers=2, eval_chunks=4),
        on_progress=on_progress,
        on_round=lambda r: events.append(("round", r.round)),
    )
    assert [r.round for r in result.rounds] == [1, 2]
    progress = [p for kind, p in events if kind == "progress"]
    assert isinstance(progress[0], RoundProgress)
    for rnd in (1, 2):
        for stage, total in (("train", 3), ("submit", 3), ("eval", 4), ("aggregated", 1)):
            mine = [p for p in progress if isinstance(p, RoundProgress) and p.round == rnd and p.stage == stage]
            assert sorted(p.done for p in mine) == list(range(1, total + 1)), (rnd, stage)
            assert {p.total for p in mine} == {total}
        # each training/submission step is reported as it happens, and the round's aggregation is
        # reported before its (overlapped) evaluation finishes and its accuracy is known
        names = [(k, getattr(p, "stage", p), getattr(p, "round", p)) for k, p in events]
        assert names.index(("progress", "aggregated", rnd)) < names.index(("round", rnd, rnd))
        assert names.index(("progress", "submit", rnd)) < names.index(("progress", "aggregated", rnd))


def test_simulate_writes_tensorboard_scalars_matching_its_history(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", *SMALL, "--json", "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    history = json.loads(result.output.strip().splitlines()[-1])["rounds"]
    got = scalars(tmp_path / "tb")
    for name, key in (("accuracy", "accuracy"), ("loss", "loss"), ("train_loss", "train_loss")):
        assert [s for s, _ in got[f"round/{name}"]] == [1, 2]
        for (_, value), rec in zip(got[f"round/{name}"], history, strict=True):
            assert value == pytest.approx(rec[key], rel=1e-6)
    assert got["round/participants"] == [(1, 3.0), (2, 3.0)]
    assert [v for _, v in got["round/examples"]] == [float(r["examples"]) for r in history]
    assert "round/refused" not in got  # the simulation does not measure it: absent, not 0


@pytest.mark.slow
def test_simulate_logs_to_mlflow(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["simulate", *SMALL, "--json", "--mlflow", uri])
    assert result.exit_code == 0, result.output
    history = json.loads(result.output.strip().splitlines()[-1])["rounds"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("qflare")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["dataset"] == "digits"
    acc = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in acc] == [(r["round"], pytest.approx(r["accuracy"])) for r in history]


@pytest.mark.parametrize(
    ("module", "flag", "value"),
    [("torch.utils.tensorboard", "--tensorboard", "tb"), ("mlflow", "--mlflow", "file:mlruns")],
)
def test_missing_tracking_package_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, flag: str, value: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["simulate", *SMALL, flag, value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    out = " ".join(result.output.split())  # the console wraps long lines
    assert "package, which is not installed: pip install 'qflare[tracking]'" in out
    assert not (tmp_path / value.split(":")[-1]).exists()


def test_bad_tracking_targets_and_log_level_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2 and "Traceback" not in result.output
        return " ".join(result.output.split())  # the console wraps long lines

    out = run("simulate", *SMALL, "--tensorboard", str(tmp_path / "a-file" / "tb"))
    assert "--tensorboard" in out and "cannot write there: Not a directory" in out
    assert "--mlflow bogus://nowhere" in run("simulate", *SMALL, "--mlflow", "bogus://nowhere")
    out = run("server", "--data-dir", str(tmp_path / "srv"), "--log-level", "chatty")
    assert "unknown log level 'chatty'" in out
    assert not (tmp_path / "srv").exists()  # refused before anything was created


def test_tracker_rejects_unknown_names_and_skips_non_finite(tmp_path: Path) -> None:
    trackers = open_trackers(tensorboard=tmp_path)
    with pytest.raises(ValueError, match="unknown round scalar"):
        trackers.trackers[0].log(1, {"accuracy_typo": 1.0})
    trackers.log(1, {"accuracy": float("nan"), "loss": 0.5})
    trackers.close()
    assert scalars(tmp_path) == {"round/loss": [(1, 0.5)]}
    assert not open_trackers()  # nothing asked for: an empty (falsy) set


def test_eval_gauges_absent_until_evaluated_and_labels_bounded(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    with TestClient(create_app(runtime)) as client:
        client.get("/no/such/path/with-a-unique-name-9f3a")
        client.request("BREW", "/healthz")
        text = client.get("/metrics").text
        assert "qflare_eval_accuracy" not in text and "qflare_eval_round" not in text
        assert "process_resident_memory_bytes" in text
        assert 'qflare_http_request_duration_seconds_count{method="GET",route="/healthz"}' not in text
        assert 'qflare_http_request_duration_seconds_count{method="OTHER",route="/healthz"} 1.0' in text
        assert "with-a-unique-name" not in text and "BREW" not in text
        runtime.metrics.record_evaluation(1, 0.75, 0.5)
        text = client.get("/metrics").text
        assert "qflare_eval_accuracy 0.75" in text and "qflare_eval_round 1.0" in text


# ---------------------------------------------------------------------------------- downloads


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_reports_progress_per_chunk(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    served, url = http_dir
    data = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three 1 MiB chunks
    (served / "blob.bin").write_bytes(data)
    calls: list[tuple[str, int, int | None]] = []
    file = MirrorFile("blob.bin", hashlib.sha256(data).hexdigest(), (url,), size=len(data))
    path = fetch(file, tmp_path / "dest", progress=lambda *a: calls.append(a))
    assert path.read_bytes() == data
    assert calls[0] == ("blob.bin", 0, len(data)) and calls[-1] == ("blob.bin", len(data), len(data))
    received = [c[1] for c in calls]
    assert received == sorted(received) and len(calls) >= 4
    calls.clear()
    fetch(file, tmp_path / "dest", progress=lambda *a: calls.append(a))
    assert calls == []  # already verified: nothing downloaded, nothing reported


def test_data_download_cli_with_progress_and_failure(
    http_dir: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, url = http_dir
    data = b"qflare" * 300_000
    (served / "f.bin").write_bytes(data)
    good = MirrorFile("f.bin", hashlib.sha256(data).hexdigest(), (url,))
    monkeypatch.setitem(KNOWN_FILES, "local-test", (good,))
    result = runner.invoke(app, ["data", "download", "local-test", "--dest", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "local-test ready in" in result.output and (tmp_path / "d" / "f.bin").read_bytes() == data
    bad = MirrorFile("f.bin", "0" * 64, (url,))
    monkeypatch.setitem(KNOWN_FILES, "local-test", (bad,))
    result = runner.invoke(app, ["data", "download", "local-test", "--dest", str(tmp_path / "e")])
    assert result.exit_code == 2 and "sha256 mismatch" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e" / "f.bin").exists()
