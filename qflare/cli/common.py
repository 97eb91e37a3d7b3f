"""Helpers shared by the CLI commands: the one way errors are reported, and the console."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer._click import _textwrap
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer ships its own copy of click
from typer.core import TyperGroup

from ..errors import ConfigError, ErrorCode, QflareError
from ..federation import FederationSpec

__all__ = [
    "FEDERATION_HELP",
    "QflareGroup",
    "console",
    "err_console",
    "fail",
    "federation_spec",
    "friendly_errors",
    "report_error",
    "run_cli",
]


class _WholeWords(_textwrap.TextWrapper):
    """Help text wraps between words only, never inside a hyphenated name (``fashion-mnist``, ``--per-round``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "break_on_hyphens": False})


# click's help formatter builds its TextWrapper from this module at each call (typer's copy of click)
setattr(_textwrap, "TextWrapper", _WholeWords)  # noqa: B010

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def report_error(message: str, code: ErrorCode | str = ErrorCode.CONFIG_ERROR) -> None:
    """Print ``error [code] message`` on stderr: the one form every CLI error takes."""
    err_console.print(f"[bold red]error[/] {escape(f'[{code}]')} {escape(message)}", soft_wrap=True)


def fail(message: str, code: ErrorCode | str = ErrorCode.CONFIG_ERROR, exit_code: int = 2) -> NoReturn:
    """Report an error (:func:`report_error`) and exit with ``exit_code`` (no traceback)."""
    report_error(message, code)
    raise typer.Exit(exit_code)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn a QflareError into a one-line red message and exit status 2 (no traceback)."""
    try:
        yield
    except QflareError as exc:
        fail(str(exc), exc.code)


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


class QflareGroup(TyperGroup):
    """The ``qflare`` command group: usage errors (a bad option value, a missing argument) and
    configuration errors raised while options are parsed are reported like every other error, by
    :func:`report_error`, with the command's ``--help`` named; exit status 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except NoArgsIsHelpError as exc:  # a bare group: its help, as click shows it
            exc.show()
            raise SystemExit(exc.exit_code) from None
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            report_error(exc.format_message() + where)
            raise SystemExit(exc.exit_code) from None
        except QflareError as exc:
            report_error(str(exc), exc.code)
            raise SystemExit(2) from None
        except typer.Abort:
            report_error("aborted", ErrorCode.CONFIG_ERROR)
            raise SystemExit(1) from None
        raise SystemExit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


FEDERATION_HELP = "A federation spec file (JSON, as launchers write it): the workload, replacing its options."


def federation_spec(
    ctx: typer.Context, path: Path | None, workload_options: Iterable[str], build: Callable[[], FederationSpec]
) -> FederationSpec:
    """The spec in ``--federation`` ``path``, else ``build()`` from the command's workload options.

    Giving both (on the command line or in ``--config``) is refused: a workload option next to a spec
    file would be silently ignored otherwise."""
    if path is None:
        return build()
    given = [
        name
        for name in workload_options
        # by name: typer ships its own copy of click, whose ParameterSource is not click's
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"--federation {path} describes the workload: do not also pass {flags}", code="config_error")
    return FederationSpec.load(path)
