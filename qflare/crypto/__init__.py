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
from qflare.crypto.payloads import (
    open_global_model,
    open_update,
    pack_signed,
    seal_global_model,
    seal_update,
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
    "Channel",
    "ClientHandshake",
    "DeviceResolver",
    "EphemeralKem",
    "Field",
    "MsgType",
    "Policy",
    "Role",
    "ServerHandshake",
    "SessionKeys",
    "SharedSecrets",
    "SignedEnvelope",
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
    "open_update",
    "pack_signed",
    "require_primitives",
    "seal_global_model",
    "seal_update",
    "sign_update_ack",
    "unpack_signed",
]
