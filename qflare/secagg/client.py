"""A device's side of a secure-aggregation round: five steps, each one call.

``advertise()`` → ``share_keys(adverts)`` → ``masked_input(relayed, update, weight)`` →
``consistency(request)`` → ``unmask(request, signatures)``.
Each call checks everything it receives before it changes any state (a refused call leaves the device
where it was), and each phase runs once.  The state between calls is :meth:`SecAggClient.to_json`
(it holds the round's secrets: store it like the device key, mode 0600) and
:meth:`SecAggClient.from_json` resumes it.

**Hard requirement: persist before you send.**  ``share_keys``, ``masked_input``, ``consistency`` and
``unmask`` each release something that must never be released twice in two versions (a second sharing
dealt with fresh polynomials; a second masked vector under the same masks is a two-time pad; a second
survivor set signed breaks the consistency argument; a second unmask answer reveals the other share
kind).  The device records what it released in its state, so the
caller must write :meth:`SecAggClient.to_json` durably (fsync) *before* the returned bytes leave the
device: pass ``persist=`` (called with the new state; if it raises, nothing is returned) or call
``to_json`` yourself.  A device restored from a state older than what it sent is outside the model.
Resumed in MASKED, ``masked_input`` with the same update returns the same bytes (another update is
refused); resumed after signing or answering, the same request gets the same bytes again.

What an honest device refuses (``unmask_refused`` unless noted):
* adverts, manifests or requests not signed by the roster key (``bad_signature``), for another round or
  configuration (``wrong_round``), from non-neighbours, or duplicated;
* shares that do not open (``bad_mac``), whose digest or commitment does not match (``bad_share``);
* an unmask request that names a peer both as survivor and as dropped (it would reveal both the
  self-mask share and the pairwise-key share of that peer), leaves out a peer it holds shares of, says
  this device dropped, names fewer than ``t`` or than the quorum survivors, or differs from a request
  already answered;
* a survivor set to sign other than the one it already signed (it signs one per round), and an unmask
  request whose survivor set is not the one it signed or does not come with valid signatures on it from
  more than ``(n + corrupt) / 2`` roster devices of that set (the consistency check of Bonawitz et al.
  2017: any two such sets share an honest signer, so every honest device answers for the same set).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
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
    MalformedError,
    ProtocolError,
    ReplayError,
    RoundError,
    ValidationError,
)
from qflare.secagg.device_state import ClientPhase, decode_state, encode_state
from qflare.secagg.device_state import DeviceState as _State
from qflare.secagg.device_state import Held as _Held
from qflare.secagg.graph import neighbours
from qflare.secagg.keys import (
    KEM_SEED_LEN,
    SecAggConfig,
    kem_from_seed,
    mask_kem,
    open_sealed,
    pair_seed,
    seal_to,
    self_mask_commitment,
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
    survivors_hash,
)
from qflare.secagg.prg import Vector, apply_masks
from qflare.secagg.quantize import quantize
from qflare.secagg.shamir import SHARE_LEN, encode_share, split

__all__ = ["ClientPhase", "SecAggClient"]

F = SecAggField
Persist = Callable[[str], None]


def _bytes_list(value: object, what: str, *, pairs: bool = False) -> list[Any]:
    """``value`` as a list of bytes (or of byte pairs); MalformedError otherwise (hostile caller input)."""
    if not isinstance(value, (list, tuple)):
        raise MalformedError(f"{what} must be a list", code=ErrorCode.MALFORMED)
    for item in value:
        ok = (
            isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, bytes) for x in item)
            if pairs
            else isinstance(item, bytes)
        )
        if not ok:
            raise MalformedError(f"{what} must hold {'pairs of ' if pairs else ''}bytes", code=ErrorCode.MALFORMED)
    return list(value)


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
        seed, msk = self._s.channel_seed, self._s.msk
        self._channel: EphemeralKem | None = None if seed is None else kem_from_seed(config.suite, seed)
        self._mask: EphemeralKem | None = None if msk is None else mask_kem(config, msk)

    @property
    def phase(self) -> ClientPhase:
        return self._s.phase

    @property
    def neighbours(self) -> frozenset[int]:
        return self._neighbours

    def _expect(self, phase: ClientPhase) -> None:
        if self._s.phase is not phase:
            raise RoundError(f"device is in phase {self._s.phase}, not {phase}", code=ErrorCode.BAD_TRANSITION)

    def _release(self, raw: bytes, persist: Persist | None) -> bytes:
        if persist is not None:
            persist(self.to_json())
        return raw

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
        """ADVERTISE: this round's channel and mask public keys and a commitment to the self-mask seed,
        signed by the identity key."""
        self._expect(ClientPhase.NEW)
        assert self._channel is not None and self._mask is not None and self._s.b is not None
        raw = self._sign(
            SecAggMsg.ADVERTISE,
            {
                F.FROM: self.index.to_bytes(4, "big"),
                F.CHANNEL_PUBLIC: self._channel.public_bytes(),
                F.MASK_PUBLIC: self._mask.public_bytes(),
                F.SELF_COMMIT: self_mask_commitment(self.config, self.index, self._s.b),
            },
        )
        self._s.phase = ClientPhase.ADVERTISED
        return raw

    # -- phase 2 ---------------------------------------------------------------------------------------
    def share_keys(self, adverts: Sequence[bytes], *, persist: Persist | None = None) -> tuple[bytes, list[bytes]]:
        """``(MANIFEST, SHARE entries)`` for the neighbours whose signed adverts were relayed (persist the
        state before sending: a device re-run from ADVERTISED would deal a second, independent sharing)."""
        self._expect(ClientPhase.ADVERTISED)
        assert self._s.b is not None and self._s.msk is not None
        publics: dict[int, tuple[bytes, bytes]] = {}
        for raw in _bytes_list(adverts, "adverts"):
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
        return self._release(raw, persist), entries

    # -- phase 3 ---------------------------------------------------------------------------------------
    def _open_entry(self, manifest_raw: bytes, entry_raw: bytes) -> tuple[int, _Held]:
        assert self._channel is not None and self._mask is not None and self._s.msk is not None
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

    def _masked_vector(self, update: npt.NDArray[np.floating], weight: int, held: dict[int, _Held]) -> bytes:
        assert self._s.b is not None
        try:
            size = np.asarray(update).size
        except (TypeError, ValueError):  # ragged nested lists and the like
            size = -1
        if size != self.config.length:
            raise ValidationError(
                f"update has {size} values, round takes {self.config.length}", code=ErrorCode.BAD_SHAPE
            )
        y: Vector = quantize(update, weight, self.config.quant)
        masks = [(self_mask_seed(self.config, self._s.b), True)]
        masks += [(h.pair_seed, self.index < peer) for peer, h in held.items()]
        apply_masks(y, masks)
        return y.astype("<u4", copy=False).tobytes()

    def masked_input(
        self,
        relayed: Sequence[tuple[bytes, bytes]],
        update: npt.NDArray[np.floating],
        weight: int,
        *,
        persist: Persist | None = None,
    ) -> tuple[bytes, bytes]:
        """``(MASKED_INPUT, vector bytes)``: the quantised update plus self mask plus pair masks.

        Persist the state (``persist=`` or :meth:`to_json`) before sending.  Called again in MASKED (after a
        restart), it returns the same message and vector for the same update and refuses any other
        (``duplicate_submission``): the same masks never cover two updates."""
        if self._s.phase is ClientPhase.MASKED and self._s.masked is not None:
            sent = SecAggMessage.parse(self._s.masked, expected=SecAggMsg.MASKED_INPUT)
            blob = self._masked_vector(update, weight, self._s.held)
            if sha256(blob) != sent.get(F.VECTOR_HASH):
                raise ReplayError(
                    "a masked input of another update was already produced this round",
                    code=ErrorCode.DUPLICATE_SUBMISSION,
                )
            return self._s.masked, blob
        self._expect(ClientPhase.SHARED)
        held: dict[int, _Held] = {}
        for manifest_raw, entry_raw in _bytes_list(relayed, "relayed shares", pairs=True):
            peer, h = self._open_entry(manifest_raw, entry_raw)
            if peer in held:
                raise ReplayError(f"two share entries from {peer}", code=ErrorCode.DUPLICATE_SUBMISSION)
            held[peer] = h
        if len(held) < self.config.params.t:
            raise RoundError(f"only {len(held)} neighbours shared keys", code=ErrorCode.SECAGG_ABORTED)
        blob = self._masked_vector(update, weight, held)
        raw = self._sign(
            SecAggMsg.MASKED_INPUT,
            {
                F.FROM: self.index.to_bytes(4, "big"),
                F.VECTOR_HASH: sha256(blob),
                F.LENGTH: (len(blob) // 4).to_bytes(8, "big"),
            },
        )
        self._s.held = held
        self._s.masked = raw
        self._s.channel_seed = None  # the shares are opened: the channel key is no longer needed
        self._channel = None
        self._s.phase = ClientPhase.MASKED
        return self._release(raw, persist), blob

    # -- phase 4: consistency check --------------------------------------------------------------------
    def _check_request(self, request: bytes) -> tuple[SecAggMessage, set[int], set[int]]:
        msg = SecAggMessage.parse(request, expected=SecAggMsg.UNMASK_REQUEST)
        check_header(msg, self.config)
        msg.verify(self.config.coordinator)
        survivors = set(decode_indices(msg.get(F.SURVIVORS), "survivors"))
        dropped = set(decode_indices(msg.get(F.DROPPED), "dropped"))
        both = survivors & dropped
        if both:
            raise ProtocolError(
                f"request asks for both kinds of share of {sorted(both)[:5]}", code=ErrorCode.UNMASK_REFUSED
            )
        if self.index not in survivors:
            raise ProtocolError("request says this device dropped", code=ErrorCode.UNMASK_REFUSED)
        p = self.config.params
        if len(survivors) < max(p.t, p.quorum) or max(survivors | dropped) > p.n:
            raise ProtocolError("request names too few survivors or unknown devices", code=ErrorCode.UNMASK_REFUSED)
        missing = set(self._s.held) - survivors - dropped
        if missing:
            raise ProtocolError(f"request leaves out peers {sorted(missing)[:5]}", code=ErrorCode.UNMASK_REFUSED)
        return msg, survivors, dropped

    def consistency(self, request: bytes, *, persist: Persist | None = None) -> bytes:
        """CONSISTENCY: this device's signature on the survivor set of the coordinator's signed request.

        Signed at most once per round, for a set containing this device; the same set again gets the same
        bytes, another set is refused.  Persist the state before sending (see the module docs)."""
        if self._s.signed is not None:
            msg = SecAggMessage.parse(request, expected=SecAggMsg.UNMASK_REQUEST)
            check_header(msg, self.config)
            msg.verify(self.config.coordinator)
            asked = survivors_hash(self.config.session, decode_indices(msg.get(F.SURVIVORS), "survivors"))
            if asked != self._s.signed[0]:
                raise ProtocolError("another survivor set was already signed", code=ErrorCode.UNMASK_REFUSED)
            return self._s.signed[1]
        self._expect(ClientPhase.MASKED)
        _, survivors, _ = self._check_request(request)
        digest = survivors_hash(self.config.session, sorted(survivors))
        raw = self._sign(SecAggMsg.CONSISTENCY, {F.FROM: self.index.to_bytes(4, "big"), F.SURVIVORS_HASH: digest})
        self._s.signed = (digest, raw)
        return self._release(raw, persist)

    def _check_proof(self, digest: bytes, survivors: set[int], signatures: Sequence[bytes]) -> None:
        quorum = self.config.params.quorum
        sigs = _bytes_list(signatures, "consistency signatures")
        if len(sigs) > self.config.params.n:
            raise ProtocolError("more consistency signatures than devices", code=ErrorCode.UNMASK_REFUSED)
        signers: set[int] = set()
        for raw in sigs:
            msg = SecAggMessage.parse(raw, expected=SecAggMsg.CONSISTENCY)
            check_header(msg, self.config)
            signer = msg.get_int(F.FROM)
            if signer not in survivors or signer in signers:
                raise ProtocolError(
                    f"consistency signature of {signer}: not a survivor or repeated", code=ErrorCode.UNMASK_REFUSED
                )
            if msg.get(F.SURVIVORS_HASH) != digest:
                raise ProtocolError(f"device {signer} signed another survivor set", code=ErrorCode.UNMASK_REFUSED)
            msg.verify(self.config.roster[signer])
            signers.add(signer)
        if len(signers) < quorum:
            raise ProtocolError(
                f"{len(signers)} devices signed the survivor set, {quorum} must", code=ErrorCode.UNMASK_REFUSED
            )

    # -- phase 5 ---------------------------------------------------------------------------------------
    def unmask(self, request: bytes, signatures: Sequence[bytes] = (), *, persist: Persist | None = None) -> bytes:
        """UNMASK_RESPONSE to the coordinator's signed request, given the relayed CONSISTENCY signatures on
        its survivor set (answered once; the same request again gets the same answer).

        Refused (``unmask_refused``) unless the request names exactly the survivor set this device signed
        in :meth:`consistency` and ``signatures`` holds valid signatures on it from at least
        ``config.params.quorum`` distinct devices of that set.  The answer is recorded in the state, which
        then keeps nothing but it: persist it (``persist=`` or :meth:`to_json`) before sending."""
        if self._s.phase is ClientPhase.DONE:
            msg = SecAggMessage.parse(request, expected=SecAggMsg.UNMASK_REQUEST)
            check_header(msg, self.config)
            msg.verify(self.config.coordinator)
            assert self._s.answered is not None
            if self._s.answered[0] == sha256(msg.body):
                return self._s.answered[1]
            raise ProtocolError("an unmask request was already answered this round", code=ErrorCode.UNMASK_REFUSED)
        self._expect(ClientPhase.MASKED)
        msg, survivors, _ = self._check_request(request)
        digest = survivors_hash(self.config.session, sorted(survivors))
        if self._s.signed is None or self._s.signed[0] != digest:
            raise ProtocolError(
                "request names a survivor set this device has not signed", code=ErrorCode.UNMASK_REFUSED
            )
        self._check_proof(digest, survivors, signatures)
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
        # keep only what re-sends this answer: every secret, share and seed of the round is dropped
        self._s = _State(ClientPhase.DONE, None, None, None, answered=(sha256(msg.body), raw), signed=self._s.signed)
        self._channel = self._mask = None
        return self._release(raw, persist)

    # -- persistence -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The device's round state (secrets included until DONE) as JSON (:mod:`qflare.secagg.device_state`)."""
        return encode_state(self._s, self.config.session, self.index)

    @classmethod
    def from_json(cls, config: SecAggConfig, identity: SigningKey, text: str) -> SecAggClient:
        """Resume from :meth:`to_json`; ValidationError (``bad_json``) if it is not such a state for this
        round, e.g. DONE without the answer it gave."""
        state, index = decode_state(text, config.session)
        return cls(config, index, identity, _state=state)
