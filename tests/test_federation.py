"""``FederationSpec``: validation, and the JSON file form every launcher hands to its children."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflare.crypto import DEFAULT_SUITE, HIGH_SUITE
from qflare.errors import ConfigError
from qflare.federation import FORMAT, FederationSpec, suite_by_name
from qflare.training import TrainConfig


def test_round_trip_through_a_file_keeps_every_field(tmp_path: Path) -> None:
    spec = FederationSpec(
        dataset="digits",
        data_root=str(tmp_path),
        model="mlp",
        devices=7,
        partition="shards",
        alpha=0.3,
        shards_per_device=3,
        seed=11,
        rounds=4,
        per_round=5,
        min_participants=2,
        round_timeout_s=42.5,
        train=TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, prox_mu=0.01, max_grad_norm=5.0),
        strategy="fedadam",
        strategy_args={"server_lr": 0.03},
        suite=HIGH_SUITE,
    )
    path = spec.save(tmp_path / "sub" / "federation.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["suite"] == HIGH_SUITE.name and doc["train"]["epochs"] == 2
    assert FederationSpec.load(path) == spec
    assert FederationSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"devices": 0}, "devices, rounds and per_round"),
        ({"rounds": 0}, "devices, rounds and per_round"),
        ({"per_round": 0}, "devices, rounds and per_round"),
        ({"devices": 2.5}, "devices must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"shards_per_device": 0}, "shards_per_device"),
        ({"round_timeout_s": -1.0}, "round_timeout_s"),
        ({"min_participants": 11}, "min_participants"),
        ({"min_participants": 0}, "min_participants"),
        ({"dataset": ""}, "dataset must be a registered name or a factory"),
        ({"partition": len}, "partition must be a registered name or a factory"),
        ({"strategy": None}, "strategy must be a registered name or a factory"),
        ({"strategy_args": {"server_lr": [1]}}, "strategy option 'server_lr'"),
        ({"train": {"epochs": 1}}, "train must be a TrainConfig"),
        ({"suite": "default"}, "suite must be a Suite"),
    ],
)
def test_invalid_values_are_config_errors(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        FederationSpec(**changes)


def test_strategy_args_are_copied_not_shared() -> None:
    opts = {"server_lr": 0.1}
    spec = FederationSpec(strategy="fedavgm", strategy_args=opts)
    opts["server_lr"] = 9.0
    assert spec.strategy_args == {"server_lr": 0.1}


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"rounds": 3}, "format"),
        ({"format": "qflare-federation/0", "rounds": 3}, "format"),
        ({"format": FORMAT, "round": 3}, "unknown federation spec field"),
        ({"format": FORMAT, "train": {"epoch": 2}}, "train"),
        ({"format": FORMAT, "train": [1]}, "train"),
        ({"format": FORMAT, "suite": "v1:ML-DSA-65+RSA"}, "unknown crypto suite"),
        ({"format": FORMAT, "rounds": "3"}, "rounds must be an integer"),
    ],
)
def test_bad_documents_are_refused(doc: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FederationSpec.from_json(doc)


def test_unreadable_or_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read federation spec") as missing:
        FederationSpec.load(tmp_path / "absent.json")
    assert missing.value.code == "bad_federation_file"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read federation spec"):
        FederationSpec.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": FORMAT, "devices": 0}))
    with pytest.raises(ConfigError, match="other.json: devices"):
        FederationSpec.load(tmp_path / "other.json")


def test_suites_by_alias_or_full_name() -> None:
    assert suite_by_name("default") == DEFAULT_SUITE and suite_by_name("high") == HIGH_SUITE
    assert suite_by_name(HIGH_SUITE.name) == HIGH_SUITE
    for bad in ("low", "v1:ML-DSA-65+ML-KEM-768", "x1:ML-DSA-65+ML-KEM-768+X25519+AES-256-GCM"):
        with pytest.raises(ConfigError):
            suite_by_name(bad)


def test_a_factory_runs_in_process_but_cannot_travel(tmp_path: Path) -> None:
    from qflare.models import MLP

    spec = FederationSpec(model=lambda shape, classes: MLP(shape[0] * shape[1] * shape[2], classes))
    assert callable(spec.model)
    with pytest.raises(ConfigError, match="cannot travel to another process"):
        spec.save(tmp_path / "spec.json")
    assert not (tmp_path / "spec.json").exists()
