"""A round's public configuration, the per-round secrets of a device, and the sealed pair channel.

**Round configuration and session.**  :class:`SecAggConfig` is what every participant knows before the
round: round number, suite, ``(n, k, t)``, graph seed, quantisation, vector length, the roster (index ->
ML-DSA identity key of each device) and the coordinator's key.  ``session`` is SHA-256 over all of it;
every phase message carries and is checked against it, so nothing replays across rounds or
configurations.

**Per-round secrets of device u** (fresh from the OS CSPRNG each round):

* ``b_u`` (32 bytes): the self-mask seed; the mask is AES-256-CTR under
  ``HKDF(b_u, salt=session, info="qflare/secagg/v1/self-mask")``.  Shamir-shared.
* ``msk_u`` (32 bytes): the pairwise master key.  Shamir-shared.  From it, by HKDF with the session as
  salt: the *mask KEM key pair* (64-byte ML-KEM-768 seed d||z and an X25519 scalar; public half signed in
  the advert), and, for every neighbour ``v > u``, the pairwise mask seed
  ``r_uv = HKDF(msk_u, info="qflare/secagg/v1/pair" || u || v)``.
* a channel KEM key pair (independent random seeds, never shared): encrypts shares to u.

**Who encapsulates to whom.**  For every edge ``{u, v}`` with ``u < v``, u encapsulates to v's *mask*
key and sends ``r_uv`` sealed under the resulting key: that is the one pairwise secret of the edge
(lower index adds ``+PRG(r_uv)``, higher adds ``-PRG(r_uv)``).  Whichever side drops, the coordinator
can rebuild ``r_uv`` from ``t`` shares of that side's ``msk``: directly if it is ``u``; if it is ``v``,
by re-deriving v's mask KEM key and decapsulating the relayed ciphertext.  Every device also
encapsulates to each neighbour's *channel* key to seal its two shares for it; that key is never shared,
so rebuilding a dropped device's ``msk`` reveals no shares it held.

Sealed payloads use the project's key schedule (:func:`qflare.crypto.kem.derive_session_keys`, hybrid
ML-KEM + X25519, transcript hash = SHA-256 of purpose, session, both indices, the recipient's public key
and the ciphertext) and AES-256-GCM with a zero nonce (each key seals exactly one message), with the
transcript hash as associated data.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qflare.crypto.identity import VerifyKey
from qflare.crypto.kem import EphemeralKem, Role, derive_session_keys, encapsulate, hkdf_sha256
from qflare.crypto.suite import DEFAULT_SUITE, Suite, sha256
from qflare.errors import AuthError, ConfigError, ErrorCode
from qflare.secagg.params import SecAggParams
from qflare.secagg.quantize import QuantSpec

__all__ = [
    "KEM_SEED_LEN",
    "SecAggConfig",
    "check_kem_public",
    "kem_from_seed",
    "mask_kem",
    "open_sealed",
    "pair_seed",
    "seal_to",
    "self_mask_commitment",
    "self_mask_seed",
]

KEM_SEED_LEN = 64 + 32  # ML-KEM seed d||z, X25519 scalar
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class SecAggConfig:
    """Everything public about one secure-aggregation round (see the module docs)."""

    round: int
    params: SecAggParams
    graph_seed: bytes
    quant: QuantSpec
    length: int  # model coordinates; the masked vector has length + 1 words (the weight last)
    roster: Mapping[int, VerifyKey]
    coordinator: VerifyKey
    suite: Suite = DEFAULT_SUITE
    session: bytes = field(init=False, repr=False)
    """SHA-256 binding every public parameter of the round (computed)."""

    def __post_init__(self) -> None:
        if not 0 <= self.round < 2**63:
            raise ConfigError("round must be a non-negative u63", code=ErrorCode.BAD_ARGUMENT)
        if len(self.graph_seed) != 32:
            raise ConfigError("graph seed must be 32 bytes", code=ErrorCode.BAD_SEED)
        if not 1 <= self.length <= 2**31:
            raise ConfigError("vector length must be in 1..2^31", code=ErrorCode.BAD_ARGUMENT)
        if sorted(self.roster) != list(range(1, self.params.n + 1)):
            raise ConfigError(f"roster must index devices 1..{self.params.n}", code=ErrorCode.BAD_ARGUMENT)
        if self.params.n > self.quant.max_devices:
            raise ConfigError("more devices than the quantisation has headroom for", code=ErrorCode.BAD_ARGUMENT)
        keys = [self.coordinator, *self.roster.values()]
        if any(k.alg != self.suite.sig for k in keys) or len({k.raw for k in keys}) != len(keys):
            raise ConfigError("roster keys must be distinct keys of the suite's algorithm", code="key_alg_mismatch")
        object.__setattr__(self, "roster", MappingProxyType(dict(self.roster)))
        q, p = self.quant, self.params
        material = b"".join(
            [
                b"qflare/secagg/v1/session",
                self.round.to_bytes(8, "big"),
                self.suite.to_bytes(),
                struct.pack(">IIIIQ", p.n, p.k, p.t, p.corrupt, self.length),
                self.graph_seed,
                struct.pack(">dII", q.clip, q.max_devices, q.max_weight),
                self.coordinator.key_id_bytes,
                *(self.roster[i].key_id_bytes for i in range(1, p.n + 1)),
            ]
        )
        object.__setattr__(self, "session", sha256(material))


def check_kem_public(suite: Suite, public: bytes) -> None:
    """MalformedError unless ``public`` is a hybrid KEM public key one can encapsulate to (a trial
    encapsulation: ML-KEM's key check and X25519's low-order-point refusal)."""
    encapsulate(suite, public)


def kem_from_seed(suite: Suite, seed: bytes) -> EphemeralKem:
    """A hybrid KEM key pair from 96 seed bytes (secret, fresh per round, used for this round only)."""
    if len(seed) != KEM_SEED_LEN:
        raise ConfigError(f"KEM seed must be {KEM_SEED_LEN} bytes", code=ErrorCode.BAD_SEED)
    return EphemeralKem.unsafe_from_seeds(suite, seed[:64], seed[64:] if suite.x25519 else None)


def mask_kem(config: SecAggConfig, msk: bytes) -> EphemeralKem:
    """Device's mask KEM key pair, derived from its pairwise master key (rebuildable from its shares)."""
    return kem_from_seed(config.suite, hkdf_sha256(msk, config.session, b"qflare/secagg/v1/mask-kem", KEM_SEED_LEN))


def pair_seed(config: SecAggConfig, msk_low: bytes, low: int, high: int) -> bytes:
    """``r_{low,high}``: the mask seed of an edge, chosen by its lower index from its master key."""
    if not low < high:
        raise ConfigError("the lower index chooses the pair seed", code=ErrorCode.BAD_ARGUMENT)
    return hkdf_sha256(msk_low, config.session, b"qflare/secagg/v1/pair" + _U32.pack(low) + _U32.pack(high))


def self_mask_seed(config: SecAggConfig, b: bytes) -> bytes:
    return hkdf_sha256(b, config.session, b"qflare/secagg/v1/self-mask")


def self_mask_commitment(config: SecAggConfig, index: int, b: bytes) -> bytes:
    """SHA-256 commitment to device ``index``'s self-mask seed (in its signed advert; ``b`` is 256 fresh
    bits, so the commitment hides it): the coordinator checks a rebuilt ``b`` against it."""
    return sha256(b"qflare/secagg/v1/self-mask-commit", config.session, _U32.pack(index), b)


def _transcript(purpose: bytes, session: bytes, sender: int, recipient: int, public: bytes, ct: bytes) -> bytes:
    return sha256(b"qflare/secagg/v1/" + purpose, session, _U32.pack(sender), _U32.pack(recipient), public, ct)


def seal_to(
    config: SecAggConfig, purpose: bytes, sender: int, recipient: int, recipient_public: bytes, plaintext: bytes
) -> tuple[bytes, bytes]:
    """Encapsulate to ``recipient_public`` and seal ``plaintext``: ``(ciphertext, sealed)``."""
    ct, shared = encapsulate(config.suite, recipient_public)
    th = _transcript(purpose, config.session, sender, recipient, recipient_public, ct)
    key = derive_session_keys(shared, th, Role.SERVER).send_key  # the encapsulator's direction
    return ct, AESGCM(key).encrypt(bytes(12), plaintext, th)


def open_sealed(
    config: SecAggConfig, purpose: bytes, sender: int, recipient: int, kem: EphemeralKem, ct: bytes, sealed: bytes
) -> bytes:
    """Decapsulate ``ct`` with the recipient's ``kem`` and open ``sealed``; AuthError ``bad_mac`` if forged."""
    shared = kem.decapsulate(ct)
    th = _transcript(purpose, config.session, sender, recipient, kem.public_bytes(), ct)
    key = derive_session_keys(shared, th, Role.CLIENT).recv_key
    try:
        return AESGCM(key).decrypt(bytes(12), sealed, th)
    except InvalidTag:
        raise AuthError(
            f"sealed {purpose.decode()} from {sender} to {recipient} does not open", code="bad_mac"
        ) from None
