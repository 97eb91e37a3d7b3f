"""The protocol between devices and the coordinator: messages, device, coordinator, rounds, and the
store interface the coordinator needs (implemented by :mod:`qflare.storage`)."""

from .coordinator import Coordinator, CoordinatorConfig
from .device import Device, GlobalModel, SignedUpdate, Transport
from .messages import Frame, Receipt, Route, TaskInfo
from .records import DeviceRow, ModelRow, RoundRow, SecurityEventRow, SessionRow, UpdateRow
from .rounds import PublishedModel, RoundConfig, RoundManager
from .store import BlobSink, CoordinatorStore

__all__ = [
    "BlobSink",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorStore",
    "Device",
    "DeviceRow",
    "Frame",
    "GlobalModel",
    "ModelRow",
    "PublishedModel",
    "Receipt",
    "RoundConfig",
    "RoundManager",
    "RoundRow",
    "Route",
    "SecurityEventRow",
    "SessionRow",
    "SignedUpdate",
    "TaskInfo",
    "Transport",
    "UpdateRow",
]
