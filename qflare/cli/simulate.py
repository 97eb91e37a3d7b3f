"""``qflare simulate``: a federation of N devices in this process, over the real protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..defense import ATTACKS, AttackConfig
from ..errors import ConfigError, ErrorCode
from ..federation import FederationSpec, suite_by_name
from ..precision import resolve_precision
from ..training import resolve_device
from . import options as opts
from . import runconfig
from .common import FEDERATION_HELP, console, err_console, fail, federation_spec, friendly_errors, writable_dir
from .interrupt import exit_interrupted, graceful_interrupt

if TYPE_CHECKING:
    from ..simulation import RoundProgress, RoundRecord, SimulationResult

WORKLOAD_OPTIONS = (
    "dataset",
    "data_root",
    "model",
    "devices",
    "per_round",
    "rounds",
    "partition",
    "alpha",
    "shards_per_device",
    "seed",
    "strategy",
    "selector",
    "server_lr",
    "noise_multiplier",
    "dp_epsilon",
    "dp_delta",
    "dp_clip",
    "dp_quantile",
    "aggregator",
    "byzantine",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "prox_mu",
    "max_grad_norm",
    "device",
    "suite",
    "secure_aggregation",
)


def simulate(
    ctx: typer.Context,
    run_config: Path | None = runconfig.config_option(),
    federation: Path | None = typer.Option(None, help=FEDERATION_HELP),
    dataset: str = opts.DATASET,
    data_root: Path | None = opts.DATA_ROOT,
    model: str = opts.MODEL,
    devices: int = typer.Option(100, min=1, help="Devices in the federation (each enrolls and opens a PQ session)."),
    per_round: int | None = typer.Option(
        None, min=1, help="Devices sampled (without replacement) each round, at most --devices (default: 10 or fewer)."
    ),
    rounds: int = typer.Option(30, min=1, help="Federated rounds."),
    partition: str = opts.PARTITION,
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller: more label skew)."),
    shards_per_device: int = typer.Option(2, min=1, help="Shards per device for --partition shards."),
    seed: int = typer.Option(
        0, min=0, help="Seed of partition, sampling, initialisation and shuffles: same seed, same numbers."
    ),
    strategy: str = opts.STRATEGY,
    selector: str = opts.SELECTOR,
    server_lr: float | None = opts.SERVER_LR,
    noise_multiplier: float | None = opts.NOISE_MULTIPLIER,
    dp_epsilon: float | None = opts.DP_EPSILON,
    dp_delta: float | None = opts.DP_DELTA,
    dp_clip: float | None = opts.DP_CLIP,
    dp_quantile: float | None = opts.DP_QUANTILE,
    aggregator: str = opts.AGGREGATOR,
    byzantine: int | None = opts.BYZANTINE,
    attack: str | None = typer.Option(
        None,
        help=f"Simulate attacker devices that run the real protocol; one of: {', '.join(ATTACKS)} (docs/defences.md).",
    ),
    malicious: float | None = typer.Option(
        None, help="With --attack: the share of devices that attack, 0 < share < 1 (default 0.2)."
    ),
    epochs: int = opts.EPOCHS,
    batch_size: int = opts.BATCH_SIZE,
    lr: float = opts.LR,
    momentum: float = opts.MOMENTUM,
    weight_decay: float = opts.WEIGHT_DECAY,
    prox_mu: float = opts.PROX_MU,
    max_grad_norm: float | None = opts.MAX_GRAD_NORM,
    device: str = typer.Option("cpu", help="Torch device for training: cpu, cuda, cuda:N or auto."),
    precision: str | None = opts.PRECISION,
    workers: int = typer.Option(
        0,
        min=0,
        help="Training threads (0 = one per core; 1 = sequential with torch's default threads); with --backend ray, "
        "device-host actors (0 = one per CPU Ray offers).",
    ),
    backend: str = opts.BACKEND,
    ray_address: str | None = opts.RAY_ADDRESS,
    suite: str = typer.Option(
        "default",
        help="Crypto suite: default (ML-DSA-65 + ML-KEM-768 + X25519) or high (ML-DSA-87 + ML-KEM-1024 + X25519).",
    ),
    protocol: bool = typer.Option(
        True,
        help="Run the secure protocol (PQ sessions, signatures, database). --no-protocol aggregates training results directly: only to measure the protocol's cost.",
    ),
    secure_aggregation: bool = opts.SECURE_AGGREGATION,
    batched_devices: bool = typer.Option(
        False,
        "--batched-devices",
        help="Train each round's selected devices together (one vectorised SGD loop, torch.func) instead of one "
        "per thread: the same updates to float32 rounding, meant for a GPU (--device cuda). Each device still "
        "signs and seals its own update. Refuses models with BatchNorm, dropout or buffers.",
    ),
    out: Path | None = typer.Option(
        None,
        help="Write history.json, history.csv, the global model (model.safetensors) after every round, "
        "config.toml (the effective options) at the start, and history.png at the end, here.",
    ),
    ledger: Path | None = typer.Option(
        None, help="Write the coordinator's provenance ledger export here (`qflare ledger verify` checks it)."
    ),
    json_: bool = typer.Option(
        False, "--json", help="Print the history as one JSON object at the end instead of a table."
    ),
    tensorboard: Path | None = typer.Option(
        None, help="Write TensorBoard event files (per-round scalars) here; needs pip install 'qflare[tracking]'."
    ),
    mlflow: str | None = typer.Option(
        None, help="Log the run to this MLflow tracking URI (file:DIR or http://host:5000); needs mlflow."
    ),
) -> None:
    """Run federated training of N devices in this process, through the real secure protocol."""
    # From the start: a Ctrl-C while the data set loads or devices enroll also stops cleanly.
    with friendly_errors(), graceful_interrupt("the current step") as stop:
        rounds_of = min(10, devices) if per_round is None else per_round

        def build() -> FederationSpec:
            opts.check_per_round(rounds_of, devices)
            spec = FederationSpec(
                dataset=dataset,
                data_root=opts.path_text(data_root),
                model=model,
                devices=devices,
                per_round=rounds_of,
                rounds=rounds,
                partition=partition,
                alpha=alpha,
                shards_per_device=shards_per_device,
                seed=seed,
                strategy=strategy,
                selector=selector,
                strategy_args=opts.strategy_args(
                    strategy,
                    server_lr,
                    noise_multiplier=noise_multiplier,
                    dp_epsilon=dp_epsilon,
                    dp_delta=dp_delta,
                    dp_clip=dp_clip,
                    dp_quantile=dp_quantile,
                ),
                aggregator=aggregator,
                byzantine=byzantine,
                train=opts.train_config(
                    epochs=epochs,
                    batch_size=batch_size,
                    lr=lr,
                    momentum=momentum,
                    weight_decay=weight_decay,
                    prox_mu=prox_mu,
                    max_grad_norm=max_grad_norm,
                    device=device,
                ),
                suite=suite_by_name(suite),
                secure_aggregation=secure_aggregation,
            )
            opts.check_strategy(spec)
            return spec

        spec = opts.with_precision(federation_spec(ctx, federation, WORKLOAD_OPTIONS, build), precision)
        chosen = resolve_precision(spec.train.precision, resolve_device(spec.train.device))
        if chosen.warning is not None:
            err_console.print(f"[yellow]warning[/] {chosen.warning}", highlight=False)
        threat = None
        if attack is not None:
            threat = AttackConfig(attack, malicious=0.2 if malicious is None else malicious, seed=spec.seed)
        elif malicious is not None:
            raise ConfigError("--malicious needs --attack", code="bad_attack")
        if threat is not None:
            threat.attackers(spec.devices)  # a share that makes no attacker (or no honest device) is refused now
        out_dir = writable_dir(out, "--out") if out is not None else None
        if out_dir is not None:
            resolved = {} if federation is not None else {"per_round": spec.per_round}
            config_path = runconfig.write_effective(ctx, out_dir / "config.toml", resolved)
        # imported here: the simulation loads the coordinator's storage, which `qflare client` never needs
        from ..simulation import FederationFactory, SimulationConfig, run_simulation
        from ..tracking import open_trackers

        opts.check_backend(backend, ray_address, batched_devices=batched_devices, protocol=protocol)
        backend_factory: FederationFactory | None = None
        if backend == "ray":
            from ..simulation_ray import RayOptions, ray_federation

            backend_factory = ray_federation(RayOptions(address=ray_address, hosts=workers))

        cfg = SimulationConfig(
            spec,
            workers=workers,
            protocol=protocol,
            ledger_out=ledger,
            batched_devices=batched_devices,
            attack=threat,
        )
        trackers = open_trackers(
            tensorboard=tensorboard,
            mlflow=mlflow,
            run_name=f"simulate-{spec.dataset}-{spec.strategy}-seed{spec.seed}",
            params={
                "workers": workers,
                "backend": backend,
                "protocol": protocol,
                "batched_devices": batched_devices,
                **spec.to_json(),
            },
            on_error=lambda m: err_console.print(f"[yellow]tracking[/] {m}", markup=True),
        )
        table = Table(
            title=f"qflare simulate · {spec.dataset} · {spec.devices} devices · {spec.per_round}/round · "
            f"{spec.strategy}"
            + ("" if spec.aggregator == "none" else f" · {spec.aggregator}")
            + f" · {chosen.describe()}"
        )
        for col in ("round", "accuracy", "loss", "train loss", "examples", "seconds"):
            table.add_column(col, justify="right")
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            console=console,
            disable=json_,
            transient=True,
        )
        try:
            with progress:
                overall = progress.add_task("enrolling devices", total=spec.rounds, last="")
                # within the round: devices done training, updates the coordinator received, and the
                # evaluation of the previous round's model (which overlaps this round's training)
                stages = {
                    stage: progress.add_task(label, total=None, last="", visible=False)
                    for stage, label in (("train", "trained"), ("submit", "updates"), ("eval", "evaluating"))
                }

                def on_start(n: int) -> None:
                    progress.update(overall, description=f"rounds ({n} devices enrolled)")

                def on_progress(p: RoundProgress) -> None:
                    if p.stage == "aggregated":
                        progress.update(overall, advance=1, last=f"round {p.round} aggregated")
                        return
                    task = stages[p.stage]
                    label = {"train": "trained", "submit": "updates", "eval": "evaluating"}[p.stage]
                    progress.update(
                        task,
                        description=f"  round {p.round}: {label}",
                        completed=p.done,
                        total=p.total,
                        visible=True,
                    )

                def on_round(r: RoundRecord) -> None:
                    table.add_row(
                        str(r.round),
                        f"{r.accuracy:.4f}",
                        f"{r.loss:.4f}",
                        f"{r.train_loss:.4f}",
                        str(r.examples),
                        f"{r.seconds:.2f}",
                    )
                    progress.update(overall, last=f"round {r.round}: accuracy {r.accuracy:.4f}")
                    if trackers:
                        trackers.log(
                            r.round,
                            {
                                "accuracy": r.accuracy,
                                "loss": r.loss,
                                "train_loss": r.train_loss,
                                "participants": r.updates,
                                "examples": r.examples,
                                "round_seconds": r.seconds,
                            },
                        )
                    if trackers and r.epsilon is not None and r.epsilon_unsampled is not None:
                        trackers.log(r.round, {"epsilon": r.epsilon, "epsilon_unsampled": r.epsilon_unsampled})
                    if not json_:
                        failed = "" if r.published else "  [red]failed: the model stayed as it was[/]"
                        spent = "" if r.epsilon is None else f"  epsilon {r.epsilon:.3f} (delta {r.delta:g})"
                        progress.console.print(
                            f"round {r.round:3d}  accuracy {r.accuracy:.4f}  loss {r.loss:.4f}  {r.seconds:.2f}s"
                            f"{spent}{failed}"
                        )

                def on_checkpoint(partial: SimulationResult) -> None:
                    if out_dir is not None:
                        try:
                            partial.write(out_dir, plot=False)  # the plot once, at the end
                        except OSError as exc:
                            raise ConfigError(f"--out {out_dir}: {exc.strerror or exc}", code="bad_path") from None

                result = run_simulation(
                    cfg,
                    on_round=on_round,
                    on_start=on_start,
                    on_progress=on_progress,
                    stop=stop,
                    on_checkpoint=on_checkpoint,
                    federation=backend_factory,
                )
        finally:
            trackers.close()
        if out_dir is not None:
            paths = [*result.write(out_dir), config_path]  # also when no round finished: the history says so
        if result.interrupted:
            where = f"; written to {out_dir}" if out_dir is not None else ""
            err_console.print(
                f"[yellow]stopped[/] after {len(result.rounds)} finished round(s){where}", highlight=False
            )
            if json_:
                print(json.dumps(result.to_json()))
            exit_interrupted()  # everything is written: no teardown for a late Ctrl-C to turn into an abort
        if result.stop_reason is not None:  # a planned end (the privacy budget): exit status 0
            err_console.print(f"[yellow]stopped before round {len(result.rounds) + 1}[/]: {result.stop_reason}")
        if json_:
            print(json.dumps(result.to_json()))
        else:
            console.print(table)
            console.print(
                f"wall {result.wall_s:.1f} s (start-up {result.startup_s:.1f} s); final accuracy {result.rounds[-1].accuracy:.4f}"
            )
            if threat is not None and result.defence is not None:
                d = result.defence.summary()
                extra = result.defence.extra.get("backdoor_success")
                console.print(
                    f"attack {threat.name}: {len(result.defence.attackers)} attacker(s); flagged attackers "
                    f"{d['true_positives']}, flagged honest {d['false_positives']}, missed {d['false_negatives']}"
                    + (f"; backdoor success {extra:.4f}" if extra is not None else ""),
                    highlight=False,
                )
        if out_dir is not None and not json_:
            console.print("wrote " + ", ".join(str(p) for p in paths))
        if ledger is not None and not json_:
            console.print(f"wrote the provenance ledger to {ledger} (check it: qflare ledger verify {ledger})")
        if not any(r.published for r in result.rounds):
            fail(
                f"every one of the {len(result.rounds)} rounds failed: no model was published, the final model "
                "is the initial one (the reason is logged above)",
                ErrorCode.ALL_ROUNDS_FAILED,
                exit_code=1,
            )


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
