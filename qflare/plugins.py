"""Plugins: code outside QFLARE that registers models, strategies, data sets and client selectors.

A plugin is an entry point in the group ``qflare.plugins`` (declared in the plugin's ``pyproject.toml``
under ``[project.entry-points."qflare.plugins"]``).  It names either a module, whose import registers
things, or a callable taking no arguments, which is called.  Every ``qflare`` command loads all plugins
once, when it starts, so ``qflare server``, ``qflare client``, ``qflare simulate`` and the processes
``qflare demo`` starts all know the same names.  A library caller (``run_simulation``) calls
:func:`load_plugins` itself, or registers directly.

For code that is not packaged, ``QFLARE_PLUGINS`` lists entry-point values separated by commas
(``my_module`` or ``my_module:register``); they load after the packaged plugins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

from .errors import PluginError

__all__ = ["ENTRY_POINT_GROUP", "PLUGINS_ENV", "PluginError", "load_plugins"]

ENTRY_POINT_GROUP = "qflare.plugins"
PLUGINS_ENV = "QFLARE_PLUGINS"


_loaded: set[tuple[str, str]] = set()
_failed: dict[tuple[str, str], PluginError] = {}


def _discover(environ: Mapping[str, str]) -> list[EntryPoint]:
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    for spec in environ.get(PLUGINS_ENV, "").split(","):
        if spec.strip():
            found.append(EntryPoint(name=spec.strip(), value=spec.strip(), group=ENTRY_POINT_GROUP))
    unique: dict[tuple[str, str], EntryPoint] = {}
    for ep in found:  # one distribution seen twice on sys.path lists its entry points twice
        unique.setdefault((ep.name, ep.value), ep)
    return list(unique.values())


def _run(ep: EntryPoint) -> None:
    target: ModuleType | Callable[[], object] = ep.load()
    if not isinstance(target, ModuleType):
        if not callable(target):
            raise TypeError(f"{ep.value} is a {type(target).__name__}, neither a module nor a callable")
        target()


def load_plugins(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Load every plugin not loaded yet in this process; return the names of those loaded now.

    Raises :class:`PluginError` naming the first plugin that failed and why (a failed plugin is not
    retried: asking again raises the same error).
    """
    env = os.environ if environ is None else environ
    loaded: list[str] = []
    for ep in _discover(env):
        key = (ep.name, ep.value)
        if key in _loaded:
            continue
        if key in _failed:
            raise _failed[key]
        try:
            _run(ep)
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
            where = "" if ep.name == ep.value else f" ({ep.value})"
            _failed[key] = PluginError(f"plugin {ep.name!r}{where} failed to load: {cause}")
            raise _failed[key] from exc
        _loaded.add(key)
        loaded.append(ep.name)
    return tuple(loaded)
