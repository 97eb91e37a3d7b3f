"""``qflare demo``: coordinator + N device processes on this machine, federated training over HTTP."""

from __future__ import annotations

import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import DATASETS
from ..models import model_names
from .common import console, err_console, friendly_errors, writable_dir
from .interrupt import EXIT_INTERRUPTED, graceful_interrupt

__all__ = ["demo", "register"]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def demo(
    devices: int = typer.Option(10, min=1, help="Device processes to start (each enrolls with its own token)."),
    per_round: int = typer.Option(5, min=1, help="Devices selected each round."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    port: int | None = typer.Option(None, help="Coordinator port (default: a free one)."),
    data_dir: Path | None = typer.Option(
        None, help="Coordinator database, keys, device states and logs (default: a new temp dir)."
    ),
    dataset: str = typer.Option("fashion-mnist", help=f"Data set: {', '.join(DATASETS)}."),
    model: str = typer.Option("fedavg-cnn", help=f"Model: {', '.join(model_names())}."),
    seed: int = typer.Option(0, help="Seed of partition, selection, initialisation and shuffles."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration of the non-IID split."),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round."),
    data_root: Path | None = typer.Option(None, help="Folder holding the data set files."),
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

    with friendly_errors():
        spec = DEMO_FEDERATION.replace(
            devices=devices,
            per_round=per_round,
            rounds=rounds,
            dataset=dataset,
            model=model,
            seed=seed,
            alpha=alpha,
            train=replace(DEMO_FEDERATION.train, epochs=epochs),
            data_root=str(data_root) if data_root else None,
        )
        out_dir = writable_dir(out, "--out") if out is not None else None
        data_dir = (
            writable_dir(data_dir, "--data-dir")
            if data_dir is not None
            else Path(tempfile.mkdtemp(prefix="qflare-demo-"))
        )
        cfg = DemoConfig(spec, port=port, data_dir=data_dir)
    history: list[dict[str, Any]] = []

    def save(interrupted: bool, plot: bool = True) -> list[Path]:
        if out_dir is None:
            return []
        doc = {"config": spec.to_json(), "rounds": history, "interrupted": interrupted}
        title = f"QFLARE demo · {spec.dataset} · {spec.strategy} · {devices} devices, {per_round}/round"
        return write_history(out_dir, doc, history, title, plot=plot)

    console.print(
        f"[bold]qflare demo[/] · {dataset} · {model} · {devices} devices · {per_round}/round · {rounds} rounds · "
        "ML-DSA-65 + ML-KEM-768/X25519 + AES-256-GCM"
    )
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
