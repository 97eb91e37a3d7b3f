"""``qflare data``: inspect partitions and fetch data sets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..data import (
    DATASETS,
    KNOWN_FILES,
    PARTITIONERS,
    default_cache_dir,
    download_dataset,
    label_counts,
    label_table,
    load_dataset,
    partition,
    save_heatmap,
    summary,
)
from .common import console, friendly_errors, writable_dir, writable_file

app = typer.Typer(help="Data sets and federated partitions.", no_args_is_help=True, rich_markup_mode=None)


@app.command("stats")
def stats(
    dataset: str = typer.Option("fashion-mnist", help=f"Data set: {', '.join(DATASETS)}."),
    devices: int = typer.Option(100, min=1, help="Number of devices to partition the training split over."),
    partition_: str = typer.Option("dirichlet", "--partition", help=f"Partitioner: {', '.join(PARTITIONERS)}."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (label skew; quantity skew for 'quantity')."),
    shards_per_device: int = typer.Option(2, help="Shards per device for the 'shards' partitioner."),
    seed: int = typer.Option(0, help="Partition seed: the same seed gives the same partition."),
    data_root: Path | None = typer.Option(
        None, help="Folder holding the data set files (default: search the usual places)."
    ),
    rows: int | None = typer.Option(20, help="Devices shown in the table (all with --rows 0)."),
    heatmap: Path | None = typer.Option(None, help="Also save a devices x classes heatmap PNG here."),
) -> None:
    """Print a per-device label table for a partition (and optionally save a heatmap)."""
    with friendly_errors():
        if heatmap is not None:
            writable_file(heatmap, "--heatmap")
        ds = load_dataset(dataset, "train", root=data_root)
        parts = partition(
            partition_, ds.labels.numpy(), devices, seed=seed, alpha=alpha, shards_per_device=shards_per_device
        )
        counts = label_counts(parts, ds.labels.numpy(), ds.num_classes)
        console.print(
            label_table(
                counts, max_rows=rows or None, title=f"{dataset} · {partition_} · {devices} devices · seed {seed}"
            )
        )
        console.print(summary(counts))
        if heatmap is not None:
            console.print(f"heatmap written to {save_heatmap(counts, heatmap)}")


@app.command("download")
def download(
    dataset: str = typer.Argument(..., help=f"The data set; one of: {', '.join(KNOWN_FILES)}."),
    dest: Path | None = typer.Option(None, help="Destination folder (default: the QFLARE data cache)."),
) -> None:
    """Download a data set from its mirrors, checking every file's SHA-256."""
    with friendly_errors():
        target = writable_dir(dest or default_cache_dir() / dataset, "--dest")
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        tasks: dict[str, TaskID] = {}

        def progress(name: str, received: int, expected: int | None) -> None:
            if name not in tasks or received == 0:  # a new file, or the next mirror starting over
                if name in tasks:
                    bar.remove_task(tasks[name])
                tasks[name] = bar.add_task(name, total=expected)
            bar.update(tasks[name], completed=received)

        with bar:
            path = download_dataset(dataset, target, progress=progress)
        console.print(f"{dataset} ready in {path}")
