"""Helpers shared by the CLI commands: error reporting and the console."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import QflareError

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
