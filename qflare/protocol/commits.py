"""Group commit: concurrent callers share one durable write.

Each caller of :meth:`GroupCommit.submit` queues its item and waits.  One caller at a time becomes the
leader: it takes everything queued (up to ``max_batch`` items) and hands the batch to ``flush``, which
writes it in one transaction (one commit, one fsync) and returns one outcome per item; every caller
then gets its own item's outcome, a result or the exception to raise.  Items queued while a flush runs
go into the next one, so the batch grows with the load and a lone caller is flushed at once.

Nothing is returned to a caller before ``flush`` has returned for its item: an update is acknowledged
only once the transaction recording it has committed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """See the module docstring.  ``flush(items)`` returns a list as long as ``items`` of results or
    exceptions; if it raises, every item of the batch gets that exception.  Thread-safe."""

    def __init__(self, flush: Callable[[list[T]], Sequence[R | BaseException]], max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._flush, self._max = flush, max_batch
        self._queue: list[_Slot[T, R]] = []
        self._flushing = False
        self._cond = threading.Condition()
        self.batches = 0
        """How many flushes ran (for tests and metrics)."""
        self.largest = 0
        """The largest batch flushed so far."""

    def submit(self, item: T) -> R:
        """Queue ``item``, wait until a flush has written it, and return its result (or raise its error)."""
        slot: _Slot[T, R] = _Slot(item)
        with self._cond:
            self._queue.append(slot)
        while True:
            with self._cond:
                while self._flushing and not slot.done:
                    self._cond.wait()
                if slot.done:
                    break
                self._flushing = True
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            self._lead(batch)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with done when there is no error

    def _lead(self, batch: list[_Slot[T, R]]) -> None:
        outcomes: Sequence[R | BaseException]
        try:
            outcomes = self._flush([s.item for s in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"flush returned {len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as exc:
            outcomes = [exc] * len(batch)
        with self._cond:
            for slot, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    slot.error = outcome
                else:
                    slot.result = outcome
                slot.done = True
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            self._flushing = False
            self._cond.notify_all()
