"""The long-running device process: its work loop, its on-disk state and pinning, and its workload.

This package mirrors :mod:`qflare.server` on the device side.  It imports neither SQLAlchemy, nor
FastAPI, nor the simulation (a test pins that): a device needs the protocol, the crypto, the model
and its data, nothing of the coordinator.
"""

from .announce import ModelAnnouncement, check_model, parse_announcement
from .loop import DeviceClient, RunSummary, default_state_dir
from .rekey import follow_rotations, repin
from .state import DeviceState, normalize_key_id, pin_server_key, read_pin_file
from .workload import Workload, load_workload, local_workload

__all__ = [
    "DeviceClient",
    "DeviceState",
    "ModelAnnouncement",
    "RunSummary",
    "Workload",
    "check_model",
    "default_state_dir",
    "follow_rotations",
    "load_workload",
    "local_workload",
    "normalize_key_id",
    "parse_announcement",
    "pin_server_key",
    "read_pin_file",
    "repin",
]
