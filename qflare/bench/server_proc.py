"""The coordinator server a benchmark runs: a federation plus the server settings benchmarks measure with.

:class:`ServerSpec` embeds the :class:`~qflare.federation.FederationSpec` and adds only what is the
benchmark server's own: no evaluation (the driver evaluates, or nothing is), the upload slots, and
per-address rate limits lifted (every benchmark device shares 127.0.0.1, so the per-address limit
would throttle the whole fleet).  :meth:`ServerSpec.process` is the one launcher,
:class:`~qflare.server.process.ServerProcess`, with those settings; devices pin the key id it reads
from the data directory with :func:`qflare.device.pin_server_key`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MALLOC_ENV
from ..errors import ConfigError
from ..federation import FederationSpec
from ..server.process import ServerProcess

__all__ = ["ServerSpec"]

_UNLIMITED_RATE = 1_000_000.0


@dataclass(frozen=True)
class ServerSpec:
    """A benchmark's server: its federation and its own settings (see the module docstring)."""

    federation: FederationSpec
    max_uploads: int = 8
    ready_timeout_s: float = 180.0
    workers: int = 1
    """``qflare server --workers``: more than one needs ``database_url`` (PostgreSQL)."""
    database_url: str | None = None

    def __post_init__(self) -> None:
        if self.max_uploads < 1:
            raise ConfigError(f"max_uploads must be >= 1, got {self.max_uploads}")
        if self.workers < 1 or (self.workers > 1 and self.database_url is None):
            raise ConfigError("workers must be >= 1, and more than one needs a PostgreSQL database_url")

    def server_args(self) -> list[str]:
        """The ``qflare server`` options of a benchmark server beyond its federation."""
        return [
            "--no-eval",
            "--max-uploads",
            str(self.max_uploads),
            "--rate",
            str(_UNLIMITED_RATE),
            "--session-rate",
            str(_UNLIMITED_RATE),
            "--log-level",
            "warning",
            *(["--workers", str(self.workers)] if self.workers > 1 else []),
        ]

    def process(self) -> ServerProcess:
        """The server, not started yet (a context manager: ``with spec.process() as server``), on a temporary
        data directory; the whole federation enrolls before the first round opens."""
        return ServerProcess(
            self.federation,
            args=self.server_args(),
            env=MALLOC_ENV,
            ready_timeout_s=self.ready_timeout_s,
            database_url=self.database_url,
        )
