"""A device's side of a secure-aggregation round: four phases, each one call.

``advertise()`` → ``share_keys(adverts)`` → ``masked_input(relayed, update, weight)`` → ``unmask(request)``.
Each call checks everything it receives before it changes any state (a refused call leaves the device
where it was), and each phase runs once.  The state between calls is :meth:`SecAggClient.to_json`
(it holds the round's secrets: store it like the device key, mode 0600) and
:meth:`SecAggClient.from_json` resumes it.

What an honest device refuses (``unmask_refused`` unless noted):
* adverts, manifests or requests not signed by the roster key (``bad_signature``), for another round or
  configuration (``wrong_round``), from non-neighbours, or duplicated;
* shares that do not open (``bad_mac``), whose digest or commitment does not match (``bad_share``);
* an unmask request that names a peer both as survivor and as dropped (it would reveal both the
  self-mask share and the pairwise-key share of that peer), leaves out a peer it holds shares of, says
  this device dropped, names fewer than ``t`` survivors, or differs from a request already answered.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qflare.crypto.identity import SigningKey
from qflare.crypto.kem import EphemeralKem
from qflare.crypto.suite import sha256
from qflare.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    ProtocolError,
    ReplayError,
    RoundError,
    ValidationError,
    WrongRoundError,
)
from qflare.secagg.graph import neighbours
from qflare.secagg.keys import (
    KEM_SEED_LEN,
    SecAggConfig,
    kem_from_seed,
    mask_kem,
    open_sealed,
    pair_seed,
    seal_to,
    self_mask_seed,
)
from qflare.secagg.messages import (
    ManifestEntry,
    SecAggField,
    SecAggMessage,
    SecAggMsg,
    ShareKind,
    ShareRecord,
    check_header,
    decode_entries,
    decode_indices,
    encode_entries,
    encode_share_records,
    share_commitment,
)
from qflare.secagg.prg import Vector, add_mask, sub_mask
from qflare.secagg.quantize import quantize
from qflare.secagg.shamir import SHARE_LEN, encode_share, split

__all__ = ["ClientPhase", "SecAggClient"]

F = SecAggField


class ClientPhase(enum.StrEnum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


@dataclass
class _Held:
    """What a neighbour dealt this device: its two shares, and the edge's pair seed."""

    self_share: bytes
    pair_share: bytes
    pair_seed: bytes


@dataclass
class _State:
    phase: ClientPhase
    b: bytes
    msk: bytes
    channel_seed: bytes
    publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (channel, mask) public
    held: dict[int, _Held] = field(default_factory=dict)
    answered: tuple[bytes, bytes] | None = None  # (SHA-256 of the signed request body, response)


class SecAggClient:
    """Device ``index`` (1..n) of the round ``config``, signing with its identity key."""

    def __init__(self, config: SecAggConfig, index: int, identity: SigningKey, *, _state: _State | None = None) -> None:
        if index not in config.roster:
            raise ConfigError(f"index {index} is not in the roster", code=ErrorCode.BAD_INDEX)
        if config.roster[index] != identity.public:
            raise ConfigError("identity key is not the roster's key for this index", code=ErrorCode.BAD_INDEX)
        self.config = config
        self.index = index
        self._identity = identity
        self._neighbours = neighbours(config.params, config.graph_seed)[index]
        self._s = _state or _State(
            ClientPhase.NEW, secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(KEM_SEED_LEN)
        )
        self._channel: EphemeralKem = kem_from_seed(config.suite, self._s.channel_seed)
        self._mask: EphemeralKem = mask_kem(config, self._s.msk)

    @property
    def phase(self) -> ClientPhase:
        return self._s.phase

    @property
    def neighbours(self) -> frozenset[int]:
        return self._neighbours

    def _expect(self, phase: ClientPhase) -> None:
        if self._s.phase is not phase:
            raise RoundError(f"device is in phase {self._s.phase}, not {phase}", code=ErrorCode.BAD_TRANSITION)

    def _sign(self, mt: SecAggMsg, fields: dict[SecAggField, bytes]) -> bytes:
        base = {F.ROUND: self.config.round.to_bytes(8, "big"), F.SESSION: self.config.session}
        return SecAggMessage.build(self.config.suite, mt, {**base, **fields}, self._identity).raw

    def _from_peer(self, raw: bytes, mt: SecAggMsg, allowed: frozenset[int] | set[int]) -> tuple[SecAggMessage, int]:
        msg = SecAggMessage.parse(raw, expected=mt)
        check_header(msg, self.config)
        peer = msg.get_int(F.FROM)
        if peer not in allowed:
            raise ProtocolError(f"{mt.name} from {peer}, not a neighbour here", code=ErrorCode.UNMASK_REFUSED)
        msg.verify(self.config.roster[peer])
        return msg, peer

    # -- phase 1 ---------------------------------------------------------------------------------------
    def advertise(self) -> bytes:
        """ADVERTISE: this round's channel and mask public keys, signed by the identity key."""
        self._expect(ClientPhase.NEW)
        raw = self._sign(
            SecAggMsg.ADVERTISE,
            {
                F.FROM: self.index.to_bytes(4, "big"),
                F.CHANNEL_PUBLIC: self._channel.public_bytes(),
                F.MASK_PUBLIC: self._mask.public_bytes(),
            },
        )
        self._s.phase = ClientPhase.ADVERTISED
        return raw

    # -- phase 2 ---------------------------------------------------------------------------------------
    def share_keys(self, adverts: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
        """``(MANIFEST, SHARE entries)`` for the neighbours whose signed adverts were relayed."""
        self._expect(ClientPhase.ADVERTISED)
        publics: dict[int, tuple[bytes, bytes]] = {}
        for raw in adverts:
            msg, peer = self._from_peer(raw, SecAggMsg.ADVERTISE, self._neighbours)
            if peer in publics:
                raise ReplayError(f"two adverts from {peer}", code=ErrorCode.DUPLICATE_SUBMISSION)
            publics[peer] = (msg.get(F.CHANNEL_PUBLIC), msg.get(F.MASK_PUBLIC))
        t = self.config.params.t
        if len(publics) < t:
            raise RoundError(f"only {len(publics)} neighbours advertised, threshold is {t}", code="secagg_aborted")
        peers = sorted(publics)
        self_shares = split(self._s.b, t, peers)
        pair_shares = split(self._s.msk, t, peers)
        session, me = self.config.session, self.index
        entries: list[bytes] = []
        manifest: list[ManifestEntry] = []
        for v in peers:
            s_self, s_pair = encode_share(self_shares[v]), encode_share(pair_shares[v])
            ct_c, sealed = seal_to(self.config, b"shares", me, v, publics[v][0], s_self + s_pair)
            fields = {
                F.ROUND: self.config.round.to_bytes(8, "big"),
                F.SESSION: session,
                F.FROM: me.to_bytes(4, "big"),
                F.TO: v.to_bytes(4, "big"),
                F.CT_CHANNEL: ct_c,
                F.SEALED_SHARES: sealed,
            }
            if me < v:
                r = pair_seed(self.config, self._s.msk, me, v)
                fields[F.CT_MASK], fields[F.SEALED_PAIR] = seal_to(self.config, b"pair", me, v, publics[v][1], r)
            entry = SecAggMessage.build(self.config.suite, SecAggMsg.SHARE, fields, None).raw
            entries.append(entry)
            manifest.append(
                ManifestEntry(
                    v,
                    sha256(entry),
                    share_commitment(session, ShareKind.SELF_MASK, me, v, s_self),
                    share_commitment(session, ShareKind.PAIRWISE, me, v, s_pair),
                )
            )
        raw = self._sign(SecAggMsg.MANIFEST, {F.FROM: me.to_bytes(4, "big"), F.ENTRIES: encode_entries(manifest)})
        self._s.publics = publics
        self._s.phase = ClientPhase.SHARED
        return raw, entries

    # -- phase 3 ---------------------------------------------------------------------------------------
    def _open_entry(self, manifest_raw: bytes, entry_raw: bytes) -> tuple[int, _Held]:
        msg, peer = self._from_peer(manifest_raw, SecAggMsg.MANIFEST, set(self._s.publics))
        mine = [e for e in decode_entries(msg.get(F.ENTRIES)) if e.to == self.index]
        if not isinstance(entry_raw, bytes) or len(mine) != 1 or mine[0].digest != sha256(entry_raw):
            raise AuthError(f"share entry from {peer} is not the one its manifest signs", code=ErrorCode.BAD_SHARE)
        entry = SecAggMessage.parse(entry_raw, expected=SecAggMsg.SHARE)
        check_header(entry, self.config)
        if entry.get_int(F.FROM) != peer or entry.get_int(F.TO) != self.index:
            raise AuthError("share entry names other devices than its manifest", code=ErrorCode.BAD_SHARE)
        plain = open_sealed(
            self.config, b"shares", peer, self.index, self._channel, entry.get(F.CT_CHANNEL), entry.get(F.SEALED_SHARES)
        )
        s_self, s_pair = plain[:SHARE_LEN], plain[SHARE_LEN:]
        session = self.config.session
        if (
            share_commitment(session, ShareKind.SELF_MASK, peer, self.index, s_self) != mine[0].commit_self
            or share_commitment(session, ShareKind.PAIRWISE, peer, self.index, s_pair) != mine[0].commit_pair
        ):
            raise AuthError(f"shares from {peer} do not match its commitments", code=ErrorCode.BAD_SHARE)
        if peer < self.index:
            r = open_sealed(
                self.config, b"pair", peer, self.index, self._mask, entry.get(F.CT_MASK), entry.get(F.SEALED_PAIR)
            )
        else:
            r = pair_seed(self.config, self._s.msk, self.index, peer)
        return peer, _Held(s_self, s_pair, r)

    def masked_input(
        self, relayed: Sequence[tuple[bytes, bytes]], update: npt.NDArray[np.floating], weight: int
    ) -> tuple[bytes, bytes]:
        """``(MASKED_INPUT, vector bytes)``: the quantised update plus self mask plus pair masks."""
        self._expect(ClientPhase.SHARED)
        held: dict[int, _Held] = {}
        for manifest_raw, entry_raw in relayed:
            peer, h = self._open_entry(manifest_raw, entry_raw)
            if peer in held:
                raise ReplayError(f"two share entries from {peer}", code=ErrorCode.DUPLICATE_SUBMISSION)
            held[peer] = h
        if len(held) < self.config.params.t:
            raise RoundError(f"only {len(held)} neighbours shared keys", code=ErrorCode.SECAGG_ABORTED)
        if np.asarray(update).size != self.config.length:
            raise ValidationError(
                f"update has {np.asarray(update).size} values, round takes {self.config.length}",
                code=ErrorCode.BAD_SHAPE,
            )
        y: Vector = quantize(update, weight, self.config.quant)
        add_mask(y, self_mask_seed(self.config, self._s.b))
        for peer, h in held.items():
            (add_mask if self.index < peer else sub_mask)(y, h.pair_seed)
        blob = y.astype("<u4", copy=False).tobytes()
        raw = self._sign(
            SecAggMsg.MASKED_INPUT,
            {
                F.FROM: self.index.to_bytes(4, "big"),
                F.VECTOR_HASH: sha256(blob),
                F.LENGTH: y.shape[0].to_bytes(8, "big"),
            },
        )
        self._s.held = held
        self._s.phase = ClientPhase.MASKED
        return raw, blob

    # -- phase 4 ---------------------------------------------------------------------------------------
    def unmask(self, request: bytes) -> bytes:
        """UNMASK_RESPONSE to the coordinator's signed request (answered once; the same request again gets
        the same answer)."""
        if self._s.phase is not ClientPhase.DONE:
            self._expect(ClientPhase.MASKED)
        msg = SecAggMessage.parse(request, expected=SecAggMsg.UNMASK_REQUEST)
        check_header(msg, self.config)
        msg.verify(self.config.coordinator)
        asked = sha256(msg.body)  # what is asked, whatever (randomised) signature it carries
        if self._s.answered is not None:
            if self._s.answered[0] == asked:
                return self._s.answered[1]
            raise ProtocolError("an unmask request was already answered this round", code=ErrorCode.UNMASK_REFUSED)
        survivors = set(decode_indices(msg.get(F.SURVIVORS), "survivors"))
        dropped = set(decode_indices(msg.get(F.DROPPED), "dropped"))
        both = survivors & dropped
        if both:
            raise ProtocolError(
                f"request asks for both kinds of share of {sorted(both)[:5]}", code=ErrorCode.UNMASK_REFUSED
            )
        if self.index not in survivors:
            raise ProtocolError("request says this device dropped", code=ErrorCode.UNMASK_REFUSED)
        if len(survivors) < self.config.params.t or max(survivors | dropped) > self.config.params.n:
            raise ProtocolError("request names too few survivors or unknown devices", code=ErrorCode.UNMASK_REFUSED)
        missing = set(self._s.held) - survivors - dropped
        if missing:
            raise ProtocolError(f"request leaves out peers {sorted(missing)[:5]}", code=ErrorCode.UNMASK_REFUSED)
        records = [
            ShareRecord(peer, ShareKind.SELF_MASK, h.self_share)
            if peer in survivors
            else ShareRecord(peer, ShareKind.PAIRWISE, h.pair_share)
            for peer, h in sorted(self._s.held.items())
        ]
        raw = self._sign(
            SecAggMsg.UNMASK_RESPONSE,
            {
                F.FROM: self.index.to_bytes(4, "big"),
                F.REQUEST_HASH: sha256(msg.raw),
                F.SHARES: encode_share_records(records),
            },
        )
        self._s.answered = (asked, raw)
        self._s.phase = ClientPhase.DONE
        return raw

    # -- persistence -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The device's round state (secrets included) as JSON."""
        s = self._s
        doc: dict[str, Any] = {
            "version": 1,
            "session": self.config.session.hex(),
            "index": self.index,
            "phase": s.phase.value,
            "b": s.b.hex(),
            "msk": s.msk.hex(),
            "channel_seed": s.channel_seed.hex(),
            "publics": {str(p): [c.hex(), m.hex()] for p, (c, m) in s.publics.items()},
            "held": {str(p): [h.self_share.hex(), h.pair_share.hex(), h.pair_seed.hex()] for p, h in s.held.items()},
            "answered": None if s.answered is None else [s.answered[0].hex(), s.answered[1].hex()],
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, config: SecAggConfig, identity: SigningKey, text: str) -> SecAggClient:
        """Resume from :meth:`to_json`; ValidationError if it is not such a state for this round."""
        try:
            doc = json.loads(text)
            if doc["version"] != 1 or bytes.fromhex(doc["session"]) != config.session:
                raise WrongRoundError("saved state is for another round", code=ErrorCode.WRONG_ROUND)
            state = _State(
                ClientPhase(doc["phase"]),
                bytes.fromhex(doc["b"]),
                bytes.fromhex(doc["msk"]),
                bytes.fromhex(doc["channel_seed"]),
                {int(p): (bytes.fromhex(c), bytes.fromhex(m)) for p, (c, m) in doc["publics"].items()},
                {
                    int(p): _Held(bytes.fromhex(a), bytes.fromhex(b), bytes.fromhex(c))
                    for p, (a, b, c) in doc["held"].items()
                },
                None
                if doc["answered"] is None
                else (bytes.fromhex(doc["answered"][0]), bytes.fromhex(doc["answered"][1])),
            )
            index = int(doc["index"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValidationError(f"not a secure-aggregation device state: {exc}", code=ErrorCode.BAD_JSON) from None
        if len(state.b) != 32 or len(state.msk) != 32 or len(state.channel_seed) != KEM_SEED_LEN:
            raise ValidationError("secure-aggregation state has secrets of the wrong size", code=ErrorCode.BAD_JSON)
        return cls(config, index, identity, _state=state)
