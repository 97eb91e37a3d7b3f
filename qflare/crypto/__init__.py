"""QFLARE cryptography: post-quantum identities, hybrid sessions, canonical signed envelopes.

Everything is built on pyca/cryptography (ML-DSA, ML-KEM, X25519, HKDF-SHA256, AES-256-GCM); there is no
fallback to weaker or classical-only primitives.  Call :func:`require_primitives` at start-up.

Typical use::

    client = ClientHandshake(device_key, pinned_server_key)
    server = ServerHandshake(server_key, directory.get)
    reply = server.respond(client.start())
    finish, device_channel = client.finish(reply)
    coordinator_channel = server.finish(finish)
    frame = seal_update(device_channel, device_key, round, base_hash, n_examples, payload)
    envelope, payload = open_update(coordinator_channel, device_key.public, round, frame)
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
from qflare.crypto.payloads import pack_signed, unpack_signed, open_global_model, open_update, seal_global_model, seal_update, sign_update_ack
from qflare.crypto.suite import DEFAULT_POLICY, DEFAULT_SUITE, HIGH_SUITE, Policy, Suite, require_primitives

__all__ = [
    "pack_signed",
    "unpack_signed",
    "Suite",
    "Policy",
    "DEFAULT_SUITE",
    "HIGH_SUITE",
    "DEFAULT_POLICY",
    "require_primitives",
    "SigningKey",
    "VerifyKey",
    "EphemeralKem",
    "SharedSecrets",
    "SessionKeys",
    "Role",
    "encapsulate",
    "derive_session_keys",
    "Channel",
    "DEFAULT_MAX_PLAINTEXT",
    "MsgType",
    "Field",
    "SignedEnvelope",
    "encode_fields",
    "decode_fields",
    "context_for",
    "DEFAULT_MAX_ENVELOPE",
    "ClientHandshake",
    "ServerHandshake",
    "DeviceResolver",
    "handshake_in_process",
    "seal_update",
    "open_update",
    "seal_global_model",
    "open_global_model",
    "sign_update_ack",
]
