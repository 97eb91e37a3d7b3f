"""The ``qflare`` command line (typer + rich)."""

from __future__ import annotations

import typer

from . import bench, data, simulate
from . import client as client_cli
from . import demo as demo_cli
from . import server as server_cli

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
client_cli.register(app)
demo_cli.register(app)
server_cli.register(app)

__all__ = ["app"]
