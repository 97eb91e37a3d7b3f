"""One request's view of a session whose counters live in a shared store, not in this process.

Several coordinator processes can serve one session (:mod:`qflare.protocol.shared_state`): each holds the
session's keys, none holds its counters.  A :class:`SharedChannel` is built for one request from the
session's stored row: it opens the request's frame, then asks the store (``advance``) to record the
frame's counter as the last received one — atomically, only when it is above the stored one — and to
reserve the counter of the one reply frame.  :meth:`SharedChannel.seal` seals with that reservation,
once: the store is the only source of send counters, so no two processes ever seal under one nonce.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qflare.crypto.channel import DEFAULT_MAX_PLAINTEXT, MAX_COUNTER, Channel, _check_args, _seal
from qflare.crypto.suite import DEFAULT_SUITE, Suite
from qflare.errors import OversizeError, ProtocolError, SessionExpiredError

__all__ = ["CounterAdvance", "SharedChannel"]

CounterAdvance = Callable[[int], int]
"""Called with an authenticated frame's counter: records it as the session's last received counter if it
is above the stored one and returns a send counter reserved for this channel's reply, in one atomic step;
raises (``replay`` when the counter is not above the stored one, or why the session is gone)."""


class SharedChannel(Channel):
    """A :class:`Channel` for one request on a session whose counters another party keeps.

    ``last_recv`` is the last received counter as read with the session: a frame at or below it is
    refused ``replay`` before any decryption (a cheap pre-check; ``advance`` is the authority).  A frame
    that authenticates is handed to ``advance``; only when that succeeds is it accepted, and the counter
    it returns is the one :meth:`seal` uses.  Sealing without a reservation, or twice on one reservation,
    is ProtocolError ``bad_state``.  A shared session is never rekeyed (:meth:`rekey` is ``bad_state``).
    """

    def __init__(
        self,
        session_id: bytes,
        send_key: bytes,
        recv_key: bytes,
        *,
        advance: CounterAdvance,
        last_recv: int,
        expires_at: float,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        clock: Callable[[], float] = time.time,
        suite: Suite = DEFAULT_SUITE,
    ) -> None:
        super().__init__(session_id, send_key, recv_key, max_plaintext=max_plaintext, clock=clock, suite=suite)
        self._expires_at = float(expires_at)
        self._last_recv = int(last_recv)
        self._advance = advance
        self._reserved: int | None = None

    def open(self, msg_type: int, round: int, data: bytes) -> bytes:
        counter = self._frame_counter(msg_type, round, data)
        with self._lock:
            self._check_expiry()
            self._check_fresh(counter)
            plaintext = self._decrypt(msg_type, round, counter, data)
            reserved = self._advance(counter)  # the one atomic step: raises when the frame is not fresh
            if not 0 <= reserved < MAX_COUNTER:
                raise SessionExpiredError("send counter exhausted: run a new handshake", code="counter_exhausted")
            self._last_recv, self._reserved = counter, reserved
        return plaintext

    def seal(self, msg_type: int, round: int, plaintext: bytes) -> bytes:
        _check_args(msg_type, round)
        if len(plaintext) > self._max_plaintext:
            raise OversizeError(
                f"plaintext of {len(plaintext)} bytes exceeds max_plaintext={self._max_plaintext}", code="oversized"
            )
        with self._lock:
            self._check_expiry()
            counter = self._reserved
            if counter is None:
                raise ProtocolError("no send counter is reserved for a reply on this shared session", code="bad_state")
            self._reserved = None
            self._send_counter = counter + 1
            aead = self._send_aead
        return _seal(aead, self._session_id, msg_type, round, counter, plaintext)

    def rekey(self) -> None:
        raise ProtocolError("a shared session is never rekeyed", code="bad_state")
