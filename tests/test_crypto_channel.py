"""AES-256-GCM session channel: round trips, tampering, replay, binding, limits, expiry, rekey."""

from __future__ import annotations

import pytest

from qflare.crypto.channel import FRAME_HEADER_LEN, MAX_COUNTER, TAG_LEN, Channel
from qflare.crypto.envelope import MsgType
from qflare.errors import (
    AuthError,
    ConfigError,
    MalformedError,
    OversizeError,
    QflareError,
    ReplayError,
    SessionExpiredError,
)

SID = b"\x11" * 32
K1, K2 = b"\x01" * 32, b"\x02" * 32
UPD = MsgType.UPDATE


def pair(**kw: object) -> tuple[Channel, Channel]:
    return Channel(SID, K1, K2, **kw), Channel(SID, K2, K1, **kw)  # type: ignore[arg-type]


def test_round_trip_both_directions() -> None:
    a, b = pair()
    for i, pt in enumerate([b"", b"x", b"hello" * 1000]):
        assert b.open(UPD, 5, a.seal(UPD, 5, pt)) == pt
        assert a.open(MsgType.GLOBAL_MODEL, 5, b.seal(MsgType.GLOBAL_MODEL, 5, pt)) == pt
        assert a.send_counter == i + 1 and b.last_recv_counter == i


def test_frame_layout() -> None:
    a, _ = pair()
    frame = a.seal(UPD, 7, b"abc")
    assert len(frame) == FRAME_HEADER_LEN + 3 + TAG_LEN
    assert frame[:FRAME_HEADER_LEN] == bytes([1, UPD]) + (7).to_bytes(8, "big") + (0).to_bytes(8, "big")


REGIONS = {
    "version": (0, MalformedError, "malformed"),
    "msg_type": (1, AuthError, "wrong_msg_type"),
    "round_hi": (2, AuthError, "wrong_round"),
    "round_lo": (9, AuthError, "wrong_round"),
    "counter_lo": (17, AuthError, "bad_mac"),
    "ciphertext": (FRAME_HEADER_LEN + 1, AuthError, "bad_mac"),
    "tag_first": (-TAG_LEN, AuthError, "bad_mac"),
    "tag_last": (-1, AuthError, "bad_mac"),
}


@pytest.mark.parametrize("region", list(REGIONS))
def test_tampering_each_region_is_refused_with_reason(region: str) -> None:
    pos, exc_type, code = REGIONS[region]
    a, b = pair()
    frame = bytearray(a.seal(UPD, 3, b"payload bytes"))
    frame[pos] ^= 0x01
    with pytest.raises(exc_type) as exc:
        b.open(UPD, 3, bytes(frame))
    assert exc.value.code == code


def test_counter_high_bit_is_malformed() -> None:
    a, b = pair()
    frame = bytearray(a.seal(UPD, 3, b"x"))
    frame[10] ^= 0x80
    with pytest.raises(MalformedError):
        b.open(UPD, 3, bytes(frame))


def test_every_byte_flip_is_refused() -> None:
    a, b = pair()
    frame = a.seal(UPD, 3, b"0123456789")
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x40
        with pytest.raises(QflareError):
            b.open(UPD, 3, bytes(bad))
    assert b.open(UPD, 3, frame) == b"0123456789"  # failures never advanced the counter


def test_failed_tag_does_not_advance_receive_counter() -> None:
    a, b = pair()
    good = a.seal(UPD, 1, b"x")
    forged = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(AuthError):
        b.open(UPD, 1, forged)
    assert b.last_recv_counter == -1
    assert b.open(UPD, 1, good) == b"x"


def test_truncated_frames() -> None:
    a, b = pair()
    frame = a.seal(UPD, 1, b"abc")
    for n in range(FRAME_HEADER_LEN + TAG_LEN):
        with pytest.raises(MalformedError) as exc:
            b.open(UPD, 1, frame[:n])
        assert exc.value.code == "truncated"
    with pytest.raises(AuthError):
        b.open(UPD, 1, frame[:-1])
    with pytest.raises(AuthError):
        b.open(UPD, 1, frame + b"\x00")


def test_replay_refused() -> None:
    a, b = pair()
    frame = a.seal(UPD, 1, b"x")
    b.open(UPD, 1, frame)
    with pytest.raises(ReplayError) as exc:
        b.open(UPD, 1, frame)
    assert exc.value.code == "replay"


def test_reorder_refused_but_gaps_allowed() -> None:
    a, b = pair()
    f0, f1, f2 = (a.seal(UPD, 1, bytes([i])) for i in range(3))
    assert b.open(UPD, 1, f1) == b"\x01"
    with pytest.raises(ReplayError):
        b.open(UPD, 1, f0)
    assert b.open(UPD, 1, f2) == b"\x02"


def test_cross_session_refused() -> None:
    a, _ = pair()
    other = Channel(b"\x22" * 32, K2, K1)  # same keys, different session id
    with pytest.raises(AuthError) as exc:
        other.open(UPD, 1, a.seal(UPD, 1, b"x"))
    assert exc.value.code == "bad_mac"


def test_cross_round_and_type_refused() -> None:
    a, b = pair()
    frame = a.seal(UPD, 4, b"x")
    with pytest.raises(AuthError) as exc:
        b.open(UPD, 5, frame)
    assert exc.value.code == "wrong_round"
    with pytest.raises(AuthError) as exc:
        b.open(MsgType.GLOBAL_MODEL, 4, frame)
    assert exc.value.code == "wrong_msg_type"
    assert b.open(UPD, 4, frame) == b"x"


def test_reflection_refused() -> None:
    a, _ = pair()
    with pytest.raises(AuthError):
        a.open(UPD, 1, a.seal(UPD, 1, b"x"))


def test_max_plaintext() -> None:
    a, b = pair(max_plaintext=10)
    with pytest.raises(OversizeError):
        a.seal(UPD, 1, b"x" * 11)
    big_a = Channel(SID, K1, K2)
    with pytest.raises(OversizeError):
        b.open(UPD, 1, big_a.seal(UPD, 1, b"x" * 11))
    assert b.open(UPD, 1, a.seal(UPD, 1, b"x" * 10)) == b"x" * 10


def test_counter_exhaustion() -> None:
    a = Channel(SID, K1, K2, unsafe_initial_counters=(MAX_COUNTER - 1, -1))
    b = Channel(SID, K2, K1)
    assert b.open(UPD, 1, a.seal(UPD, 1, b"last")) == b"last"
    with pytest.raises(SessionExpiredError) as exc:
        a.seal(UPD, 1, b"one too many")
    assert exc.value.code == "counter_exhausted"


def test_expiry() -> None:
    now = [1000.0]
    a, b = pair(lifetime=60, clock=lambda: now[0])
    frame = a.seal(UPD, 1, b"x")
    now[0] += 60
    assert a.expired()
    with pytest.raises(SessionExpiredError) as exc:
        b.open(UPD, 1, frame)
    assert exc.value.code == "session_expired"
    with pytest.raises(SessionExpiredError):
        a.seal(UPD, 1, b"x")
    assert Channel(SID, K1, K2).expires_at is None


def test_rekey_lockstep() -> None:
    a, b = pair()
    b.open(UPD, 1, a.seal(UPD, 1, b"before"))
    old = a.seal(UPD, 1, b"sealed before rekey")
    a.rekey()
    b.rekey()
    assert a.epoch == b.epoch == 1
    assert a.unsafe_keys() == tuple(reversed(b.unsafe_keys()))
    assert a.unsafe_keys()[0] != K1
    with pytest.raises(AuthError):
        b.open(UPD, 1, old)  # old-key frames do not open after the ratchet
    assert b.open(UPD, 2, a.seal(UPD, 2, b"after")) == b"after"
    assert a.open(UPD, 2, b.seal(UPD, 2, b"back")) == b"back"
    a.rekey()  # one side only: out of step
    with pytest.raises(AuthError):
        b.open(UPD, 3, a.seal(UPD, 3, b"x"))


@pytest.mark.parametrize(
    "args",
    [
        (b"\x11" * 31, K1, K2),
        (SID, K1[:16], K2),
        (SID, K1, K1),
    ],
)
def test_constructor_checks(args: tuple[bytes, bytes, bytes]) -> None:
    with pytest.raises(ConfigError):
        Channel(*args)


def test_argument_checks() -> None:
    a, b = pair()
    for mt, rnd in ((256, 1), (-1, 1), (1, -1), (1, 2**64)):
        with pytest.raises(ConfigError):
            a.seal(mt, rnd, b"x")
        with pytest.raises(ConfigError):
            b.open(mt, rnd, b"\x00" * 40)
    with pytest.raises(MalformedError):
        b.open(1, 1, "not bytes")  # type: ignore[arg-type]
