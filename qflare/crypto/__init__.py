"""QFLARE cryptography: post-quantum identities, hybrid sessions, canonical signed envelopes, and the
recipes of the round protocol (:mod:`qflare.crypto.payloads`).

Everything is built on pyca/cryptography (ML-DSA, ML-KEM, X25519, HKDF-SHA256, AES-256-GCM); there is no
fallback to weaker or classical-only primitives.  Call :func:`require_primitives` at start-up.

Typical use::

    client = ClientHandshake(device_key, pinned_server_key)
    server = ServerHandshake(server_key, directory.get)
    reply = server.respond(client.start())
    finish, device_channel = client.finish(reply)
    coordinator_channel = server.finish(finish)
    signed = sign_update(device_key, device_channel.suite, round, base_hash_hex, n_examples, blob)
    update = open_update(coordinator_channel, device_key.public, seal_update(device_channel, signed), round)
"""

from qflare.crypto.channel import DEFAULT_MAX_PLAINTEXT, Channel
from qflare.crypto.envelope import (
    DEFAULT_MAX_ENVELOPE,
    Field,
    MsgType,
    SignedEnvelope,
    context_for,
    decode_fields,
    encode_fields,
)
from qflare.crypto.handshake import ClientHandshake, DeviceResolver, ServerHandshake, handshake_in_process
from qflare.crypto.identity import SigningKey, VerifyKey
from qflare.crypto.kem import EphemeralKem, Role, SessionKeys, SharedSecrets, derive_session_keys, encapsulate
from qflare.crypto.payloads import (
    AckStatus,
    Frame,
    OpenedUpdate,
    SignedUpdate,
    open_global_model,
    open_model_request,
    open_proof,
    open_proof_request,
    open_receipt,
    open_task,
    open_task_request,
    open_update,
    pack_signed,
    seal_model,
    seal_model_request,
    seal_receipt,
    seal_task,
    seal_task_request,
    seal_update,
    sign_global_model,
    sign_update,
    sign_update_ack,
    unpack_signed,
)
from qflare.crypto.suite import DEFAULT_POLICY, DEFAULT_SUITE, HIGH_SUITE, Policy, Suite, require_primitives

__all__ = [
    "DEFAULT_MAX_ENVELOPE",
    "DEFAULT_MAX_PLAINTEXT",
    "DEFAULT_POLICY",
    "DEFAULT_SUITE",
    "HIGH_SUITE",
    "AckStatus",
    "Channel",
    "ClientHandshake",
    "DeviceResolver",
    "EphemeralKem",
    "Field",
    "Frame",
    "MsgType",
    "OpenedUpdate",
    "Policy",
    "Role",
    "ServerHandshake",
    "SessionKeys",
    "SharedSecrets",
    "SignedEnvelope",
    "SignedUpdate",
    "SigningKey",
    "Suite",
    "VerifyKey",
    "context_for",
    "decode_fields",
    "derive_session_keys",
    "encapsulate",
    "encode_fields",
    "handshake_in_process",
    "open_global_model",
    "open_model_request",
    "open_proof",
    "open_proof_request",
    "open_receipt",
    "open_task",
    "open_task_request",
    "open_update",
    "pack_signed",
    "require_primitives",
    "seal_model",
    "seal_model_request",
    "seal_receipt",
    "seal_task",
    "seal_task_request",
    "seal_update",
    "sign_global_model",
    "sign_update",
    "sign_update_ack",
    "unpack_signed",
]
