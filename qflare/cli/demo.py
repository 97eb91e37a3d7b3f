"""``qflare demo``: coordinator + N device processes on this machine, federated training over HTTP."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import options as opts
from . import runconfig
from .common import console, err_console, friendly_errors, writable_dir
from .interrupt import EXIT_INTERRUPTED, graceful_interrupt

__all__ = ["demo", "register"]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def demo(
    ctx: typer.Context,
    run_config: Path | None = runconfig.config_option(),
    devices: int = typer.Option(10, min=1, help="Device processes to start (each enrolls with its own token)."),
    per_round: int | None = typer.Option(
        None, min=1, help="Devices selected each round, at most --devices (default: 5 or fewer)."
    ),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    port: int | None = typer.Option(None, min=0, max=65535, help="Coordinator port (default: a free one)."),
    data_dir: Path | None = typer.Option(
        None,
        help="Coordinator database, keys, device states, logs and config.toml (the effective options); "
        "default: a new temp dir.",
    ),
    dataset: str = opts.DATASET,
    model: str = opts.MODEL,
    seed: int = typer.Option(0, min=0, help="Seed of partition, selection, initialisation and shuffles."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration of the non-IID split."),
    data_root: Path | None = opts.DATA_ROOT,
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
    epochs: int = opts.EPOCHS,
    batch_size: int = opts.BATCH_SIZE,
    lr: float = opts.LR,
    momentum: float = opts.MOMENTUM,
    weight_decay: float = opts.WEIGHT_DECAY,
    prox_mu: float = opts.PROX_MU,
    max_grad_norm: float | None = opts.MAX_GRAD_NORM,
    precision: str | None = opts.PRECISION,
    secure_aggregation: bool = opts.SECURE_AGGREGATION,
    out: Path | None = typer.Option(
        None,
        help="Write history.json and history.csv here as rounds finish, and history.png and the final global "
        "model (model.safetensors, signature-checked) at the end.",
    ),
) -> None:
    """Start a coordinator and N devices here and train federated over HTTP, every security feature on."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    # imported here: the demo launches the coordinator (qflare.server), which `qflare client` never loads
    from ..demo import DEMO_FEDERATION, DemoConfig, run_demo
    from ..history import write_history
    from ..precision import resolve_precision
    from ..training import resolve_device

    with friendly_errors():
        per_round = min(5, devices) if per_round is None else per_round
        opts.check_per_round(per_round, devices)
        spec = DEMO_FEDERATION.replace(
            devices=devices,
            per_round=per_round,
            rounds=rounds,
            dataset=dataset,
            model=model,
            seed=seed,
            alpha=alpha,
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
                device=DEMO_FEDERATION.train.device,
                precision=precision,
            ),
            data_root=opts.path_text(data_root),
            secure_aggregation=secure_aggregation,
        )
        opts.check_strategy(spec, root_data=False)
        chosen = resolve_precision(spec.train.precision, resolve_device(spec.train.device))
        if chosen.warning is not None:
            err_console.print(f"[yellow]warning[/] {chosen.warning}", highlight=False)
        out_dir = writable_dir(out, "--out") if out is not None else None
        data_dir = (
            writable_dir(data_dir, "--data-dir")
            if data_dir is not None
            else Path(tempfile.mkdtemp(prefix="qflare-demo-"))
        ).resolve()
        cfg = DemoConfig(spec, port=port, data_dir=data_dir)
        effective = runconfig.write_effective(ctx, data_dir / "config.toml", {"per_round": per_round})
    history: list[dict[str, Any]] = []

    def save(interrupted: bool, plot: bool = True) -> list[Path]:
        if out_dir is None:
            return []
        config = {**spec.to_json(), "precision": chosen.name, "precision_detail": chosen.describe()}
        doc = {"config": config, "rounds": history, "interrupted": interrupted}
        title = f"QFLARE demo · {spec.dataset} · {spec.strategy} · {devices} devices, {per_round}/round"
        return write_history(out_dir, doc, history, title, plot=plot)

    console.print(
        f"[bold]qflare demo[/] · {dataset} · {model} · {devices} devices · {per_round}/round · {rounds} rounds · "
        f"{strategy} · {chosen.describe()} · ML-DSA-65 + ML-KEM-768/X25519 + AES-256-GCM"
    )
    console.print(f"effective configuration: {effective}")
    # auto_refresh=False: no display thread, so the children can be forked safely.
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        auto_refresh=False,
        transient=True,
    )
    shown: set[int] = set()
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("starting", total=rounds, detail="")

        def on_message(msg: str) -> None:
            progress.console.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {msg}")
            progress.refresh()

        def on_status(status: dict[str, Any]) -> None:
            for h in status.get("history") or []:
                r = int(h.get("round", 0))
                if r >= 1 and r not in shown:
                    shown.add(r)
                    history.append(dict(h))
                    with friendly_errors():
                        save(False, plot=False)
                    progress.console.print(
                        f"[dim]{time.perf_counter() - t0:6.1f}s[/] round {r:3d}  accuracy "
                        f"[bold]{float(h['accuracy']):.4f}[/]  loss {float(h['loss']):.4f}"
                    )
            state, rnd = status.get("state"), status.get("round")
            detail = f"{status.get('devices', '?')} devices enrolled"
            if state == "open":
                detail = f"round {rnd}: {status.get('accepted', 0)}/{status.get('selected', '?')} updates"
            progress.update(task, description=f"training ({state})", completed=len(shown), detail=detail)
            progress.refresh()

        try:
            with friendly_errors():
                result = run_demo(cfg, on_message=on_message, on_status=on_status)
        except KeyboardInterrupt:
            progress.stop()
            console.print("[yellow]interrupted[/]: every coordinator and device process has been stopped")
            with graceful_interrupt("writing the results") as stop:
                stop.set()  # a further Ctrl-C exits at once
                with friendly_errors():
                    save(True)
                    _write_model(out_dir, cfg.data_dir, interrupted=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    with friendly_errors():
        written = [*save(False), *_write_model(out_dir, result.data_dir, interrupted=False)]
    if written:
        console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    console.print(
        f"final accuracy [bold green]{result.final_accuracy:.4f}[/] after {rounds} rounds in {result.wall_s:.1f} s"
    )
    console.print(f"data, database and logs: {result.data_dir}")


def _write_model(out_dir: Path | None, data_dir: Path | None, *, interrupted: bool) -> list[Path]:
    """The coordinator's latest published model, signature-checked, as ``out_dir/model.safetensors``."""
    if out_dir is None or data_dir is None:
        return []
    from ..model_file import MODEL_FILE_NAME
    from ..published import export_version, list_versions

    trained = [v for v in list_versions(data_dir) if v.round_number is not None]
    if not trained:  # stopped before the first round finished: no trained model to keep
        err_console.print("no round finished: no model written")
        return []
    done = export_version(data_dir, trained[-1].version, out_dir / MODEL_FILE_NAME)
    if interrupted:
        err_console.print(f"kept the latest model: version {done.version} (round {done.round}) in {done.path}")
    return [done.path]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
