"""``--config run.toml``: a command's options from a TOML file, and the effective configuration written back.

The file holds one key per option, spelled as on the command line without the dashes in front
(``per-round = 5``, ``server-lr = 0.5``, ``protocol = false``); a key may also sit in a table named after
the command (``[simulate]``), so one file can serve ``simulate``, ``server`` and ``demo``.  Options given
on the command line override the file (click's parameter source tells which were given).  An unknown key
or a value of the wrong type is refused with one line naming the key; values are then checked like the
command line's (ranges, registry names).  :func:`write_effective` writes every option's value as a file
that ``--config`` reads back, which reproduces the run.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError
from .common import fail

__all__ = ["CONFIG_HELP", "SECTIONS", "config_option", "write_effective"]

CONFIG_HELP = "A TOML file of options (keys as the flags: per-round = 5); flags given here override it."
SECTIONS = ("simulate", "server", "demo")
"""The commands that take ``--config``; each may have its own table, the others' are skipped."""
_SKIP = frozenset({"--config", "--help"})
"""Options that are never read from, nor written to, a configuration file."""


def _key(param: Any) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-")


def _options(ctx: typer.Context) -> dict[str, Any]:
    """The command's options by file key."""
    return {_key(p): p for p in ctx.command.params if p.opts and not _SKIP & set(p.opts)}


def _base_type(param: Any) -> Any:
    """The option's Python type (``int`` for ``int | None``), from typer's annotation of it."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _check_type(path: Path, key: str, param: Any, value: Any) -> Any:
    kind = _base_type(param)
    if kind is bool or getattr(param, "is_flag", False):
        ok, want = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:  # str, Path
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"{path}: key {key!r} must be {want}, got {value!r}", code="config_error")
    return value


def _read(path: Path, command: str) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}", code="config_error") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}", code="config_error") from None
    section = doc.pop(command, None)
    flat = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tables = sorted(k for k, v in doc.items() if isinstance(v, dict) and k not in SECTIONS)
    if tables:
        raise ConfigError(
            f"{path}: unknown table [{tables[0]}]; tables: {', '.join(f'[{s}]' for s in SECTIONS)}",
            code="config_error",
        )
    if section is not None:
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: key {command!r} must be a table of options", code="config_error")
        flat.update(section)
    return flat


def _load(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager callback of ``--config``: the file's values become the defaults of the other options."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        values = _read(value, ctx.info_name or "")
        options = _options(ctx)
        defaults: dict[str, Any] = {}
        for key, item in values.items():
            param_ = options.get(key)
            if param_ is None:
                close = difflib.get_close_matches(key.replace("_", "-"), options, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{value}: unknown key {key!r}{hint}", code="config_error")
            defaults[param_.name] = _check_type(value, key, param_, item)
    except ConfigError as exc:
        fail(exc.message, exc.code)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option() -> Any:
    """The ``--config FILE`` option (eager: read before the options it sets)."""
    return typer.Option(None, "--config", is_eager=True, callback=_load, help=CONFIG_HELP)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return json.dumps(str(value))  # a JSON string (\", \\, \uXXXX escapes) is a TOML basic string


def write_effective(ctx: typer.Context, path: Path, resolved: Mapping[str, Any] | None = None) -> Path:
    """Write every option's effective value (``resolved`` replacing those computed after parsing) to the
    TOML file ``path``, in the ``--config`` format; options without a value (None) are left out."""
    values = {**ctx.params, **(resolved or {})}
    lines = [f"# qflare {ctx.info_name}: the effective configuration of this run (read back with --config)"]
    for key, param in _options(ctx).items():
        value = values.get(param.name)
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
