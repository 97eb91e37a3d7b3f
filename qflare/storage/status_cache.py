"""The per-message device status check without a database read: a cache of the devices known active.

Every sealed request checks that its device is still active (:meth:`qflare.storage.Store.device_status`).
The answer only changes from "active" through :meth:`~qflare.storage.Store.revoke_device`, so the store
remembers which devices it has read as active and forgets a device when it revokes it: revocation
takes effect on the device's very next message, with no time-to-live involved.

A read racing a revocation must not put the old answer back: every revocation bumps a generation
(before its write and again once it has committed), and a read fills the cache only when the
generation did not move while it read.

The assumption this rests on: the status of a device in the database changes only through this store
object (in the coordinator, the admin API's revoke calls :meth:`Coordinator.revoke`, which calls it).
A revocation written to the database by another process is not seen by a running coordinator's cache;
QFLARE has no such path (a coordinator process owns its database), and updates are re-checked against
the database anyway when they are recorded (``record_update`` refuses a revoked device in its own
transaction).  Only "active" is cached: an unknown or revoked device is read from the database each time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["ActiveDeviceCache"]


class ActiveDeviceCache:
    """Device ids read as active, forgotten on revocation (see the module docstring).  Thread-safe."""

    def __init__(self, *, enabled: bool = True) -> None:
        """``enabled`` False: every call reads (a store shared by several coordinator processes, where
        another process may revoke or quarantine a device)."""
        self._enabled = enabled
        self._active: set[str] = set()
        self._generation = 0
        self._lock = threading.Lock()

    def status(self, device_id: str, read: Callable[[str], str | None]) -> str | None:
        """``device_id``'s status: "active" from the cache, else ``read(device_id)`` (cached if active)."""
        if not self._enabled:
            return read(device_id)
        with self._lock:
            if device_id in self._active:
                return "active"
            generation = self._generation
        status = read(device_id)
        if status == "active":
            with self._lock:
                if self._generation == generation:
                    self._active.add(device_id)
        return status

    def forget(self, device_id: str) -> None:
        """Drop ``device_id`` and make every read in progress leave the cache alone."""
        with self._lock:
            self._generation += 1
            self._active.discard(device_id)

    def __len__(self) -> int:
        return len(self._active)
