"""Helpers shared by the CLI commands: error reporting and the console."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import ConfigError, QflareError
from ..federation import FederationSpec

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn a QflareError into a one-line red message and exit status 2 (no traceback)."""
    try:
        yield
    except QflareError as exc:
        err_console.print(f"[bold red]error[/] {escape(f'[{exc.code}]')} {escape(str(exc))}")
        raise typer.Exit(2) from None


def run_cli(fn: Callable[[], T]) -> T:
    with friendly_errors():
        return fn()


FEDERATION_HELP = "A federation spec file (JSON, as launchers write it): the workload, replacing its options."


def federation_spec(
    ctx: typer.Context, path: Path | None, workload_options: Iterable[str], build: Callable[[], FederationSpec]
) -> FederationSpec:
    """The spec in ``--federation`` ``path``, else ``build()`` from the command's workload options.

    Giving both is refused: a workload option next to a spec file would be silently ignored otherwise."""
    if path is None:
        return build()
    given = [
        name
        for name in workload_options
        # by name: typer ships its own copy of click, whose ParameterSource is not click's
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"--federation {path} describes the workload: do not also pass {flags}", code="config_error")
    return FederationSpec.load(path)
