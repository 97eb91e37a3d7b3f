"""The ``qflare`` command line (typer + rich)."""

from __future__ import annotations

import typer

# isort: off
from . import _plugins  # noqa: F401  (first: plugin names must exist before the options are defined)

# isort: on
from ..plugins import load_plugins
from . import bench, data, ledger, models, ops, simulate
from . import client as client_cli
from . import demo as demo_cli
from . import server as server_cli
from .common import QflareGroup, console, friendly_errors

app = typer.Typer(
    name="qflare",
    cls=QflareGroup,
    help="QFLARE: federated learning with post-quantum security (ML-KEM, ML-DSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: fits 80 columns and never cuts an option name
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"qflare {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _startup(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="Print the version."),
) -> None:
    """Before any command: report a plugin (entry-point group qflare.plugins) that failed to load."""
    with friendly_errors():
        load_plugins()


simulate.register(app)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(ledger.app, name="ledger")
app.add_typer(models.app, name="models")
client_cli.register(app)
demo_cli.register(app)
server_cli.register(app)
ops.register(app)

__all__ = ["app"]
