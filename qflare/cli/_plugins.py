"""Imported first by :mod:`qflare.cli`: loads the plugins before the commands are defined, so that their
names appear in every option's help.  A failure is reported by the app's callback (one line, exit 2)."""

from __future__ import annotations

from contextlib import suppress

from ..errors import QflareError
from ..plugins import load_plugins

with suppress(QflareError):  # load_plugins raises it again, from the app callback
    load_plugins()
