"""The protocol between devices and the coordinator: messages, device, coordinator, rounds."""

from .coordinator import Coordinator, CoordinatorConfig
from .device import Device, GlobalModel, SealedUpdate, Transport
from .messages import Frame, Receipt, Route, TaskInfo
from .rounds import PublishedModel, RoundConfig, RoundManager

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "Device",
    "Frame",
    "GlobalModel",
    "PublishedModel",
    "Receipt",
    "RoundConfig",
    "RoundManager",
    "Route",
    "SealedUpdate",
    "TaskInfo",
    "Transport",
]
