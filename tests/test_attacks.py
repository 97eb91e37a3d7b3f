"""Simulated attackers (qflare.defense) and the simulation's defence record."""

from __future__ import annotations

import pytest
import torch

from qflare.cli import options as opts
from qflare.defense import ATTACKS, AttackConfig, add_trigger, flip_labels, min_max_update, poison_backdoor
from qflare.defense.record import DefenceLog
from qflare.errors import ConfigError
from qflare.federation import FederationSpec
from qflare.simulation import SimulationConfig, run_simulation
from qflare.training import TrainConfig


def test_model_poisoning_attacks_rewrite_the_update() -> None:
    delta = torch.tensor([1.0, -2.0, 0.5])
    assert AttackConfig("sign-flip").poison_update(delta, seed=1).tolist() == [-1.0, 2.0, -0.5]
    assert AttackConfig("scale", scale=10.0).poison_update(delta, seed=1).tolist() == [10.0, -20.0, 5.0]
    g1 = AttackConfig("gaussian", noise_std=2.0).poison_update(delta, seed=7)
    g2 = AttackConfig("gaussian", noise_std=2.0).poison_update(delta, seed=7)
    assert torch.equal(g1, g2) and not torch.equal(g1, delta)
    big = AttackConfig("gaussian", noise_std=3.0).poison_update(torch.zeros(20000), seed=0)
    assert float(big.std()) == pytest.approx(3.0, rel=0.05)
    for name in ("label-flip", "backdoor"):  # data attacks send what they trained
        assert torch.equal(AttackConfig(name).poison_update(delta, seed=1), delta)


def test_min_max_stays_within_the_benign_spread_and_moves_away_from_the_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    benign = [torch.randn(50, generator=gen) + 1.0 for _ in range(6)]
    bad = min_max_update(benign)
    stack = torch.stack(benign)
    spread = max(float(torch.linalg.vector_norm(a - b)) for a in benign for b in benign)
    assert float(torch.linalg.vector_norm(stack - bad, dim=1).max()) <= spread + 1e-4
    mean, std = stack.mean(0), stack.std(0, unbiased=False)
    gamma = float(((mean - bad) / std).mean())
    assert gamma > 0.5  # pushed along −σ as far as the spread allows
    # Slightly further along −σ and it would stand out: γ is the largest admissible value.
    further = mean - (gamma + 0.05) * std
    assert float(torch.linalg.vector_norm(stack - further, dim=1).max()) > spread
    assert torch.equal(min_max_update([benign[0]]), benign[0])  # one benign update: nothing to hide in
    with pytest.raises(ValueError):
        min_max_update([])


def test_data_poisoning() -> None:
    y = torch.tensor([0, 3, 9])
    assert flip_labels(y, 10).tolist() == [9, 6, 0]
    x = torch.zeros(10, 1, 8, 8)
    x[:, :, 0, 0] = 2.0
    px, py = poison_backdoor(x, torch.arange(10) % 3, target=1, fraction=0.3, seed=0)
    poisoned = [i for i in range(10) if bool((px[i, 0, -4:, -4:] == 2.0).all())]
    assert len(poisoned) == 3 and all(int(py[i]) == 1 for i in poisoned)
    assert float(x[:, :, -4:, -4:].abs().sum()) == 0.0  # the caller's tensors are untouched
    assert torch.equal(add_trigger(x, 5.0)[:, :, :4, :4], x[:, :, :4, :4])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "nope"},
        {"name": "scale", "malicious": 0.0},
        {"name": "scale", "malicious": 1.0},
        {"name": "scale", "scale": -1.0},
    ],
)
def test_bad_attacks_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        AttackConfig(**kwargs)
    assert info.value.code == "bad_attack"


def test_attackers_are_a_fixed_seeded_share() -> None:
    a = AttackConfig("scale", malicious=0.2).attackers(100)
    assert len(a) == 20 and a == AttackConfig("scale", malicious=0.2).attackers(100)
    assert a != AttackConfig("scale", malicious=0.2, seed=1).attackers(100)
    with pytest.raises(ConfigError):
        AttackConfig("scale", malicious=0.01).attackers(10)  # no attacker at all


def test_defence_log_scores_detections() -> None:
    log = DefenceLog(frozenset({1, 2}))
    rec = log.record(1, [0, 1, 2, 3], {1: "not_combined", 3: "norm_exceeded"})
    assert (rec.attackers, rec.true_positives, rec.false_positives, rec.false_negatives) == ([1, 2], 1, 1, 1)
    assert log.summary()["precision"] == 0.5 and log.summary()["recall"] == 0.5
    assert DefenceLog(frozenset({1})).summary()["precision"] is None


def _spec(**changes: object) -> FederationSpec:
    base = FederationSpec(
        dataset="digits",
        model="mlp",
        devices=10,
        per_round=10,
        rounds=2,
        partition="iid",
        train=TrainConfig(channels_last=False),
    )
    return base.replace(**changes)


def test_multi_krum_leaves_out_scaled_attackers_over_the_real_protocol() -> None:
    spec = _spec(aggregator="multi-krum", byzantine=2)
    result = run_simulation(SimulationConfig(spec, workers=2, attack=AttackConfig("scale", malicious=0.2)))
    doc = result.to_json()["defence"]
    assert len(doc["attackers"]) == 2 and len(doc["rounds"]) == 2
    for rnd in doc["rounds"]:  # read from the round's ledger entry
        assert set(rnd["left_out"]) == {str(i) for i in rnd["attackers"]}
        assert set(rnd["left_out"].values()) == {"not_combined"}
    assert doc["detection"]["precision"] == 1.0 and doc["detection"]["recall"] == 1.0
    assert result.to_json()["config"]["attack"]["name"] == "scale"


def test_min_max_and_fltrust_and_backdoor_run_without_the_protocol() -> None:
    clean = run_simulation(SimulationConfig(_spec(rounds=1), workers=2, protocol=False))
    mm = run_simulation(
        SimulationConfig(
            _spec(rounds=1, aggregator="fltrust"), workers=2, protocol=False, attack=AttackConfig("min-max")
        )
    )
    assert mm.defence is not None and len(mm.defence.rounds) == 1
    assert mm.rounds[0].accuracy != clean.rounds[0].accuracy
    bd = run_simulation(SimulationConfig(_spec(rounds=1), workers=2, protocol=False, attack=AttackConfig("backdoor")))
    assert bd.defence is not None and 0.0 <= bd.defence.extra["backdoor_success"] <= 1.0


def test_server_and_demo_refuse_fltrust_without_root_data() -> None:
    spec = FederationSpec(aggregator="fltrust")
    opts.check_strategy(spec)  # simulate has root data
    with pytest.raises(ConfigError) as info:
        opts.check_strategy(spec, root_data=False)
    assert info.value.code == "no_root_data"
    assert set(ATTACKS) == {"sign-flip", "scale", "gaussian", "label-flip", "backdoor", "min-max"}


def test_bench_defences_sizes_f_per_rule_and_draws_the_table() -> None:
    from qflare.bench.defenses import _spec_for, defences_table_png

    base = _spec(per_round=10)
    assert _spec_for(base, "multi-krum").f == 2
    assert _spec_for(base, "bulyan").f == 1  # 4*2 + 3 > 10: the largest f Bulyan allows at n = 10
    result = {
        "workload": "custom",
        "rounds": 1,
        "malicious": 0.2,
        "aggregators": ["none", "bulyan"],
        "attacks": ["scale"],
        "clean_accuracy": {"none": 0.8, "bulyan": 0.7},
        "accuracy": {"scale": {"none": 0.1, "bulyan": 0.6}},
        "backdoor_success": {},
    }
    assert defences_table_png(result).startswith(b"\x89PNG")
