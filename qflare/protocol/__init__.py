"""The protocol between devices and the coordinator: messages, device, coordinator, rounds, and the
store interface the coordinator needs (implemented by :mod:`qflare.storage`), and client selection."""

from .cluster import Leadership
from .coordinator import Coordinator, CoordinatorConfig
from .device import Device, GlobalModel, SignedUpdate, Transport
from .messages import Frame, Receipt, Route, TaskInfo
from .records import DeviceRow, ModelRow, RoundRow, SecurityEventRow, SessionRow, UpdateRow
from .rounds import PublishedModel, RoundConfig, RoundManager
from .selection import (
    SELECTORS,
    ClientSelector,
    RandomSelector,
    SelectorFactory,
    build_selector,
    check_selection,
    register_selector,
)
from .store import BlobSink, CoordinatorStore

__all__ = [
    "SELECTORS",
    "BlobSink",
    "ClientSelector",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorStore",
    "Device",
    "DeviceRow",
    "Frame",
    "GlobalModel",
    "Leadership",
    "ModelRow",
    "PublishedModel",
    "RandomSelector",
    "Receipt",
    "RoundConfig",
    "RoundManager",
    "RoundRow",
    "Route",
    "SecurityEventRow",
    "SelectorFactory",
    "SessionRow",
    "SignedUpdate",
    "TaskInfo",
    "Transport",
    "UpdateRow",
    "build_selector",
    "check_selection",
    "register_selector",
]
