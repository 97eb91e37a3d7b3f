"""docs/extending.md, executed: every Python block runs, and what it registers works everywhere.

The blocks register a model, an aggregation rule, a data set and a client selector; the tests check
each through its resolver, a simulation, the round state machine, plugin loading, and finally a
``qflare server`` with two ``qflare client`` processes that know the names only through a plugin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from protocol_fixtures import Federation as ProtocolFederation

from qflare import plugins
from qflare.data import DATASETS, load_dataset, sources
from qflare.errors import ConfigError, DataError, RoundError
from qflare.models import _REGISTRY as MODEL_REGISTRY
from qflare.models import count_parameters, create_model, model_names, register_model
from qflare.protocol import RandomSelector, RoundConfig, build_selector, check_selection, register_selector, selection
from qflare.strategy import STRATEGIES, ClientUpdate, build_strategy, pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
REGISTRIES = (MODEL_REGISTRY, pipeline._REGISTRY, sources._REGISTRY, selection._REGISTRY)


def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)


def block(marker: str) -> str:
    found = [b for b in doc_blocks("python") if marker in b]
    assert len(found) == 1, f"expected one python block containing {marker!r} in {DOC.name}"
    return found[0]


def run_block(marker: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "extending_doc"}
    exec(compile(block(marker), f"{DOC.name}[{marker}]", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def clean_registries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test registers (or a plugin loads) is gone afterwards."""
    saved = [(reg, reg.snapshot()) for reg in REGISTRIES]
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setattr(plugins, "_failed", {})
    yield
    for reg, state in saved:
        reg.restore(state)


# ------------------------------------------------------------------------------------ the doc blocks
def test_every_python_block_runs_in_order() -> None:
    python = doc_blocks("python")
    assert len(python) >= 6
    for code in python:
        exec(compile(code, DOC.name, "exec"), {"__name__": "extending_doc"})
    assert {"tiny-net"} <= set(model_names())
    assert {"sqrt-clip-avgm"} <= set(STRATEGIES) and "blobs" in DATASETS and "round-robin" in selection.SELECTORS


def test_model_block() -> None:
    ns = run_block('register_model("tiny-net"')
    net = create_model("tiny-net", (1, 1, 2), 3)
    assert count_parameters(net) == (2 * 32 + 32) + (32 * 3 + 3)
    assert net(torch.zeros(5, 1, 1, 2)).shape == (5, 3)
    assert count_parameters(create_model(ns["TinyNet"], (1, 1, 2), 3)) == count_parameters(net)  # a factory too
    assert count_parameters(create_model("TINY-NET", (1, 1, 2), 3)) == count_parameters(net)
    with pytest.raises(ConfigError, match="already registered") as dup:
        register_model("tiny-net", ns["TinyNet"])
    assert dup.value.code == "duplicate_name"
    register_model("tiny-net", ns["TinyNet"], replace=True)
    with pytest.raises(ConfigError, match=r"unknown model 'tiny-nett'; registered: .*tiny-net"):
        create_model("tiny-nett", (1, 1, 2), 3)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        create_model(lambda shape, classes: "not a model", (1, 1, 2), 3)  # type: ignore[arg-type,return-value]


def test_rule_block_aggregates_as_documented() -> None:
    ns = run_block('register_strategy("sqrt-clip-avgm"')
    a = ClientUpdate("a", torch.full((4,), 1.0), num_examples=1)  # weight sqrt(1) = 1
    b = ClientUpdate("b", torch.full((4,), 2.0), num_examples=4)  # weight sqrt(4) = 2

    def aggregate(**options: float) -> torch.Tensor:
        rnd = build_strategy("sqrt-clip-avgm", **options).begin(torch.zeros(4))
        rnd.add(a)
        rnd.add(b)
        return rnd.finish()

    # No clipping (norms 2 and 4 are under 10), no momentum yet: the sqrt-weighted mean (1*1 + 2*2) / 3.
    assert torch.allclose(aggregate(momentum=0.0), torch.full((4,), 5 / 3))
    # max_norm 1 clips both deltas to norm 1 (each coordinate 0.5) before the mean.
    assert torch.allclose(aggregate(momentum=0.0, max_norm=1.0), torch.full((4,), 0.5))
    assert torch.allclose(aggregate(server_lr=0.5, momentum=0.0), torch.full((4,), 5 / 6))
    with pytest.raises(ConfigError, match="bad options for strategy 'sqrt-clip-avgm'"):
        build_strategy("sqrt-clip-avgm", beta=0.1)
    assert isinstance(build_strategy(ns["sqrt_clip_avgm"]), pipeline.Pipeline)  # the factory itself
    with pytest.raises(ConfigError, match="not a Pipeline"):
        build_strategy(lambda: "fedavg")


def test_dataset_block() -> None:
    ns = run_block('register_dataset("blobs"')
    train, test = load_dataset("blobs", "train"), load_dataset("Blobs", "test")
    assert (len(train), len(test)) == (600, 300) and train.input_shape == (1, 1, 2) and train.num_classes == 3
    assert np.bincount(train.labels.numpy()).tolist() == [200, 200, 200]
    assert torch.equal(load_dataset(ns["load_blobs"], "train").images, train.images)  # the loader itself
    assert not torch.equal(train.images[:300], test.images)
    assert list(DATASETS)[:5] == ["mnist", "fashion-mnist", "cifar10", "digits", "synthetic"]
    assert DATASETS[-1] == "blobs"
    with pytest.raises(DataError, match=r"unknown dataset 'blob'; registered: .*blobs"):
        load_dataset("blob")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("blobs", "validation")
    with pytest.raises(ConfigError, match="'fmnist' is already registered"):
        sources.register_dataset("fmnist", ns["load_blobs"])  # an alias of a built-in is taken too
    with pytest.raises(DataError, match="not an ArrayDataset"):
        load_dataset(lambda split, root, download: [1, 2, 3])  # type: ignore[arg-type,return-value]


def test_selector_block_drives_the_rounds(tmp_path: Path) -> None:
    ns = run_block('register_selector("round-robin"')
    assert ns["rounds"].selector == "round-robin"
    fed = ProtocolFederation(tmp_path, n=3, per_round=2, rounds=3, selector="round-robin")
    order = [d.device_id for d in fed.store.list_devices(status="active")]
    expected = [order[0:2], [order[2], order[0]], [order[1], order[2]]]
    for number, want in enumerate(expected, start=1):
        rnd = fed.coordinator.rounds.open_next()
        assert rnd is not None and rnd.number == number and list(rnd.selected) == want
        for k, dev in enumerate(fed.selected()):
            dev.submit(fed.prepare(dev, seed=k))
        assert fed.coordinator.rounds.model.version == number


class _Bad:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def select(self, round_number: int, candidates: Sequence[str], k: int, seed: int) -> Any:
        return self.answer(candidates)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (lambda c: [c[0], c[0]], "more than once"),
        (lambda c: [c[0]], "chose 1 device"),
        (lambda c: [c[0], "someone-else"], "not active devices"),
        (lambda c: c[0], "not a sequence"),
    ],
)
def test_a_bad_selection_opens_no_round(tmp_path: Path, answer: Any, why: str) -> None:
    fed = ProtocolFederation(tmp_path, n=3, per_round=2, selector=_Bad(answer))
    with pytest.raises(RoundError, match=why) as info:
        fed.coordinator.rounds.open_next()
    assert info.value.code == "bad_selection"
    assert fed.coordinator.rounds.current is None and fed.store.list_rounds() == []


def test_random_selector_keeps_the_seeded_stream() -> None:
    """The stream the simulation's direct mode and the network benchmark replay: default_rng(seed + 1)."""
    ids = [f"d{i}" for i in range(20)]
    sel, stream = RandomSelector(), np.random.default_rng(7 + 1)
    for number in range(1, 6):
        assert sel.select(number, ids, 4, 7) == [ids[i] for i in stream.choice(20, 4, replace=False)]
    resumed = RandomSelector()  # a restarted coordinator whose next round is 9
    want = np.random.default_rng([7 + 1, 8]).choice(20, 4, replace=False)
    assert resumed.select(9, ids, 4, 7) == [ids[i] for i in want]
    assert isinstance(build_selector("random"), RandomSelector) and build_selector("RANDOM") is not build_selector(
        "random"
    )


def test_selector_resolution_and_registry_errors() -> None:
    ns = run_block('register_selector("round-robin"')
    robin = ns["RoundRobin"]()
    assert build_selector(robin) is robin and isinstance(build_selector(ns["RoundRobin"]), ns["RoundRobin"])
    assert check_selection(["b", "a"], ["a", "b", "c"], 2, 1) == ("b", "a")
    with pytest.raises(ConfigError, match=r"unknown selector 'robin'; registered: random, round-robin"):
        build_selector("robin")
    with pytest.raises(ConfigError, match="has no select"):
        build_selector(lambda: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="must start with a letter or digit"):
        register_selector("round robin", ns["RoundRobin"])
    with pytest.raises(ConfigError, match="already registered"):
        register_selector("random", ns["RoundRobin"])
    assert RoundConfig(selector=ns["RoundRobin"]).selector is ns["RoundRobin"]


def test_simulation_block_trains_with_the_custom_pieces(capsys: pytest.CaptureFixture[str]) -> None:
    for marker in (
        'register_model("tiny-net"',
        'register_strategy("sqrt-clip-avgm"',
        'register_dataset("blobs"',
        'register_selector("round-robin"',
    ):
        run_block(marker)
    ns = run_block("run_simulation(")
    result = ns["result"]
    assert [r.round for r in result.rounds] == [1, 2]
    assert result.config["dataset"] == "blobs" and result.config["strategy"] == "sqrt-clip-avgm"
    assert result.rounds[-1].accuracy > 0.6  # three separable blobs: chance is 1/3
    assert "accuracy after 2 rounds" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ plugins
def test_toml_block_declares_the_entry_point_group() -> None:
    (toml,) = doc_blocks("toml")
    eps = tomllib.loads(toml)["project"]["entry-points"]
    assert list(eps) == [plugins.ENTRY_POINT_GROUP]
    assert eps[plugins.ENTRY_POINT_GROUP] == {"my-extensions": "my_qflare_plugin:register"}


def make_plugin(root: Path, *, value: str = "qflare_docs_plugin", body: str | None = None) -> Path:
    """A plugin distribution as pip would install it: the module and a dist-info naming its entry point."""
    site = root / "site"
    (site / "qflare_docs_plugin-0.1.dist-info").mkdir(parents=True)
    dist = site / "qflare_docs_plugin-0.1.dist-info"
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qflare-docs-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\ndocs-extensions = {value}\n")
    if body is None:  # the documentation's model, rule, data set and selector, as one module
        markers = ('register_model("tiny-net"', 'register_strategy("sqrt-clip-avgm"', 'register_dataset("blobs"')
        body = "\n\n".join(block(m) for m in (*markers, 'register_selector("round-robin"'))
    (site / "qflare_docs_plugin.py").write_text(body)
    return site


def test_plugin_entry_point_registers_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(make_plugin(tmp_path)))
    monkeypatch.delitem(sys.modules, "qflare_docs_plugin", raising=False)
    assert "blobs" not in DATASETS
    assert plugins.load_plugins(environ={}) == ("docs-extensions",)
    assert "blobs" in DATASETS and "tiny-net" in model_names() and "sqrt-clip-avgm" in STRATEGIES
    assert plugins.load_plugins(environ={}) == ()  # once per process


def test_plugin_callable_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = "from qflare import register_selector\n\ndef register():\n    register_selector('env-picked', list)\n"
    (tmp_path / "envplug.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.load_plugins(environ={plugins.PLUGINS_ENV: " envplug:register , "}) == ("envplug:register",)
    assert "env-picked" in selection.SELECTORS


def test_failing_plugin_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_plugin(
        tmp_path, value="qflare_docs_plugin:register", body="def register():\n    raise ValueError('no GPU here')\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "qflare_docs_plugin", raising=False)
    with pytest.raises(plugins.PluginError) as info:
        plugins.load_plugins(environ={})
    text = str(info.value)
    assert text == "plugin 'docs-extensions' (qflare_docs_plugin:register) failed to load: ValueError: no GPU here"
    assert info.value.code == "plugin_error"
    with pytest.raises(plugins.PluginError, match="no GPU here"):
        plugins.load_plugins(environ={})  # reported again, not retried


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qflare", *args], env=env, capture_output=True, text=True, timeout=120)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != plugins.PLUGINS_ENV}
    return {**env, "COLUMNS": "400", **extra}


def test_cli_lists_plugin_names_and_reports_a_broken_plugin(tmp_path: Path) -> None:
    site = make_plugin(tmp_path)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    helped = _cli(["simulate", "--help"], _env(PYTHONPATH=path))
    assert helped.returncode == 0, helped.stderr
    assert "blobs" in helped.stdout and "tiny-net" in helped.stdout and "sqrt-clip-avgm" in helped.stdout

    broken = _cli(["simulate", "--help"], _env(QFLARE_PLUGINS="no_such_plugin_module:register"))
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip() == (
        "error [plugin_error] plugin 'no_such_plugin_module:register' failed to load: "
        "ModuleNotFoundError: No module named 'no_such_plugin_module'"
    )

    unknown = _cli(["simulate", "--dataset", "blobs", "--model", "mlp", "--rounds", "1"], _env())
    assert unknown.returncode == 2 and "unknown dataset 'blobs'; registered: mnist" in unknown.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plugin_reaches_server_and_client_processes(tmp_path: Path) -> None:
    from http_fixtures import Federation

    site = make_plugin(tmp_path)
    fed = Federation(
        tmp_path / "fed", devices=2, rounds=2, per_round=2, dataset="blobs", model="tiny-net", strategy="sqrt-clip-avgm"
    )
    fed.env["PYTHONPATH"] = os.pathsep.join([str(site), fed.env.get("PYTHONPATH", "")])
    fed.env.pop(plugins.PLUGINS_ENV, None)
    try:
        fed.start_server()
        fed.wait_ready()
        for i, token in enumerate(fed.tokens_via_cli(2)):
            fed.start_device(i, token)
        fed.wait_exit(["device-0", "device-1"], 150.0)
        final = fed.wait_status(lambda s: any(h["round"] == 2 for h in s["history"]), 60.0)
        assert final["state"] == "finished" and final["model_version"] == 2
        by_round = {h["round"]: h for h in final["history"]}
        assert by_round[2]["updates"] == 2 and by_round[2]["examples"] == 600
        assert by_round[2]["accuracy"] > 0.6  # evaluated by the server on the plugin's test split
        fed.assert_clean_shutdown("server")
    finally:
        fed.close()
