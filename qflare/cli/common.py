"""Helpers shared by the CLI commands: error reporting and the console."""

from __future__ import annotations

import errno
import os
import tempfile
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


def _path_error(option: str, path: Path, exc: OSError | str) -> ConfigError:
    cause = exc if isinstance(exc, str) else (exc.strerror or type(exc).__name__)
    return ConfigError(f"{option} {path}: {cause}", code="bad_path")


def writable_dir(path: Path, option: str, *, mode: int = 0o777) -> Path:
    """``path`` as a folder this process can write files into, created if missing; checked before any work.

    Every failure (a parent that is a file, ``/proc``, a read-only file system, no permission) is a
    ConfigError ``bad_path`` naming ``option``, the path and the cause.  The check writes and removes a
    probe file: permission bits alone say nothing for root or for a read-only mount.  ``mode``: of the folder
    when it is created here (0o700 for folders that will hold keys)."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise _path_error(option, target, "exists and is not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True, mode=mode)
    except (FileExistsError, NotADirectoryError):  # a parent on the way is a file
        raise _path_error(option, target, "a parent folder is a file") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise _path_error(option, target, "a parent folder is a file") from None
        raise _path_error(option, target, f"cannot create it ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=target, prefix=".qflare-probe-"):
            pass
    except OSError as exc:
        raise _path_error(option, target, f"cannot write files there ({exc.strerror or exc})") from None
    return target


def writable_file(path: Path, option: str) -> Path:
    """``path`` as a file this process can create or replace (its folder is made and probed first)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise _path_error(option, target, "is a folder, not a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise _path_error(option, target, "exists and is not writable")
    try:
        writable_dir(target.parent, option)
    except ConfigError as exc:
        raise _path_error(option, target, f"its folder is unusable: {str(exc).split(': ', 1)[-1]}") from None
    return target


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
