"""Settings and defaults in one place.

Every default a user can change lives here; environment variables ``QFLARE_*`` override them
(pydantic-settings), and CLI options override both.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "settings", "default_data_dir", "MALLOC_ENV"]

# glibc's default malloc thresholds make every round's large temporary tensors go back to the kernel
# and fault in again (see BENCHMARKS.md: ~0.8 s a round on fmnist-dir05).  QFLARE sets these for the
# processes it starts itself (device processes, benchmarks); they must be in the environment before
# the process starts, so they cannot be applied to the current one.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qflare"


class Settings(BaseSettings):
    """Process-wide settings (``QFLARE_`` environment variables)."""

    model_config = SettingsConfigDict(env_prefix="QFLARE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="server state: database, blobs, keys")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite under data_dir if unset")
    dataset_dir: Path | None = Field(default=None, description="where datasets are looked up first")
    max_update_bytes: int = Field(default=64 * 1024 * 1024, description="largest sealed update accepted")
    session_lifetime_s: float = Field(default=3600.0, description="a session must re-key or re-handshake after this")


def settings() -> Settings:
    return Settings()
