"""Process-wide defaults shared by several commands (data folder, heap settings for child processes).

A federation's workload is :class:`qflare.federation.FederationSpec`; per-component settings live
with their component (``ServerConfig``, ``SimulationConfig``, ``DemoConfig``); ``QFLARE_*``
environment variables are read where they apply (``QFLARE_DATABASE_URL``, ``QFLARE_ADMIN_TOKEN``,
``QFLARE_DATA_DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MALLOC_ENV", "default_data_dir"]

# glibc's default malloc thresholds make every round's large temporary tensors go back to the kernel
# and fault in again (docs/performance.md: ~0.8 s a round on fmnist-dir05).  QFLARE sets these for the
# processes it starts itself (device processes, benchmarks); they must be in the environment before
# the process starts, so they cannot be applied to the current one.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qflare"
