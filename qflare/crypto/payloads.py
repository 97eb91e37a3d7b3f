"""The recipes of the round protocol: every frame a device and the coordinator exchange in a session.

:class:`~qflare.protocol.Device`, :class:`~qflare.protocol.Coordinator` and
:class:`~qflare.protocol.RoundManager` build and check their round messages only through these
functions, so each check (and the error code of each failure) lives here, once.

Channel frame types (the round value bound into each frame's AES-GCM AAD in brackets)::

    TASK_REQUEST 0x30 (0)        device -> coordinator, empty body
    TASK         0x31 (0)        coordinator -> device, task JSON
    MODEL_REQUEST 0x32 (0)       device -> coordinator, canonical JSON {"version": <int>}
    MODEL        0x33 (version)  coordinator -> device, signed GLOBAL_MODEL envelope + model blob
    UPDATE       0x34 (round)    device -> coordinator, signed UPDATE envelope + update blob
    RECEIPT      0x35 (round)    coordinator -> device, signed UPDATE_ACK envelope + receipt JSON
    PROOF_REQUEST 0x36 (0)       device -> coordinator, canonical JSON {"round": <int>}
    PROOF        0x37 (round)    coordinator -> device, the round's signed ledger entry + the device's
                                 inclusion proof or left-out reason (qflare.protocol.proofs)

Secure-aggregation rounds (docs/secure-aggregation.md; every body a *part list*, below)::

    SECAGG_CONFIG_REQUEST 0x38 (round)  device -> coordinator, no parts
    SECAGG_CONFIG         0x39 (round)  coordinator -> device, [config JSON]
    SECAGG_RELAY_REQUEST  0x3A (round)  device -> coordinator, [what: 1 byte, 1 adverts | 2 shares | 3 request]
    SECAGG_RELAY          0x3B (round)  coordinator -> device, the relayed phase messages
    SECAGG_ADVERTISE      0x3C (round)  device -> coordinator, [ADVERTISE]
    SECAGG_SHARES         0x3D (round)  device -> coordinator, [MANIFEST, SHARE, ...]
    SECAGG_MASKED         0x3E (round)  device -> coordinator, [MASKED_INPUT, vector]
    SECAGG_UNMASK         0x3F (round)  device -> coordinator, [UNMASK_RESPONSE]
    SECAGG_ACK            0x40 (round)  coordinator -> device, no parts (the message was accepted)
    SECAGG_CONSISTENCY    0x41 (round)  device -> coordinator, [CONSISTENCY] (its signature on U3)

A part list is ``u32 count || (u32 length || bytes) * count`` (big-endian), nothing after it.

MODEL, UPDATE and RECEIPT frames carry a signed payload whose plaintext is::

    offset  size  field
    0       4     envelope length n (u32, big-endian)
    4       n     signed envelope (see :mod:`qflare.crypto.envelope`)
    4+n     ...   payload

The signature gives provenance that outlives the session (the envelope can be stored and re-verified);
the channel gives confidentiality, freshness and binding to the session, frame type and round.  A
signed envelope must carry the session's suite (``PolicyError`` ``suite_mismatch``); its signed size
must equal the payload's length (``ValidationError`` ``payload_mismatch``) and its signed SHA-256 the
payload's (``ValidationError`` ``hash_mismatch``).
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qflare.crypto.channel import Channel
from qflare.crypto.envelope import DEFAULT_MAX_ENVELOPE, Field, MsgType, SignedEnvelope, u64
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.suite import Suite, sha256
from qflare.errors import (
    AuthError,
    ConfigError,
    MalformedError,
    PolicyError,
    StaleModelError,
    ValidationError,
    WrongRoundError,
)
from qflare.hashed import HashedBytes

__all__ = [
    "AckStatus",
    "Frame",
    "OpenedUpdate",
    "SignedUpdate",
    "canonical_json",
    "check_update_ack",
    "open_global_model",
    "open_model_request",
    "open_parts",
    "open_proof",
    "open_proof_request",
    "open_receipt",
    "open_signed_receipt",
    "open_task",
    "open_task_request",
    "open_update",
    "pack_parts",
    "pack_signed",
    "seal_model",
    "seal_model_request",
    "seal_parts",
    "seal_proof",
    "seal_proof_request",
    "seal_receipt",
    "seal_task",
    "seal_task_request",
    "seal_update",
    "sign_global_model",
    "sign_update",
    "sign_update_ack",
    "unpack_parts",
    "unpack_signed",
]

_LEN = struct.Struct(">I")
_MAX_METADATA = 4096


class Frame(enum.IntEnum):
    """Channel message types of the round protocol (bound into each frame's AAD together with the round)."""

    TASK_REQUEST = 0x30
    TASK = 0x31
    MODEL_REQUEST = 0x32
    MODEL = 0x33
    UPDATE = 0x34
    RECEIPT = 0x35
    PROOF_REQUEST = 0x36
    PROOF = 0x37
    SECAGG_CONFIG_REQUEST = 0x38
    SECAGG_CONFIG = 0x39
    SECAGG_RELAY_REQUEST = 0x3A
    SECAGG_RELAY = 0x3B
    SECAGG_ADVERTISE = 0x3C
    SECAGG_SHARES = 0x3D
    SECAGG_MASKED = 0x3E
    SECAGG_UNMASK = 0x3F
    SECAGG_ACK = 0x40
    SECAGG_CONSISTENCY = 0x41


class AckStatus(enum.IntEnum):
    """The STATUS of a signed UPDATE_ACK.  A refused update gets an error, never an ack."""

    ACCEPTED = 0x00  # recorded now, for the first time
    DUPLICATE = 0x01  # an idempotent resend of an update that was already accepted


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON without NaN/Infinity: the one encoding of a control message."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


# ---------------------------------------------------------------------------- signed-payload framing
def pack_signed(envelope: bytes, payload: bytes | memoryview) -> bytes:
    """``u32 len(envelope) || envelope || payload``."""
    return b"".join((_LEN.pack(len(envelope)), envelope, payload))


def unpack_signed(plaintext: bytes | memoryview, max_envelope: int = DEFAULT_MAX_ENVELOPE) -> tuple[bytes, memoryview]:
    """Split a signed payload into (envelope bytes, payload view); MalformedError if it does not frame."""
    if len(plaintext) < _LEN.size:
        raise MalformedError("signed payload shorter than its length prefix", code="truncated")
    (n,) = _LEN.unpack_from(plaintext, 0)
    if n > max_envelope:
        raise MalformedError(f"embedded envelope length {n} exceeds {max_envelope}", code="malformed")
    if len(plaintext) - _LEN.size < n:
        raise MalformedError("embedded envelope truncated", code="truncated")
    view = memoryview(plaintext)
    return bytes(view[_LEN.size : _LEN.size + n]), view[_LEN.size + n :]


def _envelope(channel: Channel, env_bytes: bytes, msg_type: MsgType, max_envelope: int) -> SignedEnvelope:
    env = SignedEnvelope.parse(env_bytes, max_size=max_envelope, expected_type=msg_type)
    if env.suite != channel.suite:
        raise PolicyError(
            f"{msg_type.name} envelope is in suite {env.suite.name}, the session's is {channel.suite.name}",
            code="suite_mismatch",
        )
    return env


def _check_payload(env: SignedEnvelope, payload: memoryview, hash_field: Field) -> HashedBytes:
    """The payload with its SHA-256 (computed once, here) when it matches the signed size and hash."""
    if env.get_int(Field.PAYLOAD_SIZE) != len(payload):
        raise ValidationError(
            f"payload is {len(payload)} bytes, its signed size is {env.get_int(Field.PAYLOAD_SIZE)}",
            code="payload_mismatch",
        )
    hashed = HashedBytes.of(payload)
    if bytes.fromhex(hashed.sha256) != env.get(hash_field):
        raise ValidationError("payload SHA-256 differs from the signed hash", code="hash_mismatch")
    return hashed


def _digest(hex_digest: str) -> bytes:
    try:
        raw = bytes.fromhex(hex_digest)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{hex_digest!r} is not a hex SHA-256 digest", code="bad_argument")
    return raw


# ---------------------------------------------------------------------------- task
def seal_task_request(channel: Channel) -> bytes:
    """Device: ask for the current task (an empty TASK_REQUEST frame)."""
    return channel.seal(Frame.TASK_REQUEST, 0, b"")


def open_task_request(channel: Channel, frame: bytes) -> None:
    """Coordinator: open a TASK_REQUEST (its body must be empty)."""
    if channel.open(Frame.TASK_REQUEST, 0, frame):
        raise MalformedError("a task request carries no body", code="malformed")


def seal_task(channel: Channel, body: bytes) -> bytes:
    """Coordinator: seal the task JSON."""
    return channel.seal(Frame.TASK, 0, body)


def open_task(channel: Channel, frame: bytes) -> bytes:
    """Device: open the task JSON (parsing it is the protocol's)."""
    return channel.open(Frame.TASK, 0, frame)


# ---------------------------------------------------------------------------- global model
def seal_model_request(channel: Channel, version: int) -> bytes:
    """Device: ask for global model ``version``."""
    return channel.seal(Frame.MODEL_REQUEST, 0, canonical_json({"version": version}))


def open_model_request(channel: Channel, frame: bytes) -> int:
    """Coordinator: the model version a MODEL_REQUEST asks for (exactly ``{"version": <int >= 0>}``)."""
    return _small_json_int(channel.open(Frame.MODEL_REQUEST, 0, frame), "version", "model request")


def _small_json_int(body: bytes, key: str, what: str) -> int:
    """``{key: <int >= 0>}`` exactly, in at most 64 bytes (MalformedError otherwise)."""
    try:
        obj = json.loads(body.decode("utf-8")) if len(body) <= 64 else None
    except (ValueError, RecursionError):
        obj = None
    value = obj.get(key) if isinstance(obj, dict) and len(obj) == 1 else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedError(f'a {what} must be {{"{key}": <int >= 0>}}', code="malformed")
    return value


def sign_global_model(
    identity: SigningKey, suite: Suite, version: int, blob: bytes, timestamp: int
) -> tuple[bytes, str]:
    """Coordinator: sign (version, SHA-256, size, unix time) of a model blob, once per version.

    Returns the GLOBAL_MODEL envelope and the blob's hex SHA-256.
    """
    digest = sha256(blob)
    env = SignedEnvelope.sign(
        suite,
        MsgType.GLOBAL_MODEL,
        {
            Field.MODEL_VERSION: u64(version),
            Field.MODEL_HASH: digest,
            Field.PAYLOAD_SIZE: u64(len(blob)),
            Field.TIMESTAMP: u64(timestamp),
        },
        identity,
    )
    return env.to_bytes(), digest.hex()


def seal_model(channel: Channel, version: int, envelope: bytes, blob: bytes) -> bytes:
    """Coordinator: seal a stored (GLOBAL_MODEL envelope, blob) pair as the MODEL frame of ``version``."""
    return channel.seal(Frame.MODEL, version, pack_signed(envelope, blob))


def open_global_model(
    channel: Channel,
    server_key: VerifyKey,
    frame: bytes,
    version: int,
    expected_hash: str,
    *,
    max_envelope: int = DEFAULT_MAX_ENVELOPE,
) -> tuple[SignedEnvelope, memoryview]:
    """Device: open a MODEL frame, verify the coordinator's signature and check that it signs model
    ``version`` with hex SHA-256 ``expected_hash`` (StaleModelError otherwise), then size and hash."""
    env_bytes, blob = unpack_signed(channel.open(Frame.MODEL, version, frame), max_envelope)
    env = _envelope(channel, env_bytes, MsgType.GLOBAL_MODEL, max_envelope).verify(server_key)
    if env.get_int(Field.MODEL_VERSION) != version or env.get(Field.MODEL_HASH).hex() != expected_hash:
        raise StaleModelError("coordinator sent a model other than the one asked for", code="stale_model")
    _check_payload(env, blob, Field.MODEL_HASH)
    return env, blob


# ---------------------------------------------------------------------------- update
@dataclass(frozen=True)
class SignedUpdate:
    """An update signed by the device, ready to be sealed (again, on a retry) in the session."""

    round: int
    payload: bytes  # pack_signed(UPDATE envelope, update blob)
    update_hash: str  # hex SHA-256 of the update blob


def sign_update(
    identity: SigningKey,
    suite: Suite,
    round: int,
    base_model_hash: str,
    num_examples: int,
    blob: bytes,
    metrics: Mapping[str, float] | None = None,
) -> SignedUpdate:
    """Device: sign (device key id, round, base model hash, update hash, examples, size and the
    metrics as canonical JSON) of an update blob."""
    digest = sha256(blob)
    fields = {
        Field.DEVICE_KEY_ID: identity.public.key_id_bytes,
        Field.ROUND: u64(round),
        Field.BASE_MODEL_HASH: _digest(base_model_hash),
        Field.UPDATE_HASH: digest,
        Field.NUM_EXAMPLES: u64(num_examples),
        Field.PAYLOAD_SIZE: u64(len(blob)),
    }
    if metrics:
        fields[Field.METADATA] = canonical_json(dict(metrics))
    env = SignedEnvelope.sign(suite, MsgType.UPDATE, fields, identity)
    return SignedUpdate(round, pack_signed(env.to_bytes(), blob), digest.hex())


def seal_update(channel: Channel, update: SignedUpdate) -> bytes:
    """Device: seal a signed update as the UPDATE frame of its round."""
    return channel.seal(Frame.UPDATE, update.round, update.payload)


@dataclass(frozen=True)
class OpenedUpdate:
    """A verified update: its signed UPDATE envelope (a provenance record) and the blob it signs."""

    envelope: SignedEnvelope
    blob: memoryview
    hashed: HashedBytes | None = None
    """The blob with the SHA-256 :func:`open_update` computed over it while checking it against the
    envelope (the blob store writes it without hashing it again); None when not made by open_update."""

    @property
    def device_key_id(self) -> str:
        return self.envelope.get_key_id(Field.DEVICE_KEY_ID)

    @property
    def round(self) -> int:
        return self.envelope.get_int(Field.ROUND)

    @property
    def base_model_hash(self) -> str:
        return self.envelope.get(Field.BASE_MODEL_HASH).hex()

    @property
    def update_hash(self) -> str:
        return self.envelope.get(Field.UPDATE_HASH).hex()

    @property
    def num_examples(self) -> int:
        return self.envelope.get_int(Field.NUM_EXAMPLES)

    @property
    def signature(self) -> bytes:
        return self.envelope.signature

    def metrics(self) -> dict[str, float]:
        """The signed training metrics (METADATA: a JSON object of numbers; MalformedError otherwise).

        Total on hostile input: every outcome is either a dict of finite floats of magnitude at most
        ``_MAX_METRIC`` or MalformedError ``malformed`` -- NaN/Infinity literals, integers of more than
        ``_MAX_METRIC_DIGITS`` digits, numbers that overflow a float, absurd magnitudes and keys repeated
        (also after clipping to 64 characters) are all refused, cheapest test first.
        """
        raw = self.envelope.fields.get(Field.METADATA)
        if not raw:
            return {}
        if len(raw) > _MAX_METADATA:
            raise MalformedError("update metadata is too long", code="malformed")
        try:
            obj = json.loads(
                raw.decode("utf-8"),
                parse_int=_metric_int,
                parse_float=_metric_float,
                parse_constant=_metric_constant,
                object_pairs_hook=_metric_pairs,
            )
        except (ValueError, RecursionError) as exc:
            raise MalformedError(f"update metadata is not valid JSON: {exc}", code="malformed") from None
        if not isinstance(obj, dict):
            raise MalformedError("update metadata must be a JSON object", code="malformed")
        out: dict[str, float] = {}
        for k, v in obj.items():
            if not isinstance(v, float):  # _metric_int/_metric_float turned every number into a float
                raise MalformedError(f"update metadata {k[:64]!r} must be a number", code="malformed")
            key = k[:64]
            if key in out:
                raise MalformedError(f"update metadata repeats the key {key!r}", code="malformed")
            out[key] = v
        return out


_MAX_METRIC = 1e15
"""The largest magnitude of a training metric (loss, accuracy, duration, steps ...) a device may report."""
_MAX_METRIC_DIGITS = 16


class _MetricRefused(ValueError):
    """Raised inside ``json.loads`` hooks; turned into MalformedError by :meth:`OpenedUpdate.metrics`."""


def _metric_value(value: float, text: str) -> float:
    if not (math.isfinite(value) and abs(value) <= _MAX_METRIC):
        raise _MetricRefused(f"metric value {text[:32]} is not a finite number of magnitude <= {_MAX_METRIC:g}")
    return value


def _metric_int(text: str) -> float:
    if len(text.lstrip("-")) > _MAX_METRIC_DIGITS:  # before int(): no big-integer arithmetic on hostile input
        raise _MetricRefused(f"metric integer of {len(text)} characters is too long")
    return _metric_value(float(int(text)), text)


def _metric_float(text: str) -> float:
    return _metric_value(float(text), text)


def _metric_constant(text: str) -> float:
    raise _MetricRefused(f"metric value {text} is not a finite number")


def _metric_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _MetricRefused(f"update metadata repeats the key {k[:64]!r}")
        out[k] = v
    return out


def open_update(
    channel: Channel,
    device_key: VerifyKey,
    frame: bytes,
    round: int,
    *,
    base_model_hash: str | None = None,
    max_envelope: int = DEFAULT_MAX_ENVELOPE,
) -> OpenedUpdate:
    """Coordinator: open the UPDATE frame of ``round`` from the session of ``device_key``.

    Checks, cheapest first: framing, envelope structure and suite, the device key id (before the
    signature), the signature, the signed round (WrongRoundError), the base model when
    ``base_model_hash`` is given (StaleModelError), then the size and the SHA-256 of the blob.
    """
    env_bytes, blob = unpack_signed(channel.open(Frame.UPDATE, round, frame), max_envelope)
    env = _envelope(channel, env_bytes, MsgType.UPDATE, max_envelope)
    if env.get_key_id(Field.DEVICE_KEY_ID) != device_key.key_id:
        raise AuthError("update names another device", code="device_mismatch")
    env.verify(device_key)
    if env.get_int(Field.ROUND) != round:
        raise WrongRoundError(f"update signed for round {env.get_int(Field.ROUND)}, expected {round}")
    if base_model_hash is not None and env.get(Field.BASE_MODEL_HASH).hex() != base_model_hash:
        raise StaleModelError("update was trained on another base model", code="stale_model")
    hashed = _check_payload(env, blob, Field.UPDATE_HASH)
    return OpenedUpdate(env, hashed.data, hashed)


# ---------------------------------------------------------------------------- receipt
def sign_update_ack(
    identity: SigningKey, suite: Suite, update: OpenedUpdate, status: AckStatus, timestamp: int
) -> bytes:
    """Coordinator: a signed UPDATE_ACK of a verified update (device key id, round, update hash,
    status, unix time)."""
    return SignedEnvelope.sign(
        suite,
        MsgType.UPDATE_ACK,
        {
            Field.DEVICE_KEY_ID: update.envelope.get(Field.DEVICE_KEY_ID),
            Field.ROUND: update.envelope.get(Field.ROUND),
            Field.UPDATE_HASH: update.envelope.get(Field.UPDATE_HASH),
            Field.STATUS: bytes([AckStatus(status)]),
            Field.TIMESTAMP: u64(timestamp),
        },
        identity,
    ).to_bytes()


def seal_receipt(channel: Channel, round: int, ack: bytes, body: bytes) -> bytes:
    """Coordinator: seal an UPDATE_ACK envelope and the receipt JSON as the RECEIPT frame of ``round``."""
    return channel.seal(Frame.RECEIPT, round, pack_signed(ack, body))


def open_receipt(
    channel: Channel,
    server_key: VerifyKey,
    frame: bytes,
    device_key_id: str,
    update: SignedUpdate,
    *,
    max_envelope: int = DEFAULT_MAX_ENVELOPE,
) -> tuple[AckStatus, memoryview]:
    """Device: open the RECEIPT frame answering ``update``; verify the coordinator's signature and that
    the ack names this device, round and update hash (AuthError ``bad_receipt`` otherwise).

    Returns the signed status and the receipt JSON that follows the envelope.
    """
    status, _, body = open_signed_receipt(channel, server_key, frame, device_key_id, update, max_envelope=max_envelope)
    return status, body


def open_signed_receipt(
    channel: Channel,
    server_key: VerifyKey,
    frame: bytes,
    device_key_id: str,
    update: SignedUpdate,
    *,
    max_envelope: int = DEFAULT_MAX_ENVELOPE,
) -> tuple[AckStatus, bytes, memoryview]:
    """:func:`open_receipt`, also returning the verified UPDATE_ACK envelope bytes (to store, so the
    receipt can be re-verified later with :func:`check_update_ack`)."""
    env_bytes, body = unpack_signed(channel.open(Frame.RECEIPT, update.round, frame), max_envelope)
    env = _envelope(channel, env_bytes, MsgType.UPDATE_ACK, max_envelope).verify(server_key)
    return check_update_ack(env, device_key_id, update.round, update.update_hash), env_bytes, body


def check_update_ack(env: SignedEnvelope, device_key_id: str, round: int, update_hash: str) -> AckStatus:
    """The signed status of a verified UPDATE_ACK ``env``, once it names this device, round and update
    hash (AuthError ``bad_receipt`` otherwise; MalformedError for an unknown status)."""
    if (
        env.get_key_id(Field.DEVICE_KEY_ID) != device_key_id
        or env.get_int(Field.ROUND) != round
        or env.get(Field.UPDATE_HASH).hex() != update_hash
    ):
        raise AuthError("receipt does not acknowledge this update", code="bad_receipt")
    try:
        return AckStatus(env.get_int(Field.STATUS))
    except ValueError:
        raise MalformedError(f"unknown ack status 0x{env.get_int(Field.STATUS):02x}", code="malformed") from None


# ---------------------------------------------------------------------------- receipt proof
def seal_proof_request(channel: Channel, round: int) -> bytes:
    """Device: ask for the ledger entry of ``round`` and this device's inclusion proof in it."""
    return channel.seal(Frame.PROOF_REQUEST, 0, canonical_json({"round": round}))


def open_proof_request(channel: Channel, frame: bytes) -> int:
    """Coordinator: the round a PROOF_REQUEST asks about (exactly ``{"round": <int >= 1>}``)."""
    rnd = _small_json_int(channel.open(Frame.PROOF_REQUEST, 0, frame), "round", "proof request")
    if rnd < 1:
        raise MalformedError("a proof request names a round >= 1", code="malformed")
    return rnd


def seal_proof(channel: Channel, round: int, body: bytes) -> bytes:
    """Coordinator: seal a proof answer (:func:`qflare.protocol.proofs.encode_answer`) as the PROOF frame
    of ``round``."""
    return channel.seal(Frame.PROOF, round, body)


def open_proof(channel: Channel, frame: bytes, round: int) -> bytes:
    """Device: open the PROOF frame of ``round`` (a frame for another round fails authentication);
    checking what it holds is :func:`qflare.protocol.proofs.verify_answer`'s."""
    return channel.open(Frame.PROOF, round, frame)


# ---------------------------------------------------------------------------- secure aggregation
SECAGG_FRAMES = frozenset(
    {
        Frame.SECAGG_CONFIG_REQUEST,
        Frame.SECAGG_CONFIG,
        Frame.SECAGG_RELAY_REQUEST,
        Frame.SECAGG_RELAY,
        Frame.SECAGG_ADVERTISE,
        Frame.SECAGG_SHARES,
        Frame.SECAGG_MASKED,
        Frame.SECAGG_UNMASK,
        Frame.SECAGG_CONSISTENCY,
        Frame.SECAGG_ACK,
    }
)


def pack_parts(parts: list[bytes] | tuple[bytes, ...]) -> bytes:
    """``u32 count || (u32 length || bytes) * count``."""
    out = [_LEN.pack(len(parts))]
    for part in parts:
        out += [_LEN.pack(len(part)), part]
    return b"".join(out)


def unpack_parts(data: bytes | memoryview, *, min_parts: int = 0, max_parts: int = 1 << 16) -> list[bytes]:
    """The parts of :func:`pack_parts`' encoding; MalformedError unless it is exactly one such list of
    ``min_parts..max_parts`` parts (a count beyond what the bytes could hold is refused before any copy)."""
    view = memoryview(data)
    if len(view) < _LEN.size:
        raise MalformedError("part list shorter than its count", code="truncated")
    (count,) = _LEN.unpack_from(view, 0)
    if not min_parts <= count <= max_parts or count * _LEN.size > len(view) - _LEN.size:
        raise MalformedError(f"part list of {count} parts, expected {min_parts}..{max_parts}", code="malformed")
    parts: list[bytes] = []
    at = _LEN.size
    for _ in range(count):
        if len(view) - at < _LEN.size:
            raise MalformedError("part list truncated", code="truncated")
        (n,) = _LEN.unpack_from(view, at)
        at += _LEN.size
        if len(view) - at < n:
            raise MalformedError("part list truncated", code="truncated")
        parts.append(bytes(view[at : at + n]))
        at += n
    if at != len(view):
        raise MalformedError("trailing bytes after the part list", code="malformed")
    return parts


def seal_parts(channel: Channel, frame: Frame, round: int, parts: list[bytes] | tuple[bytes, ...]) -> bytes:
    """Seal a secure-aggregation frame of ``round`` carrying ``parts``."""
    if frame not in SECAGG_FRAMES:
        raise ConfigError(f"{frame!r} is not a secure-aggregation frame", code="bad_argument")
    return channel.seal(frame, round, pack_parts(parts))


def open_parts(
    channel: Channel, frame: Frame, round: int, data: bytes, *, min_parts: int = 0, max_parts: int = 1 << 16
) -> list[bytes]:
    """Open a secure-aggregation frame of ``round`` and split its parts (see :func:`unpack_parts`)."""
    if frame not in SECAGG_FRAMES:
        raise ConfigError(f"{frame!r} is not a secure-aggregation frame", code="bad_argument")
    return unpack_parts(channel.open(frame, round, data), min_parts=min_parts, max_parts=max_parts)
