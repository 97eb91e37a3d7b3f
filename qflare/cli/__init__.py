"""The ``qflare`` command line (typer + rich)."""

from __future__ import annotations

import typer

from . import bench, data, simulate

app = typer.Typer(
    name="qflare",
    help="QFLARE: federated learning with post-quantum security (ML-KEM, ML-DSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simulate.register(app)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")

__all__ = ["app"]
