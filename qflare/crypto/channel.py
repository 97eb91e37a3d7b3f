"""The encrypted session channel: AES-256-GCM frames with per-direction keys and counter nonces.

Frame (all integers big-endian)::

    offset  size  field
    0       1     frame version (0x01)
    1       1     message type
    2       8     round (u64)
    10      8     counter (u64, < 2**63, strictly increasing per direction)
    18      n+16  AES-256-GCM ciphertext || 16-byte tag

    nonce = 00 00 00 00 || counter (u64)                      (12 bytes)
    AAD   = "qflare/v1/frame" || session_id (32) || version || msg type || round || counter

The receiver refuses a frame whose header type/round differ from what it expects (AuthError
``wrong_msg_type``/``wrong_round``) and builds the AAD from the *expected* values, so a frame moved to
another type, round or session never authenticates.  A refused frame never advances the receive counter.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qflare.crypto.kem import hkdf_sha256
from qflare.crypto.suite import DEFAULT_SUITE, Suite
from qflare.errors import (
    AuthError,
    ConfigError,
    MalformedError,
    OversizeError,
    ReplayError,
    SessionExpiredError,
)

__all__ = [
    "DEFAULT_MAX_PLAINTEXT",
    "FRAME_AAD_LABEL",
    "FRAME_HEADER_LEN",
    "FRAME_VERSION",
    "MAX_COUNTER",
    "REKEY_LABEL",
    "TAG_LEN",
    "Channel",
    "frame_aad",
    "frame_nonce",
    "unsafe_seal_frame",
]

FRAME_VERSION = 1
_HEADER = struct.Struct(">BBQQ")
FRAME_HEADER_LEN = _HEADER.size  # 18
TAG_LEN = 16
MAX_COUNTER = 2**63  # counters 0 .. 2**63 - 1
MAX_ROUND = 2**64 - 1
DEFAULT_MAX_PLAINTEXT = 256 * 1024 * 1024
FRAME_AAD_LABEL = b"qflare/v1/frame"
REKEY_LABEL = b"qflare/v1/rekey"
KEY_LEN = 32


def _check_args(msg_type: int, round: int) -> None:
    if not isinstance(msg_type, int) or not 0 <= msg_type <= 0xFF:
        raise ConfigError(f"message type must be 0..255, got {msg_type!r}", code="bad_argument")
    if not isinstance(round, int) or not 0 <= round <= MAX_ROUND:
        raise ConfigError(f"round must be 0..2**64-1, got {round!r}", code="bad_argument")


def frame_nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


def frame_aad(session_id: bytes, msg_type: int, round: int, counter: int) -> bytes:
    return FRAME_AAD_LABEL + session_id + _HEADER.pack(FRAME_VERSION, msg_type, round, counter)


def _seal(aead: AESGCM, session_id: bytes, msg_type: int, round: int, counter: int, plaintext: bytes) -> bytes:
    header = _HEADER.pack(FRAME_VERSION, msg_type, round, counter)
    ct = aead.encrypt(frame_nonce(counter), plaintext, FRAME_AAD_LABEL + session_id + header)
    return header + ct


def unsafe_seal_frame(
    key: bytes, session_id: bytes, msg_type: int, round: int, counter: int, plaintext: bytes
) -> bytes:
    """DANGEROUS: seal one frame with an explicit counter.

    Sealing two different plaintexts with the same (key, counter) breaks both confidentiality and
    integrity.  Only for test vectors; use :class:`Channel` everywhere else.
    """
    _check_args(msg_type, round)
    if len(key) != KEY_LEN or len(session_id) != 32 or not 0 <= counter < MAX_COUNTER:
        raise ConfigError("bad key, session id or counter", code="bad_argument")
    return _seal(AESGCM(bytes(key)), bytes(session_id), msg_type, round, counter, bytes(plaintext))


class Channel:
    """One side of an established session.  Not reusable across sessions; thread-safe.

    ``lifetime`` (seconds) makes the channel refuse to seal or open after ``created_at + lifetime``
    (SessionExpiredError).  ``max_plaintext`` bounds what is sealed or accepted (OversizeError).
    """

    def __init__(
        self,
        session_id: bytes,
        send_key: bytes,
        recv_key: bytes,
        *,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        lifetime: float | None = None,
        created_at: float | None = None,
        clock: Callable[[], float] = time.time,
        suite: Suite = DEFAULT_SUITE,
        unsafe_initial_counters: tuple[int, int] | None = None,
    ) -> None:
        if len(session_id) != 32:
            raise ConfigError("session id must be 32 bytes", code="bad_argument")
        if len(send_key) != KEY_LEN or len(recv_key) != KEY_LEN:
            raise ConfigError("channel keys must be 32 bytes (AES-256)", code="bad_argument")
        if send_key == recv_key:
            raise ConfigError("send and receive keys must differ", code="bad_argument")
        if suite.aead != "AES-256-GCM":  # pragma: no cover - the only registered AEAD
            raise ConfigError(f"unsupported AEAD {suite.aead}", code="unknown_algorithm")
        if max_plaintext <= 0:
            raise ConfigError("max_plaintext must be positive", code="bad_argument")
        if lifetime is not None and lifetime <= 0:
            raise ConfigError("lifetime must be positive", code="bad_argument")
        self._session_id = bytes(session_id)
        self._suite = suite
        self._send_key = bytes(send_key)
        self._recv_key = bytes(recv_key)
        self._send_aead = AESGCM(self._send_key)
        self._recv_aead = AESGCM(self._recv_key)
        self._max_plaintext = int(max_plaintext)
        self._clock = clock
        self._created_at = clock() if created_at is None else float(created_at)
        self._expires_at = None if lifetime is None else self._created_at + float(lifetime)
        # DANGEROUS knob (vectors/tests): start counters elsewhere than (0, none received yet).
        next_send, last_recv = (0, -1) if unsafe_initial_counters is None else unsafe_initial_counters
        self._send_counter = int(next_send)
        self._last_recv = int(last_recv)
        self._epoch = 0
        self._lock = threading.Lock()

    # -- properties ---------------------------------------------------------------------------
    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def suite(self) -> Suite:
        """The suite negotiated for this session (signed payloads use it too)."""
        return self._suite

    @property
    def send_counter(self) -> int:
        """The counter the next sealed frame will use."""
        return self._send_counter

    @property
    def last_recv_counter(self) -> int:
        """The counter of the last accepted frame (-1 before any)."""
        return self._last_recv

    @property
    def epoch(self) -> int:
        """How many times :meth:`rekey` has run."""
        return self._epoch

    @property
    def max_plaintext(self) -> int:
        return self._max_plaintext

    @property
    def expires_at(self) -> float | None:
        return self._expires_at

    def expired(self) -> bool:
        return self._expires_at is not None and self._clock() >= self._expires_at

    def _check_expiry(self) -> None:
        if self.expired():
            raise SessionExpiredError("session expired: run a new handshake", code="session_expired")

    # -- traffic ------------------------------------------------------------------------------
    def seal(self, msg_type: int, round: int, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` as the next frame of this direction."""
        _check_args(msg_type, round)
        if len(plaintext) > self._max_plaintext:
            raise OversizeError(
                f"plaintext of {len(plaintext)} bytes exceeds max_plaintext={self._max_plaintext}", code="oversized"
            )
        with self._lock:
            self._check_expiry()
            counter = self._send_counter
            if counter >= MAX_COUNTER:
                raise SessionExpiredError("send counter exhausted: run a new handshake", code="counter_exhausted")
            self._send_counter = counter + 1  # reserve before encrypting: never reused, even on error
            aead = self._send_aead
        return _seal(aead, self._session_id, msg_type, round, counter, plaintext)

    def open(self, msg_type: int, round: int, data: bytes) -> bytes:
        """Authenticate and decrypt a frame expected to carry ``msg_type`` for ``round``.

        MalformedError (``truncated``/``malformed``), OversizeError, SessionExpiredError, ReplayError
        (``replay``: counter not above the last accepted one), AuthError (``wrong_msg_type``,
        ``wrong_round`` or ``bad_mac``).  Only a frame that authenticates advances the receive counter.
        """
        counter = self._frame_counter(msg_type, round, data)
        with self._lock:
            self._check_expiry()
            self._check_fresh(counter)
            plaintext = self._decrypt(msg_type, round, counter, data)
            self._last_recv = counter
        return plaintext

    def _frame_counter(self, msg_type: int, round: int, data: bytes) -> int:
        """Check a frame's size and header against what the caller expects; return its counter.  Nothing
        is authenticated yet."""
        _check_args(msg_type, round)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedError("frame must be bytes", code="malformed")
        if len(data) < FRAME_HEADER_LEN + TAG_LEN:
            raise MalformedError(f"frame of {len(data)} bytes is shorter than header + tag", code="truncated")
        if len(data) - FRAME_HEADER_LEN - TAG_LEN > self._max_plaintext:
            raise OversizeError(f"frame exceeds max_plaintext={self._max_plaintext}", code="oversized")
        version, h_type, h_round, counter = _HEADER.unpack_from(data, 0)
        if version != FRAME_VERSION:
            raise MalformedError(f"unknown frame version {version}", code="malformed")
        if counter >= MAX_COUNTER:
            raise MalformedError("frame counter out of range", code="malformed")
        # The header copies must equal what the caller expects; the AAD (built from the expected values)
        # then authenticates them, so the header is never trusted on its own.
        if h_type != msg_type:
            raise AuthError(f"frame is for message type {h_type}, expected {msg_type}", code="wrong_msg_type")
        if h_round != round:
            raise AuthError(f"frame is for round {h_round}, expected {round}", code="wrong_round")
        return int(counter)

    def _check_fresh(self, counter: int) -> None:
        if counter <= self._last_recv:
            raise ReplayError(
                f"frame counter {counter} is not above the last accepted {self._last_recv}", code="replay"
            )

    def _decrypt(self, msg_type: int, round: int, counter: int, data: bytes) -> bytes:
        """Authenticate and decrypt (under ``self._lock``); AuthError ``bad_mac``."""
        aad = frame_aad(self._session_id, msg_type, round, counter)
        try:
            return self._recv_aead.decrypt(frame_nonce(counter), memoryview(data)[FRAME_HEADER_LEN:], aad)
        except InvalidTag:
            raise AuthError("frame failed authentication", code="bad_mac") from None

    def rekey(self) -> None:
        """Ratchet both directions' keys forward (forward secrecy within a session).

        ``k' = HKDF-SHA256(IKM=k, salt=session_id, info="qflare/v1/rekey")`` for each key.  Both sides
        must call it at the same point of the message stream (e.g. at each round boundary): frames sealed
        under the old keys no longer open afterwards.  Counters keep running, so nonces never repeat.
        """
        with self._lock:
            self._send_key = hkdf_sha256(self._send_key, self._session_id, REKEY_LABEL)
            self._recv_key = hkdf_sha256(self._recv_key, self._session_id, REKEY_LABEL)
            self._send_aead = AESGCM(self._send_key)
            self._recv_aead = AESGCM(self._recv_key)
            self._epoch += 1

    def unsafe_keys(self) -> tuple[bytes, bytes]:
        """DANGEROUS: the current (send, recv) keys.  Only for test vectors."""
        return self._send_key, self._recv_key

    def __repr__(self) -> str:
        return f"Channel(session={self._session_id.hex()[:16]}..., epoch={self._epoch}, next_send={self._send_counter})"
