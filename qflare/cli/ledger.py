"""``qflare ledger``: export the provenance ledger of a server's data dir, verify an export offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from ..config import default_data_dir
from ..errors import ConfigError
from .common import console, err_console, friendly_errors

if TYPE_CHECKING:
    from ..crypto.identity import VerifyKey

app = typer.Typer(
    help="The provenance ledger: one signed, hash-chained entry per closed or failed round (docs/provenance.md).",
    no_args_is_help=True,
)

_KEY_ID = re.compile(r"[0-9a-fA-F]{64}\Z")


def _coordinator_key(data_dir: Path) -> VerifyKey:
    """The coordinator's public key from ``coordinator.pub`` (what ``qflare server`` writes)."""
    from ..crypto.identity import VerifyKey
    from ..crypto.suite import SIG_ALGORITHMS
    from ..server.credentials import PUB_FILE

    path = data_dir.expanduser() / PUB_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
        raw = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read the coordinator public key {path}: {exc}", code="config_error") from None
    for spec in SIG_ALGORITHMS.values():
        if spec.public_len == len(raw):
            return VerifyKey.from_bytes(spec.name, raw)
    raise ConfigError(f"{path} does not hold an ML-DSA public key", code="config_error")


@app.command("export")
def export(
    data_dir: Path = typer.Option(
        default_data_dir(), help="The server's data directory (database and coordinator.pub)."
    ),
    out: Path = typer.Option(..., "--out", help="The JSON Lines file to write (replaced atomically)."),
    envelopes: bool = typer.Option(
        True, "--envelopes/--no-envelopes", help="Include each update's signed envelope (device signatures)."
    ),
) -> None:
    """Write the ledger as JSON Lines: a header (coordinator and device public keys), then one entry per line."""
    from ..protocol.provenance import export_ledger
    from ..server.rotation import load_chain
    from ..storage import Database, Store

    with friendly_errors():
        key = _coordinator_key(data_dir)
        chain = load_chain(data_dir.expanduser())
        if chain.current is not None and chain.current != key:
            raise ConfigError(
                "coordinator.pub is not the key the rotation log ends at: finish the rotation (start the server "
                "once) before exporting",
                code="rotation_incomplete",
            )
        db = Database.from_env(data_dir)
        try:
            db.upgrade()
            summary = export_ledger(Store(db), key, out, envelopes=envelopes, former_keys=chain.keys[:-1])
        finally:
            db.dispose()
    console.print(
        f"exported {summary.entries} entries ({summary.rounds} rounds) to {escape(str(out))}; "
        f"coordinator key id {summary.key_id}"
        + (f" (then {summary.keys - 1} rotation(s), recorded in the ledger)" if summary.keys > 1 else ""),
        soft_wrap=True,
    )


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="An export written by `qflare ledger export`."),
    model: Path | None = typer.Option(None, help="A model file (safetensors): check that an entry names it."),
    pin: str | None = typer.Option(None, help="The coordinator key id to trust (64 hex); without it, the file's key."),
    envelopes: bool = typer.Option(True, "--envelopes/--no-envelopes", help="Check the devices' signatures."),
    workers: int | None = typer.Option(None, min=1, help="Processes for the per-entry checks (default: CPUs, max 8)."),
    json_: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Check an export offline: chain, coordinator signatures, Merkle roots, device signatures, a model file.

    Exit status 0: it verifies; 1: it does not (the first bad entry is named); 2: bad arguments."""
    from ..ledger import LedgerVerifyError, verify_export

    with friendly_errors():
        if pin is not None and not _KEY_ID.match(pin):
            raise ConfigError("--pin takes a key id: 64 hex characters (SHA-256 of the public key)")
    try:
        report = verify_export(file, pin=pin, model=model, check_envelopes=envelopes, workers=workers)
    except LedgerVerifyError as exc:
        err_console.print(f"[bold red]invalid[/] {escape(f'[{exc.code}]')} {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if json_:
        print(
            json.dumps(
                {
                    "ok": True,
                    "entries": report.entries,
                    "rounds": report.rounds,
                    "head": report.head,
                    "coordinator_key_id": report.coordinator_key_id,
                    "pinned": report.pinned,
                    "key_chain": list(report.key_chain),
                    "revoked": list(report.revoked),
                    "device_signatures": report.device_signatures,
                    "missing_envelopes": report.missing_envelopes,
                    "model": None if report.model is None else report.model.__dict__,
                }
            )
        )
        return
    trust = "pinned" if report.pinned else "NOT pinned: trusting the key in the file (use --pin KEY_ID)"
    console.print(
        f"ok: {report.entries} entries ({report.rounds} rounds), chain intact, every signature verifies under "
        f"coordinator key {report.coordinator_key_id} ({trust})",
        soft_wrap=True,
    )
    if len(report.key_chain) > 1:
        revoked = f"; revoked: {', '.join(report.revoked)}" if report.revoked else ""
        console.print(
            f"key rotations: {' -> '.join(report.key_chain)} (each signed by the old and the new key){revoked}",
            soft_wrap=True,
        )
    console.print(
        f"device signatures: {report.device_signatures} verified, {report.missing_envelopes} update(s) without "
        "an envelope in the export (not checked)"
    )
    if report.model is not None:
        m = report.model
        role = f"model version {m.model_version} published by" if m.role == "published" else "the parent model of"
        console.print(f"model {escape(str(model))}: sha256 {m.sha256} is {role} entry {m.seq} (round {m.round_number})")
