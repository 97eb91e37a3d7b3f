"""The server side of a handshake between SERVER_HELLO and CLIENT_FINISH, as bytes another process can
resume (:meth:`qflare.crypto.handshake.ServerHandshake.export_state` / ``resume``)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qflare.crypto.kem import Role, SessionKeys
from qflare.crypto.suite import Suite
from qflare.errors import MalformedError

__all__ = ["HandshakeState"]

_STATE = struct.Struct(">5s32sQI32s32s32s32s")  # suite, device key id, started (ms), lifetime, TH, c2s, s2c, session id


@dataclass(frozen=True, repr=False)
class HandshakeState:
    """What a :class:`~qflare.crypto.handshake.ServerHandshake` holds between ``respond`` and ``finish``,
    so that another process can finish it (DANGEROUS: ``keys`` are the
    session's keys; store it only wrapped, see :mod:`qflare.crypto.wrap`)."""

    suite: Suite
    device_key_id: str
    started: float
    lifetime_s: int
    transcript: bytes
    keys: SessionKeys

    def to_bytes(self) -> bytes:
        """A fixed 177-byte layout: suite (5), device key id (32), started (u64 ms), lifetime (u32),
        transcript hash, c2s key, s2c key, session id (32 each)."""
        return _STATE.pack(
            self.suite.to_bytes(),
            bytes.fromhex(self.device_key_id),
            max(0, round(self.started * 1000)),
            self.lifetime_s,
            self.transcript,
            self.keys.c2s,
            self.keys.s2c,
            self.keys.session_id,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> HandshakeState:
        if len(data) != _STATE.size:
            raise MalformedError(f"handshake state must be {_STATE.size} bytes, got {len(data)}", code="malformed")
        suite, key_id, started, lifetime, transcript, c2s, s2c, sid = _STATE.unpack(data)
        keys = SessionKeys(c2s=c2s, s2c=s2c, session_id=sid, role=Role.SERVER)
        return cls(Suite.from_bytes(suite), key_id.hex(), started / 1000, lifetime, transcript, keys)
