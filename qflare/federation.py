"""One description of a federation's workload, shared by every process that takes part in it.

:class:`FederationSpec` says *what* is trained and how: the data set and model (by registry name), the
number of devices and how the data set is split among them, the seed, the rounds and how many devices
each selects, local training (:class:`~qflare.training.TrainConfig`), the aggregation strategy (by
name, with its options) and the crypto suite.  ``qflare simulate``, ``qflare server``,
``qflare client``, ``qflare demo`` and the benchmarks embed it and keep only their own process
settings (ports, folders, worker threads) beside it.

A spec travels to a child process as a JSON file (:meth:`FederationSpec.save`), read back with
``--federation FILE`` by ``qflare server``, ``qflare client`` and ``qflare simulate``
(:meth:`FederationSpec.load`): the launchers spell no workload option themselves.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .crypto import DEFAULT_SUITE, HIGH_SUITE, Suite
from .data.partition import partition
from .data.sources import DatasetLoader
from .errors import ConfigError, QflareError
from .models import ModelFactory
from .protocol.detection import DetectionConfig, reputation_detection
from .protocol.selection import ClientSelector, SelectorFactory
from .strategy.aggregators import AggregatorContext, aggregator_detection, apply_aggregator, default_byzantine
from .strategy.dp import privacy_of
from .strategy.pipeline import Pipeline, StrategyFactory, build_strategy, strategy_factory
from .training import TrainConfig

__all__ = ["FORMAT", "FederationSpec", "suite_by_name"]

FORMAT = "qflare-federation/1"
"""The ``format`` tag of a spec file; a file with another tag is refused."""

_SUITE_ALIASES: dict[str, Suite] = {"default": DEFAULT_SUITE, "high": HIGH_SUITE}


def suite_by_name(name: str) -> Suite:
    """A suite from ``default``, ``high`` or its full name (``v1:ML-DSA-65+ML-KEM-768+X25519+AES-256-GCM``)."""
    if name in _SUITE_ALIASES:
        return _SUITE_ALIASES[name]
    version, sep, rest = name.partition(":")
    parts = rest.split("+")
    hybrid = len(parts) == 4 and parts[2] == "X25519"
    if not sep or not version.startswith("v") or not version[1:].isdigit() or len(parts) != (4 if hybrid else 3):
        raise ConfigError(
            f"unknown crypto suite {name!r}: use default, high or a full suite name", code="unknown_suite"
        )
    try:
        suite = Suite(version=int(version[1:]), sig=parts[0], kem=parts[1], x25519=hybrid, aead=parts[-1])
    except QflareError as exc:
        raise ConfigError(f"unknown crypto suite {name!r}: {exc}", code="unknown_suite") from None
    if suite.name != name:
        raise ConfigError(
            f"crypto suite name {name!r} is not canonical (expected {suite.name!r})", code="unknown_suite"
        )
    return suite


_INTS = ("devices", "shards_per_device", "seed", "rounds", "per_round")
_NAMES = ("dataset", "model", "partition", "strategy", "selector")
_OBJECTS_ALLOWED = ("dataset", "model", "strategy", "selector")
"""Fields that, in this process, may also hold the factory (or selector) itself instead of a registered name."""
_SCALARS = (bool, int, float, str)
_SHAPE = ("devices", "per_round", "rounds")
"""Spec fields a strategy factory receives when its signature names them and the options do not."""


@dataclass(frozen=True)
class FederationSpec:
    """The workload of one federation (see the module docstring).  Invalid values raise ConfigError."""

    dataset: str | DatasetLoader = "fashion-mnist"
    """Registered data set: the devices train on its train split, the coordinator evaluates on its test split."""
    data_root: str | None = None
    """Folder holding the data set files (None: search the usual places).  Where the data is, not what it is."""
    model: str | ModelFactory = "fedavg-cnn"
    devices: int = 100
    """Devices in the federation: the train split is cut into this many partitions."""
    partition: str = "dirichlet"
    alpha: float = 0.5
    """Dirichlet concentration (``partition="dirichlet"``; smaller: more label skew)."""
    shards_per_device: int = 2
    """Label-sorted shards per device (``partition="shards"``)."""
    seed: int = 0
    """Seed of the partition, the initial model, device selection and local shuffles."""
    rounds: int = 30
    per_round: int = 10
    """Devices selected each round (all active devices when fewer are enrolled)."""
    min_participants: int | None = None
    """Updates a server needs at a round's deadline to aggregate (None: every selected device)."""
    round_timeout_s: float = 600.0
    """A server's round deadline (the in-process simulation has none: every selected device answers)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: str | StrategyFactory = "fedavg"
    strategy_args: Mapping[str, Any] = field(default_factory=dict)
    """Options of the strategy preset, e.g. ``{"server_lr": 0.1}`` (JSON scalars only)."""
    aggregator: str = "none"
    """A robust aggregation rule composed onto ``strategy`` (:mod:`qflare.strategy.aggregators`), e.g.
    ``multi-krum``, ``bulyan``, ``fltrust``, ``norm-bound+median``; ``none`` keeps the strategy's combine.
    ``reputation`` (alone or as a wrapper: ``reputation+multi-krum``) turns on :attr:`detection`."""
    byzantine: int | None = None
    """f, the Byzantine updates per round the aggregator must tolerate (None: ⌈0.2 × smallest_round⌉)."""
    suite: Suite = DEFAULT_SUITE
    selector: str | ClientSelector | SelectorFactory = "random"
    """Who takes part in each round: a registered client selector (``random``: a seeded uniform sample)."""
    detection: Mapping[str, Any] | None = None
    """Adaptive threat detection (docs/defences.md): None = off, unless :attr:`aggregator` names
    ``reputation`` (then on with the defaults); a mapping of
    :class:`~qflare.protocol.detection.DetectionConfig` options (``{}``: on, with the defaults)."""
    secure_aggregation: bool = False
    """Post-quantum secure aggregation (docs/secure-aggregation.md): the coordinator sees only masked
    updates and learns their weighted sum; the strategy runs with ``secure_aggregation=True`` (its
    example-weighted mean, central noise and server optimiser; nothing that reads single updates)."""

    def __post_init__(self) -> None:
        for name in _NAMES:
            value = getattr(self, name)
            if isinstance(value, str) and value.strip():
                continue
            if name in _OBJECTS_ALLOWED and (callable(value) or hasattr(value, "select")):
                continue  # a factory (or selector) given in-process; it cannot be saved to a spec file
            raise ConfigError(f"{name} must be a registered name or a factory, got {value!r}")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise ConfigError(f"data_root must be a path string or None, got {self.data_root!r}")
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.devices < 1 or self.rounds < 1 or self.per_round < 1:
            raise ConfigError(
                f"devices, rounds and per_round must be >= 1 (got {self.devices}, {self.rounds}, {self.per_round})"
            )
        if self.shards_per_device < 1:
            raise ConfigError(f"shards_per_device must be >= 1, got {self.shards_per_device}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not _positive(self.alpha):
            raise ConfigError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not _positive(self.round_timeout_s):
            raise ConfigError(f"round_timeout_s must be a positive finite number, got {self.round_timeout_s!r}")
        mp = self.min_participants
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or not 1 <= mp <= self.per_round):
            raise ConfigError(f"min_participants must be between 1 and per_round ({self.per_round}), got {mp!r}")
        if not isinstance(self.aggregator, str) or not self.aggregator.strip():
            raise ConfigError(f"aggregator must be a registered aggregator name, got {self.aggregator!r}")
        f = self.byzantine
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < self.smallest_round):
            raise ConfigError(
                f"byzantine (f) must be an integer in [0, {self.smallest_round}) for rounds of {self.smallest_round} "
                f"update(s), got {f!r}"
            )
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if not isinstance(self.suite, Suite):
            raise ConfigError(f"suite must be a Suite, got {type(self.suite).__name__}")
        if not isinstance(self.secure_aggregation, bool):
            raise ConfigError(f"secure_aggregation must be true or false, got {self.secure_aggregation!r}")
        if not isinstance(self.strategy_args, Mapping):
            raise ConfigError("strategy_args must be a mapping of option name to value")
        for key, value in self.strategy_args.items():
            if not isinstance(key, str) or not isinstance(value, _SCALARS):
                raise ConfigError(f"strategy option {key!r} must be a name with a number, string or bool value")
        object.__setattr__(self, "strategy_args", dict(self.strategy_args))  # a private copy
        if self.detection is not None:
            if not isinstance(self.detection, Mapping) or not all(
                isinstance(k, str) and isinstance(v, _SCALARS) for k, v in self.detection.items()
            ):
                raise ConfigError("detection must be None or a mapping of option name to number")
            object.__setattr__(self, "detection", dict(self.detection))
            self.detection_config()  # refuse bad options now

    def detection_config(self) -> DetectionConfig | None:
        """The :class:`DetectionConfig` of :attr:`detection`, or its defaults when only :attr:`aggregator`
        asks for detection (``reputation``); None when detection is off."""
        if self.detection is not None:
            return reputation_detection(**dict(self.detection))
        return reputation_detection() if aggregator_detection(self.aggregator) else None

    def partitions(self, labels: np.ndarray) -> list[np.ndarray]:
        """Every device's example indices into ``labels``: the one draw simulation, devices and servers share."""
        return partition(
            self.partition,
            labels,
            self.devices,
            seed=self.seed,
            alpha=self.alpha,
            shards_per_device=self.shards_per_device,
        )

    @property
    def smallest_round(self) -> int:
        """The fewest updates a round of this federation is meant to aggregate: ``min_participants``,
        else ``per_round``."""
        return self.min_participants or self.per_round

    def build_strategy(self) -> Pipeline:
        """The strategy pipeline, checked against :attr:`smallest_round` (ConfigError ``too_few_updates``
        when its combine cannot work with that few updates, e.g. Krum's n > 2f + 2), so a federation
        that could never aggregate is refused before it starts.

        A factory whose signature names ``devices``, ``per_round`` or ``rounds`` receives the spec's values
        (DP-FedAvg's sampling rate, denominator and planned rounds); strategy options may not set them."""
        args = dict(self.strategy_args)
        factory = strategy_factory(self.strategy) if isinstance(self.strategy, str) else self.strategy
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        for name in _SHAPE:  # a preset that needs the federation's shape (DP-FedAvg: q, m, rounds) gets it
            if name in args:
                raise ConfigError(f"strategy option {name!r} is the federation's own {name}; set it there")
            if name in params:
                args[name] = getattr(self, name)
        if self.secure_aggregation:
            if "secure_aggregation" in args:
                raise ConfigError("strategy option 'secure_aggregation' is the federation's own; set it there")
            args["secure_aggregation"] = True
        pipeline = build_strategy(self.strategy, **args)
        if privacy_of(pipeline) is not None and (
            self.aggregator.strip().lower() != "none" or self.detection_config() is not None
        ):
            # the DP guarantee is the combine's (clip, noise, fixed denominator): another combine would drop
            # it, and a filter that leaves updates out by comparing them with the others' (or quarantine,
            # which changes who is sampled) breaks its sensitivity and sampling analysis
            what = (
                f"--aggregator {self.aggregator}" if self.aggregator.strip().lower() != "none" else "threat detection"
            )
            raise ConfigError(
                f"--strategy dp-fedavg cannot be combined with {what}: its privacy guarantee rests on its own combine "
                "(clip, noise, fixed denominator) and on uniform sampling, which a robust rule, a detector that leaves "
                "updates out by comparing them with the others, or quarantine would break; use --aggregator none"
            )
        pipeline = apply_aggregator(pipeline, self.aggregator, AggregatorContext(self.smallest_round, self.f))
        pipeline.check_round_size(self.smallest_round)
        return pipeline

    @property
    def f(self) -> int:
        """The Byzantine updates per round the aggregator tolerates: ``byzantine``, else ⌈0.2 × smallest_round⌉."""
        return self.byzantine if self.byzantine is not None else default_byzantine(self.smallest_round)

    def replace(self, **changes: Any) -> FederationSpec:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the file form
    def to_json(self) -> dict[str, Any]:
        """A JSON object describing this spec (:meth:`from_json` reads it back to an equal spec)."""
        out: dict[str, Any] = {"format": FORMAT}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
            if f.name in _OBJECTS_ALLOWED and not isinstance(out[f.name], str):
                raise ConfigError(
                    f"{f.name} is a Python object, which cannot travel to another process: register it under a "
                    "name (register_model / register_dataset / register_strategy / register_selector, in a plugin "
                    "so every process has it) and give that name"
                )
        out["train"] = dataclasses.asdict(self.train)
        out["strategy_args"] = dict(self.strategy_args)
        out["detection"] = None if self.detection is None else dict(self.detection)
        out["suite"] = self.suite.name
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FederationSpec:
        """The spec in ``doc``; unknown or missing-format documents and bad values raise ConfigError."""
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise ConfigError(f"not a federation spec: expected a JSON object with format {FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known - {"format"})
        if unknown:
            raise ConfigError(f"unknown federation spec field(s) {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in doc.items() if k != "format"}
        if "train" in values:
            train = values["train"]
            if not isinstance(train, Mapping):
                raise ConfigError("federation spec field 'train' must be an object")
            try:
                values["train"] = TrainConfig(**train)
            except TypeError as exc:
                raise ConfigError(f"bad federation spec field 'train': {exc}") from None
        if "suite" in values:
            if not isinstance(values["suite"], str):
                raise ConfigError("federation spec field 'suite' must be a suite name")
            values["suite"] = suite_by_name(values["suite"])
        for name in ("alpha", "round_timeout_s"):  # JSON writes 1.0 as 1.0, but a hand-written file may say 1
            if isinstance(values.get(name), int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the spec to ``path`` as JSON (what ``--federation FILE`` reads); the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FederationSpec:
        """The spec in the JSON file ``path`` (ConfigError when it cannot be read or is not one)."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read federation spec {path}: {exc}", code="bad_federation_file") from None
        try:
            return cls.from_json(doc)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}", code="bad_federation_file") from None


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
