"""Signed payloads over a session: "seal this update / model for that session".

The payload (model or update bytes) is hashed with SHA-256; a small signed envelope (UPDATE or
GLOBAL_MODEL) carries the hash, the round and the other metadata; envelope and payload travel in one
channel frame whose plaintext is::

    offset  size  field
    0       4     envelope length n (u32, big-endian)
    4       n     signed envelope (see envelope.py)
    4+n     ...   payload

The signature gives provenance that outlives the session (it can be stored and re-verified); the channel
gives confidentiality, freshness and binding to the session, message type and round.
"""

from __future__ import annotations

import struct
import time

from qflare.crypto.channel import Channel
from qflare.crypto.envelope import DEFAULT_MAX_ENVELOPE, Field, MsgType, SignedEnvelope, u64
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.suite import sha256
from qflare.errors import AuthError, MalformedError, PolicyError, StaleModelError, WrongRoundError

__all__ = [
    "UPDATE_STATUS_ACCEPTED",
    "UPDATE_STATUS_REJECTED",
    "open_global_model",
    "open_update",
    "pack_signed",
    "seal_global_model",
    "seal_update",
    "sign_update_ack",
    "unpack_signed",
]

_LEN = struct.Struct(">I")
UPDATE_STATUS_ACCEPTED = 0x00
UPDATE_STATUS_REJECTED = 0x01


def pack_signed(envelope: bytes, payload: bytes) -> bytes:
    return b"".join((_LEN.pack(len(envelope)), envelope, payload))


def unpack_signed(plaintext: bytes, max_envelope: int = DEFAULT_MAX_ENVELOPE) -> tuple[bytes, memoryview]:
    if len(plaintext) < _LEN.size:
        raise MalformedError("signed payload shorter than its length prefix", code="truncated")
    (n,) = _LEN.unpack_from(plaintext, 0)
    if n > max_envelope:
        raise MalformedError(f"embedded envelope length {n} exceeds {max_envelope}", code="malformed")
    if len(plaintext) - _LEN.size < n:
        raise MalformedError("embedded envelope truncated", code="truncated")
    view = memoryview(plaintext)
    return bytes(view[_LEN.size : _LEN.size + n]), view[_LEN.size + n :]


def _open_envelope(
    channel: Channel, env_bytes: bytes, key: VerifyKey, msg_type: MsgType, max_envelope: int
) -> SignedEnvelope:
    env = SignedEnvelope.parse(env_bytes, max_size=max_envelope, expected_type=msg_type)
    if env.suite != channel.suite:
        raise PolicyError(f"envelope suite {env.suite.name} is not the session's", code="suite_mismatch")
    return env.verify(key)


def _check_payload(env: SignedEnvelope, payload: memoryview, hash_field: Field) -> bytes:
    if env.get_int(Field.PAYLOAD_SIZE) != len(payload):
        raise AuthError("payload size differs from the signed size", code="payload_mismatch")
    if sha256(payload) != env.get(hash_field):
        raise AuthError("payload hash differs from the signed hash", code="payload_hash_mismatch")
    return bytes(payload)


def seal_update(
    channel: Channel,
    device_key: SigningKey,
    round: int,
    base_model_hash: bytes,
    num_examples: int,
    payload: bytes,
    *,
    metadata: bytes | None = None,
) -> bytes:
    """Hash the update, sign (device key id, round, base model hash, update hash, examples, size and the
    optional metadata bytes), seal."""
    fields = {
        Field.DEVICE_KEY_ID: bytes.fromhex(device_key.key_id),
        Field.ROUND: u64(round),
        Field.BASE_MODEL_HASH: base_model_hash,
        Field.UPDATE_HASH: sha256(payload),
        Field.NUM_EXAMPLES: u64(num_examples),
        Field.PAYLOAD_SIZE: u64(len(payload)),
    }
    if metadata is not None:
        fields[Field.METADATA] = metadata
    env = SignedEnvelope.sign(channel.suite, MsgType.UPDATE, fields, device_key)
    return channel.seal(MsgType.UPDATE, round, pack_signed(env.to_bytes(), payload))


def open_update(
    channel: Channel,
    device_key: VerifyKey,
    round: int,
    frame: bytes,
    *,
    expected_base_model_hash: bytes | None = None,
    max_envelope: int = DEFAULT_MAX_ENVELOPE,
) -> tuple[SignedEnvelope, bytes]:
    """Open, verify the device signature, check round/device/size/hash; return (envelope, payload).

    The envelope can be stored as a provenance record and re-verified later with the device key.
    """
    env_bytes, payload = unpack_signed(channel.open(MsgType.UPDATE, round, frame), max_envelope)
    env = _open_envelope(channel, env_bytes, device_key, MsgType.UPDATE, max_envelope)
    if env.get_key_id(Field.DEVICE_KEY_ID) != device_key.key_id:
        raise AuthError("update names another device", code="device_mismatch")
    if env.get_int(Field.ROUND) != round:
        raise WrongRoundError(f"update signed for round {env.get_int(Field.ROUND)}, expected {round}")
    if expected_base_model_hash is not None and env.get(Field.BASE_MODEL_HASH) != expected_base_model_hash:
        raise StaleModelError("update was trained on another base model")
    return env, _check_payload(env, payload, Field.UPDATE_HASH)


def seal_global_model(
    channel: Channel,
    server_key: SigningKey,
    round: int,
    payload: bytes,
    *,
    timestamp: int | None = None,
) -> bytes:
    """Coordinator: sign (round, model hash, size, unix time) and seal the global model for one session."""
    env = SignedEnvelope.sign(
        channel.suite,
        MsgType.GLOBAL_MODEL,
        {
            Field.MODEL_VERSION: u64(round),
            Field.MODEL_HASH: sha256(payload),
            Field.PAYLOAD_SIZE: u64(len(payload)),
            Field.TIMESTAMP: u64(int(time.time()) if timestamp is None else timestamp),
        },
        server_key,
    )
    return channel.seal(MsgType.GLOBAL_MODEL, round, pack_signed(env.to_bytes(), payload))


def open_global_model(
    channel: Channel,
    server_key: VerifyKey,
    round: int,
    frame: bytes,
    *,
    max_envelope: int = DEFAULT_MAX_ENVELOPE,
) -> tuple[SignedEnvelope, bytes]:
    """Device: open, verify the coordinator signature, check round/size/hash; return (envelope, model)."""
    env_bytes, payload = unpack_signed(channel.open(MsgType.GLOBAL_MODEL, round, frame), max_envelope)
    env = _open_envelope(channel, env_bytes, server_key, MsgType.GLOBAL_MODEL, max_envelope)
    if env.get_int(Field.MODEL_VERSION) != round:
        raise WrongRoundError(f"model signed as version {env.get_int(Field.MODEL_VERSION)}, expected {round}")
    return env, _check_payload(env, payload, Field.MODEL_HASH)


def sign_update_ack(
    server_key: SigningKey,
    update: SignedEnvelope,
    status: int = UPDATE_STATUS_ACCEPTED,
    *,
    timestamp: int | None = None,
) -> SignedEnvelope:
    """Coordinator: a signed receipt for an update (device key id, round, update hash, status, unix time)."""
    return SignedEnvelope.sign(
        update.suite,
        MsgType.UPDATE_ACK,
        {
            Field.DEVICE_KEY_ID: update.get(Field.DEVICE_KEY_ID),
            Field.ROUND: update.get(Field.ROUND),
            Field.UPDATE_HASH: update.get(Field.UPDATE_HASH),
            Field.STATUS: bytes([status]),
            Field.TIMESTAMP: u64(int(time.time()) if timestamp is None else timestamp),
        },
        server_key,
    )
