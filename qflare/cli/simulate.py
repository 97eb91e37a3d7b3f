"""``qflare simulate``: a federation of N devices in this process, over the real protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..data import DATASETS, PARTITIONERS
from ..errors import ConfigError
from ..federation import FederationSpec, suite_by_name
from ..models import model_names
from ..protocol.selection import SELECTORS
from ..strategy import STRATEGIES
from ..training import TrainConfig
from .common import FEDERATION_HELP, console, err_console, federation_spec, friendly_errors, writable_dir
from .interrupt import exit_interrupted, graceful_interrupt

if TYPE_CHECKING:
    from ..simulation import RoundRecord, SimulationResult

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
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "prox_mu",
    "max_grad_norm",
    "device",
    "suite",
)


def simulate(
    ctx: typer.Context,
    federation: Path | None = typer.Option(None, help=FEDERATION_HELP),
    dataset: str = typer.Option("fashion-mnist", help=f"Data set: {', '.join(DATASETS)}."),
    data_root: Path | None = typer.Option(
        None, help="Folder holding the data set files (default: search the usual places)."
    ),
    model: str = typer.Option("fedavg-cnn", help=f"Registered model: {', '.join(model_names())}."),
    devices: int = typer.Option(100, min=1, help="Devices in the federation (each enrolls and opens a PQ session)."),
    per_round: int = typer.Option(10, min=1, help="Devices sampled (without replacement) each round."),
    rounds: int = typer.Option(30, min=1, help="Federated rounds."),
    partition: str = typer.Option("dirichlet", help=f"Partitioner: {', '.join(PARTITIONERS)}."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller: more label skew)."),
    shards_per_device: int = typer.Option(2, help="Shards per device for --partition shards."),
    seed: int = typer.Option(
        0, help="Seed of partition, sampling, initialisation and shuffles: same seed, same numbers."
    ),
    strategy: str = typer.Option("fedavg", help=f"Aggregation strategy: {', '.join(STRATEGIES)}."),
    selector: str = typer.Option("random", help=f"Client selection: {', '.join(SELECTORS)}."),
    server_lr: float | None = typer.Option(None, help="Server learning rate (fedavgm/fedadam/fedyogi/fedadagrad)."),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round."),
    batch_size: int = typer.Option(32, min=1, help="Local mini-batch size."),
    lr: float = typer.Option(0.05, help="Local SGD learning rate."),
    momentum: float = typer.Option(0.0, help="Local SGD momentum."),
    weight_decay: float = typer.Option(0.0, help="Local SGD weight decay."),
    prox_mu: float = typer.Option(0.0, help="FedProx proximal term mu (0 = off)."),
    max_grad_norm: float | None = typer.Option(None, help="Clip each local gradient to this L2 norm."),
    device: str = typer.Option("cpu", help="Torch device for training: cpu, cuda, cuda:N or auto."),
    workers: int = typer.Option(
        0, min=0, help="Training threads (0 = one per core; 1 = sequential with torch's default threads)."
    ),
    suite: str = typer.Option(
        "default",
        help="Crypto suite: default (ML-DSA-65 + ML-KEM-768 + X25519) or high (ML-DSA-87 + ML-KEM-1024 + X25519).",
    ),
    protocol: bool = typer.Option(
        True,
        help="Run the secure protocol (PQ sessions, signatures, database). --no-protocol aggregates training results directly: only to measure the protocol's cost.",
    ),
    out: Path | None = typer.Option(
        None,
        help="Write history.json, history.csv and the global model (model.safetensors) here after every round, and history.png at the end.",
    ),
    json_: bool = typer.Option(
        False, "--json", help="Print the history as one JSON object at the end instead of a table."
    ),
) -> None:
    """Run federated training of N devices in this process, through the real secure protocol."""
    # From the start: a Ctrl-C while the data set loads or devices enroll also stops cleanly.
    with friendly_errors(), graceful_interrupt("the current step") as stop:

        def build() -> FederationSpec:
            return FederationSpec(
                dataset=dataset,
                data_root=str(data_root) if data_root else None,
                model=model,
                devices=devices,
                per_round=per_round,
                rounds=rounds,
                partition=partition,
                alpha=alpha,
                shards_per_device=shards_per_device,
                seed=seed,
                strategy=strategy,
                selector=selector,
                strategy_args={"server_lr": server_lr} if server_lr is not None else {},
                train=TrainConfig(
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
            )

        spec = federation_spec(ctx, federation, WORKLOAD_OPTIONS, build)
        out_dir = writable_dir(out, "--out") if out is not None else None
        # imported here: the simulation loads the coordinator's storage, which `qflare client` never needs
        from ..simulation import SimulationConfig, run_simulation

        cfg = SimulationConfig(spec, workers=workers, protocol=protocol)
        table = Table(
            title=f"qflare simulate · {spec.dataset} · {spec.devices} devices · {spec.per_round}/round · {spec.strategy}"
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
        with progress:
            task = progress.add_task("enrolling devices", total=spec.rounds, last="")

            def on_start(n: int) -> None:
                progress.update(task, description=f"training ({n} devices enrolled)")

            def on_round(r: RoundRecord) -> None:
                table.add_row(
                    str(r.round),
                    f"{r.accuracy:.4f}",
                    f"{r.loss:.4f}",
                    f"{r.train_loss:.4f}",
                    str(r.examples),
                    f"{r.seconds:.2f}",
                )
                progress.update(task, advance=1, last=f"round {r.round}: accuracy {r.accuracy:.4f}")
                if not json_:
                    progress.console.print(
                        f"round {r.round:3d}  accuracy {r.accuracy:.4f}  loss {r.loss:.4f}  {r.seconds:.2f}s"
                    )

            def on_checkpoint(partial: SimulationResult) -> None:
                if out_dir is not None:
                    try:
                        partial.write(out_dir, plot=False)  # the plot once, at the end
                    except OSError as exc:
                        raise ConfigError(f"--out {out_dir}: {exc.strerror or exc}", code="bad_path") from None

            result = run_simulation(cfg, on_round=on_round, on_start=on_start, stop=stop, on_checkpoint=on_checkpoint)
        if out_dir is not None:
            paths = result.write(out_dir)  # also when no round finished: the history says so
        if result.interrupted:
            where = f"; written to {out_dir}" if out_dir is not None else ""
            err_console.print(
                f"[yellow]stopped[/] after {len(result.rounds)} finished round(s){where}", highlight=False
            )
            if json_:
                print(json.dumps(result.to_json()))
            exit_interrupted()  # everything is written: no teardown for a late Ctrl-C to turn into an abort
        if json_:
            print(json.dumps(result.to_json()))
        else:
            console.print(table)
            console.print(
                f"wall {result.wall_s:.1f} s (start-up {result.startup_s:.1f} s); final accuracy {result.rounds[-1].accuracy:.4f}"
            )
        if out_dir is not None and not json_:
            console.print("wrote " + ", ".join(str(p) for p in paths))


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
