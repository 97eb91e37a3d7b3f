"""``qflare models``: the coordinator's published model versions - list them, write one out as a model file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..config import default_data_dir
from ..errors import ConfigError
from ..protocol.records import ModelRow
from .common import console, friendly_errors, writable_file

__all__ = ["COLUMNS", "app"]

app = typer.Typer(
    help="The coordinator's published model versions: list them, export one (signature-checked).",
    no_args_is_help=True,
)
DATA_DIR_HELP = "The coordinator's data directory (database, blobs, coordinator.pub, model.json)."


def _number(value: Any, fmt: str) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return format(value, fmt) if ok else None


def _metrics(row: ModelRow) -> str:
    ev = row.metrics.get("eval")
    ev = ev if isinstance(ev, dict) else {}
    parts = [
        ("acc", _number(ev.get("accuracy"), ".4f")),
        ("loss", _number(ev.get("loss"), ".3f")),
        ("train", _number(row.metrics.get("train_loss"), ".3f")),
        ("upd", _number(row.metrics.get("updates"), "d")),
    ]
    return " ".join(f"{name} {value}" for name, value in parts if value is not None)


COLUMNS: list[tuple[str, Callable[[ModelRow], str]]] = [
    ("version", lambda r: str(r.version)),
    ("round", lambda r: "init" if r.round_number is None else str(r.round_number)),
    ("hash", lambda r: r.model_hash[:10]),
    ("parent", lambda r: (r.parent_hash or "-")[:10]),
    ("created (UTC)", lambda r: r.created_at.strftime("%m-%d %H:%M")),
    ("metrics", _metrics),
]
"""The table of ``qflare models list``: (header, cell of a version).  Append to add a column."""


def _row_json(row: ModelRow) -> dict[str, Any]:
    return {
        "version": row.version,
        "round": row.round_number,
        "model_sha256": row.model_hash,
        "parent_sha256": row.parent_hash,
        "created": row.created_at.isoformat(),
        "metrics": {k: v for k, v in row.metrics.items() if k != "server_state"},
    }


@app.command("list")
def list_versions(
    data_dir: Path = typer.Option(default_data_dir(), help=DATA_DIR_HELP),
    json_: bool = typer.Option(False, "--json", help="Print one JSON list instead of a table."),
) -> None:
    """List every published model version: version, round, hash, parent hash, created, metrics, and the
    round's provenance ledger entry (sequence number and hash; `qflare ledger export` writes the ledger)."""
    from ..published import ledger_entries_by_round
    from ..published import list_versions as versions_in

    with friendly_errors():
        rows = versions_in(data_dir)
        entries = ledger_entries_by_round(data_dir)

    def entry_of(row: ModelRow) -> tuple[int, str] | None:
        return None if row.round_number is None else entries.get(row.round_number)

    if json_:
        docs = []
        for r in rows:
            entry = entry_of(r)
            docs.append({**_row_json(r), "ledger_seq": entry and entry[0], "ledger_entry_sha256": entry and entry[1]})
        print(json.dumps(docs))
        return
    table = Table(title=f"model versions in {data_dir} (`--json` for full hashes and metrics)")
    for header, _ in COLUMNS:
        table.add_column(
            header, justify="right" if header in ("version", "round") else "left", no_wrap=header != "metrics"
        )
    table.add_column("ledger entry", no_wrap=True)  # the round's signed provenance entry: seq and hash
    for row in rows:
        entry = entry_of(row)
        table.add_row(*(cell(row) for _, cell in COLUMNS), "-" if entry is None else f"#{entry[0]} {entry[1][:10]}")
    console.print(table)
    if not rows:
        console.print("no model version has been published yet")


def _parse_version(text: str) -> int | None:
    if text.strip().lower() == "latest":
        return None
    if not text.strip().isdigit() or len(text.strip()) > 12:
        raise ConfigError(f"VERSION must be a version number or 'latest', got {text!r}")
    return int(text.strip())


@app.command("export")
def export(
    version: str = typer.Argument(..., help="The version to write out (see `qflare models list`), or 'latest'."),
    out: Path = typer.Option(..., "--out", help="The model file to write (safetensors + metadata)."),
    data_dir: Path = typer.Option(default_data_dir(), help=DATA_DIR_HELP),
    key_id: str | None = typer.Option(
        None, help="Require the coordinator key in the data directory to have this key id (hex)."
    ),
) -> None:
    """Write one model version out, after verifying the coordinator's signature and the model's hash.

    Load it back with ``qflare.load_model(FILE)`` (an nn.Module)."""
    from ..published import export_version

    with friendly_errors():
        number = _parse_version(version)
        target = writable_file(out, "--out")
        done = export_version(data_dir, number, target, key_id=key_id)
    round_text = "initial model" if done.round is None else f"round {done.round}"
    console.print(
        f"wrote version {done.version} ({round_text}, sha256 {done.sha256[:16]}..., signed by key "
        f"{done.key_id[:16]}...) to {done.path}",
        highlight=False,
    )
