"""The in-process transport: calls the coordinator directly (simulation, tests, benchmarks)."""

from __future__ import annotations

from ..protocol.coordinator import Coordinator
from ..protocol.messages import Route

__all__ = ["InProcessTransport"]


class InProcessTransport:
    """Hands request bytes straight to :meth:`Coordinator.handle`; errors propagate as raised."""

    def __init__(self, coordinator: Coordinator, remote: str = "in-process") -> None:
        self.coordinator = coordinator
        self.remote = remote

    def request(self, route: Route, body: bytes, session_id: str | None = None) -> bytes:
        return self.coordinator.handle(route, body, session_id=session_id, remote=self.remote)
