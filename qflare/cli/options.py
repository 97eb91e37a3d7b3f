"""The options ``simulate``, ``server``, ``client`` and ``demo`` share, defined once, and the configs they make.

Training options (``--epochs``, ``--batch-size``, ``--lr``, ``--momentum``, ``--weight-decay``,
``--prox-mu``, ``--max-grad-norm``) belong to the commands that train: simulate, client and demo.
``--precision`` belongs to every command that trains or evaluates (simulate, client, demo, server); like
``--device`` it is the process's own choice, so it may also override a ``--federation`` spec's value
(:func:`with_precision`).
Strategy options (``--strategy``, ``--server-lr``, ``--selector`` and DP-FedAvg's ``--noise-multiplier``,
``--dp-epsilon``, ``--dp-delta``, ``--dp-clip``, ``--dp-quantile``) belong to the commands that
aggregate: simulate, server and demo.  Options that take a registry name list its choices in their
help (the plugins are loaded before this module is imported, see :mod:`qflare.cli._plugins`).

:func:`train_config`, :func:`strategy_args`, :func:`check_per_round` and :func:`check_strategy` turn the
values into :class:`~qflare.training.TrainConfig` and strategy options, refusing bad values with a
:class:`~qflare.errors.ConfigError` whose message names the options, never internal fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from ..data import DATASETS, PARTITIONERS
from ..errors import ConfigError, ErrorCode
from ..federation import FederationSpec
from ..models import model_names
from ..precision import PRECISIONS, check_precision
from ..protocol.selection import SELECTORS
from ..strategy import AGGREGATORS, STRATEGIES, strategy_factory
from ..training import TrainConfig

__all__ = [
    "AGGREGATOR",
    "BACKEND",
    "BATCH_SIZE",
    "BYZANTINE",
    "DATASET",
    "DATA_ROOT",
    "DP_CLIP",
    "DP_DELTA",
    "DP_EPSILON",
    "DP_QUANTILE",
    "EPOCHS",
    "LR",
    "MAX_GRAD_NORM",
    "MODEL",
    "MOMENTUM",
    "NOISE_MULTIPLIER",
    "PARTITION",
    "PRECISION",
    "PROX_MU",
    "RAY_ADDRESS",
    "SELECTOR",
    "SERVER_LR",
    "STRATEGY",
    "WEIGHT_DECAY",
    "check_backend",
    "check_per_round",
    "check_strategy",
    "choices",
    "path_text",
    "root_data_refusal",
    "strategy_args",
    "train_config",
    "with_precision",
]


def choices(names: Iterable[object]) -> str:
    """``one of: a, b, c`` for a registry's names."""
    return "one of: " + ", ".join(str(n) for n in names)


# ------------------------------------------------------------------ workload (every command)
DATASET: Any = typer.Option("fashion-mnist", help=f"Data set; {choices(DATASETS)}.")
DATA_ROOT: Any = typer.Option(None, help="Folder holding the data set files (default: search the usual places).")
MODEL: Any = typer.Option("fedavg-cnn", help=f"Model (the same on server and devices); {choices(model_names())}.")
PARTITION: Any = typer.Option("dirichlet", help=f"How the data set is split among devices; {choices(PARTITIONERS)}.")

# ------------------------------------------------------------------ simulation backend (simulate)
BACKEND: Any = typer.Option(
    "thread",
    help="Where the simulated devices run: thread (this process, a pool of --workers threads) or ray (Ray actors, "
    "--workers of them, 0 = one per CPU Ray offers; the coordinator stays here; needs pip install 'qflare[ray]'). "
    "Same seed, bit-identical models.",
)
RAY_ADDRESS: Any = typer.Option(
    None,
    help="With --backend ray: join this existing Ray cluster (host:6379 or ray://host:10001) instead of starting a "
    "local Ray (qflare and the data set must be on its nodes).",
)

# ------------------------------------------------------------------ training (simulate, client, demo)
EPOCHS: Any = typer.Option(1, min=1, help="Local epochs per round.")
BATCH_SIZE: Any = typer.Option(32, min=1, help="Local mini-batch size.")
LR: Any = typer.Option(0.05, help="Local SGD learning rate (> 0).")
MOMENTUM: Any = typer.Option(0.0, min=0.0, help="Local SGD momentum.")
WEIGHT_DECAY: Any = typer.Option(0.0, min=0.0, help="Local SGD weight decay.")
PROX_MU: Any = typer.Option(0.0, min=0.0, help="FedProx proximal term mu (0 = off).")
MAX_GRAD_NORM: Any = typer.Option(None, help="Clip each local gradient to this L2 norm (> 0; default: no clipping).")

# ------------------------------------------------------------------ precision (simulate, client, demo, server)
PRECISION: Any = typer.Option(
    None,
    help=f"Training/evaluation precision; {choices(PRECISIONS)}. bf16: forward pass under bfloat16 autocast, "
    "weights, updates and aggregation stay float32; auto: bf16 only where the hardware has native bfloat16 "
    "(default: the --federation spec's, else fp32).",
)

# ------------------------------------------------------------------ strategy (simulate, server, demo)
STRATEGY: Any = typer.Option("fedavg", help=f"Aggregation strategy; {choices(STRATEGIES)}.")
SERVER_LR: Any = typer.Option(
    None, help="Server learning rate, for strategies with a server optimiser (fedavgm, fedadam, fedyogi, fedadagrad)."
)
SELECTOR: Any = typer.Option("random", help=f"Client selection; {choices(SELECTORS)}.")
NOISE_MULTIPLIER: Any = typer.Option(
    None,
    help="--strategy dp-fedavg: Gaussian noise multiplier z (noise std z x clip norm on the sum of clipped updates). "
    "Without it, --dp-epsilon calibrates z so that --rounds rounds spend the budget.",
)
DP_EPSILON: Any = typer.Option(
    None,
    help="--strategy dp-fedavg: privacy budget epsilon at --dp-delta; training stops before the round that would "
    "exceed it (a planned end: exit status 0, with the reason printed).",
)
DP_DELTA: Any = typer.Option(None, help="--strategy dp-fedavg: delta of the (epsilon, delta) reported (default 1e-5).")
DP_CLIP: Any = typer.Option(None, help="--strategy dp-fedavg: (initial) L2 clip norm of each update (default 1.0).")
DP_QUANTILE: Any = typer.Option(
    None,
    help="--strategy dp-fedavg: adaptive clipping's target quantile of update norms (default 0.5; 0 keeps "
    "--dp-clip fixed).",
)

_DP_FLAGS = (
    ("--noise-multiplier", "noise_multiplier"),
    ("--dp-epsilon", "epsilon"),
    ("--dp-delta", "delta"),
    ("--dp-clip", "clip_norm"),
    ("--dp-quantile", "target_quantile"),
)
AGGREGATOR: Any = typer.Option(
    "none",
    help=f"Robust aggregation rule composed onto --strategy (its server optimiser kept); {choices(AGGREGATORS)}; "
    "wrappers combine with '+', e.g. norm-bound+multi-krum; reputation turns on threat detection "
    "(reputation+multi-krum) (docs/defences.md).",
)
BYZANTINE: Any = typer.Option(
    None,
    min=0,
    help="f, the Byzantine updates per round --aggregator must tolerate (default: 20% of a round, rounded up).",
)
SECURE_AGGREGATION: Any = typer.Option(
    False,
    "--secure-aggregation",
    help="Post-quantum secure aggregation (docs/secure-aggregation.md): devices send masked, quantised "
    "updates and the coordinator only learns their weighted mean; needs --per-round >= 2, an aggregator of "
    "none and a strategy that reads no single update.",
)


def _finite(option: str, value: float, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"{option} must be a {'positive' if positive else 'non-negative'} finite number, got {value}")


def train_config(
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    prox_mu: float,
    max_grad_norm: float | None,
    device: str = "cpu",
    precision: str | None = None,
) -> TrainConfig:
    """The local training the training options describe (ConfigError naming the option otherwise)."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"--epochs and --batch-size must be >= 1, got {epochs} and {batch_size}")
    _finite("--lr", lr, positive=True)
    _finite("--momentum", momentum)
    _finite("--weight-decay", weight_decay)
    _finite("--prox-mu", prox_mu)
    if max_grad_norm is not None:
        _finite("--max-grad-norm", max_grad_norm, positive=True)
    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        prox_mu=prox_mu,
        max_grad_norm=max_grad_norm,
        device=device,
        precision=_precision(precision) if precision is not None else "fp32",
    )


def _precision(value: str) -> str:
    try:
        return check_precision(value)
    except ConfigError:
        raise ConfigError(f"--precision must be {choices(PRECISIONS)}, got {value!r}") from None


def with_precision(spec: FederationSpec, precision: str | None) -> FederationSpec:
    """``spec`` with ``--precision`` applied when given (a process's own choice, like ``--device``)."""
    if precision is None:
        return spec
    return spec.replace(train=dataclasses.replace(spec.train, precision=_precision(precision)))


def _takes(strategy: str, option: str) -> bool:
    try:
        return option in inspect.signature(strategy_factory(strategy)).parameters
    except (ConfigError, TypeError, ValueError):
        return False


def strategy_args(
    strategy: str,
    server_lr: float | None,
    *,
    noise_multiplier: float | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    dp_clip: float | None = None,
    dp_quantile: float | None = None,
) -> dict[str, Any]:
    """The preset options the strategy options give; an unknown strategy, or an option the strategy does
    not take (``--server-lr`` without a server learning rate, a DP option without ``dp-fedavg``), is
    refused naming the options."""
    strategy_factory(strategy)  # unknown names: ConfigError listing the registered ones
    args: dict[str, Any] = {}
    if server_lr is not None:
        _finite("--server-lr", server_lr, positive=True)
        if not _takes(strategy, "server_lr"):
            takers = [name for name in STRATEGIES if _takes(name, "server_lr")]
            raise ConfigError(
                f"--server-lr does not apply to --strategy {strategy}, which has no server learning rate; "
                f"strategies that take it: {', '.join(takers)}"
            )
        args["server_lr"] = server_lr
    given = dict(
        zip((p for _, p in _DP_FLAGS), (noise_multiplier, dp_epsilon, dp_delta, dp_clip, dp_quantile), strict=True)
    )
    for flag, param in _DP_FLAGS:
        value = given[param]
        if value is None:
            continue
        if param == "target_quantile":
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"{flag} must be in [0, 1) (0: a fixed clip norm), got {value}")
        elif param == "delta":
            if not (isinstance(value, int | float) and 0 < value < 1):
                raise ConfigError(f"{flag} must be in (0, 1), got {value}")
        else:
            _finite(flag, value, positive=True)
        if not _takes(strategy, param):
            takers = [name for name in STRATEGIES if _takes(name, param)]
            raise ConfigError(
                f"{flag} does not apply to --strategy {strategy}; strategies that take it: {', '.join(takers)}"
            )
        args[param] = value
    if _takes(strategy, "noise_multiplier") and "noise_multiplier" not in args and "epsilon" not in args:
        raise ConfigError(
            f"--strategy {strategy} needs --noise-multiplier, or --dp-epsilon to calibrate it (or both: "
            "a fixed noise multiplier and a budget that stops training)"
        )
    return args


def check_per_round(per_round: int, devices: int) -> None:
    """Refuse ``--per-round`` above ``--devices`` (a round selects distinct devices; never clamped)."""
    if per_round > devices:
        raise ConfigError(
            f"--per-round {per_round} is more than --devices {devices}: a round selects distinct devices; "
            f"lower --per-round or raise --devices"
        )


def check_strategy(spec: FederationSpec, *, root_data: bool = True) -> None:
    """Build the spec's strategy and check it against the rounds asked for, in option names: a strategy
    that cannot aggregate ``--per-round`` (or ``--min-participants``) updates is refused before the run,
    and so is an aggregator that needs root data (FLTrust) where ``root_data`` is False."""
    try:
        pipeline = spec.build_strategy()
    except ConfigError as exc:
        if exc.code != ErrorCode.TOO_FEW_UPDATES:
            raise
        flag = "--min-participants" if spec.min_participants else "--per-round"
        what = f"--strategy {spec.strategy}"
        advice = f"raise {flag} or choose another --strategy"
        if spec.aggregator != "none":
            what += f" --aggregator {spec.aggregator} (f = {spec.f})"
            advice = f"raise {flag}, lower --byzantine, or choose another --aggregator"
        raise ConfigError(
            f"{what} cannot aggregate rounds of {flag} {spec.smallest_round}: {exc.message}; {advice}",
            code="too_few_updates",
        ) from None
    if pipeline.needs_root and not root_data:
        raise ConfigError(root_data_refusal(spec.aggregator), code="no_root_data")


def root_data_refusal(aggregator: str) -> str:
    """Why a coordinator without root data refuses ``aggregator`` (FLTrust), and what to do instead."""
    return (
        f"--aggregator {aggregator} needs server-side root data (FLTrust trains the global model on a clean data "
        "set of the coordinator's own every round), which `qflare server` (and so `qflare demo`) does not have: "
        "its evaluation split is never trained on; use it with `qflare simulate`, or choose another --aggregator"
    )


def check_backend(backend: str, ray_address: str | None, *, batched_devices: bool, protocol: bool) -> None:
    """Refuse a ``--backend`` that is not a backend, and options that do not go with the one chosen."""
    if backend not in ("thread", "ray"):
        raise ConfigError(f"--backend must be thread or ray, got {backend!r}")
    if ray_address is not None and backend != "ray":
        raise ConfigError("--ray-address needs --backend ray")
    if backend == "ray" and batched_devices:
        raise ConfigError("--batched-devices trains in this process: it needs --backend thread")
    if backend == "ray" and not protocol:
        raise ConfigError("--backend ray always runs the protocol: --no-protocol needs --backend thread")


def path_text(path: Path | None) -> str | None:
    """A path option as the spec stores it."""
    return str(path) if path is not None else None
