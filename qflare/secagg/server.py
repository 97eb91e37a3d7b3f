"""The coordinator's side of a secure-aggregation round: collect, check, relay, unmask once.

Phases (``SecAggServer.phase``)::

    ADVERTISE --close_advertise--> SHARE_KEYS --close_shares--> MASKED_INPUT --close_masked--> CONSISTENCY
        --close_consistency--> UNMASK --finish--> DONE
                                    (any close/finish with too few devices or shares --> ABORTED)

The consistency round (Bonawitz et al. 2017, malicious-server variant): ``close_masked`` signs the
request naming U3; every device of U3 signs U3 (CONSISTENCY) and the coordinator relays the signatures
(``close_consistency``, ``consistency_proof``) with the request; a device answers the request only with
valid signatures on that U3 from ``params.quorum`` (more than ``(n + corrupt) / 2``) devices, so every
honest device answers for the one same U3.

``U1 ⊇ U2 ⊇ U3`` are the devices whose advert, shares and masked input were accepted.  Every message is
checked before anything is recorded (signature under the roster key, round and session, sender in the
right set, no second different message; shares against their dealer's signed commitments), so a refused
message changes nothing.  ``close_*`` and ``finish`` raise ``RoundError`` with code ``secagg_aborted``
when fewer than ``t`` devices remain, or when a device's mask cannot be removed for lack of ``t`` valid
shares; the round is then ABORTED and no aggregate exists.  ``finish`` runs once: a second call is refused
(the coordinator never unmasks twice).

Persistence: :meth:`SecAggServer.snapshot` gives the round's state as JSON plus the running sum's bytes,
:meth:`SecAggServer.restore` rebuilds it by re-checking every recorded message (signatures, sets,
commitments) with the same code that accepted it.  The survivor set and the signed unmask request are
part of the state from ``close_masked`` on, so a restarted coordinator cannot close the masked phase
again with another set; a round restored as DONE or ABORTED refuses ``finish``.

The coordinator never holds a device's update in the clear: it adds masked vectors into one running sum
(mod 2^32) as they arrive, then subtracts the self masks of U3 and the pair masks between U3 and the
devices of ``U2 - U3`` (rebuilt from their pairwise master keys).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from qflare.crypto.identity import SigningKey
from qflare.crypto.suite import sha256
from qflare.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    MalformedError,
    QflareError,
    ReplayError,
    RoundError,
    ValidationError,
)
from qflare.secagg.graph import neighbours
from qflare.secagg.keys import (
    SecAggConfig,
    check_kem_public,
    mask_kem,
    open_sealed,
    pair_seed,
    self_mask_commitment,
    self_mask_seed,
)
from qflare.secagg.messages import (
    ManifestEntry,
    SecAggField,
    SecAggMessage,
    SecAggMsg,
    ShareKind,
    check_header,
    decode_entries,
    decode_share_records,
    encode_indices,
    share_commitment,
    survivors_hash,
)
from qflare.secagg.prg import MAX_WORKERS, Vector, apply_masks, default_workers
from qflare.secagg.quantize import dequantize
from qflare.secagg.shamir import decode_share, reconstruct

__all__ = ["SecAggResult", "SecAggServer", "ServerPhase"]

F = SecAggField


class ServerPhase(enum.StrEnum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum (Z_{2^32} words, weight last), its dequantised weighted mean, and who is in it."""

    total: Vector
    mean: npt.NDArray[np.float64]
    weight_sum: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass
class _Shared:
    manifest: bytes
    entries: dict[int, SecAggMessage]  # recipient -> SHARE
    commitments: dict[int, ManifestEntry]


@dataclass
class _Collected:
    adverts: dict[int, SecAggMessage] = field(default_factory=dict)
    shared: dict[int, _Shared] = field(default_factory=dict)
    masked: dict[int, bytes] = field(default_factory=dict)  # sender -> MASKED_INPUT bytes
    signatures: dict[int, bytes] = field(default_factory=dict)  # signer -> CONSISTENCY bytes
    responses: dict[int, bytes] = field(default_factory=dict)
    shares: dict[tuple[int, ShareKind], dict[int, int]] = field(default_factory=dict)  # (dealer, kind) -> {holder: y}


class SecAggServer:
    """One round of secure aggregation as the coordinator runs it (``key`` signs the unmask request;
    ``workers`` threads regenerate the masks to remove in :meth:`finish`, default
    :func:`~qflare.secagg.prg.default_workers`, the usable CPUs up to 8: on the shared 2-core VM two
    threads took 0.30-0.37 s against 0.45-0.49 s for one, for ``finish`` at n = 100 with 10% dropout,
    and gained nothing while other processes kept both cores busy; docs/secure-aggregation.md section 8)."""

    def __init__(self, config: SecAggConfig, key: SigningKey, *, workers: int | None = None) -> None:
        if key.public != config.coordinator:
            raise ConfigError("key is not the round's coordinator key", code=ErrorCode.BAD_ARGUMENT)
        self.config = config
        self._key = key
        self.workers = default_workers() if workers is None else workers
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be in 1..{MAX_WORKERS}", code=ErrorCode.BAD_ARGUMENT)
        self._graph: Mapping[int, frozenset[int]] = neighbours(config.params, config.graph_seed)
        self.phase = ServerPhase.ADVERTISE
        self._c = _Collected()
        self._sum: Vector = np.zeros(config.length + 1, dtype=np.uint32)
        self._request: bytes | None = None
        self.u1: frozenset[int] = frozenset()
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()

    @property
    def request(self) -> bytes | None:
        """The signed UNMASK_REQUEST once :meth:`close_masked` made it: what every survivor signs in the
        CONSISTENCY phase and answers in UNMASK (relayed again after a restart)."""
        return self._request

    @property
    def signers(self) -> frozenset[int]:
        """The devices of U3 whose CONSISTENCY signature was accepted (those that may answer in UNMASK)."""
        return frozenset(self._c.signatures)

    def received(self) -> frozenset[int]:
        """The devices whose message of the current phase was accepted (none once DONE or ABORTED)."""
        c = self._c
        by_phase: dict[ServerPhase, Iterable[int]] = {
            ServerPhase.ADVERTISE: c.adverts,
            ServerPhase.SHARE_KEYS: c.shared,
            ServerPhase.MASKED_INPUT: c.masked,
            ServerPhase.CONSISTENCY: c.signatures,
            ServerPhase.UNMASK: c.responses,
        }
        return frozenset(by_phase.get(self.phase, ()))

    def masked_inputs(self) -> dict[int, bytes]:
        """Sender -> its accepted signed MASKED_INPUT (without the vector, which is in the running sum)."""
        return dict(self._c.masked)

    # -- helpers ---------------------------------------------------------------------------------------
    def _expect(self, phase: ServerPhase) -> None:
        if self.phase is not phase:
            raise RoundError(f"round is in phase {self.phase}, not {phase}", code=ErrorCode.BAD_TRANSITION)

    def _abort(self, why: str) -> RoundError:
        self.phase = ServerPhase.ABORTED
        return RoundError(f"secure aggregation aborted: {why}", code=ErrorCode.SECAGG_ABORTED)

    def _need(self, members: frozenset[int], what: str) -> None:
        """Abort unless ``t`` devices of ``members`` each keep ``t`` neighbours in ``members`` (a device with
        fewer cannot share its secrets ``t``-of-its-neighbours and refuses to go on)."""
        t = self.config.params.t
        viable = [u for u in members if len(self._graph[u] & members) >= t]
        if len(viable) < t:
            raise self._abort(f"{len(viable)} of the devices that {what} keep {t} neighbours, threshold is {t}")

    def _signed(self, raw: bytes, mt: SecAggMsg, allowed: frozenset[int] | range) -> tuple[SecAggMessage, int]:
        msg = SecAggMessage.parse(raw, expected=mt)
        check_header(msg, self.config)
        sender = msg.get_int(F.FROM)
        if sender not in allowed:
            raise RoundError(f"{mt.name} from device {sender}, which is not in this phase", code="not_selected")
        msg.verify(self.config.roster[sender])
        return msg, sender

    @staticmethod
    def _first(store: Mapping[int, bytes], sender: int, raw: bytes) -> bool:
        """True if new; False for the same bytes again; ReplayError for different bytes."""
        return SecAggServer._new(store.get(sender), sender, raw)

    @staticmethod
    def _new(before: bytes | None, sender: int, raw: bytes) -> bool:
        """:meth:`_first` given what ``sender`` sent before in this phase (None: nothing)."""
        if before is None:
            return True
        if before == raw:
            return False
        raise ReplayError(f"device {sender} already sent a different message", code=ErrorCode.DUPLICATE_SUBMISSION)

    # -- phase 1 ---------------------------------------------------------------------------------------
    def receive_advert(self, raw: bytes) -> None:
        self._expect(ServerPhase.ADVERTISE)
        msg, sender = self._signed(raw, SecAggMsg.ADVERTISE, range(1, self.config.params.n + 1))
        before = self._c.adverts.get(sender)
        if self._new(None if before is None else before.raw, sender, msg.raw):
            # a key nobody can encapsulate to would make every neighbour's share_keys fail: refuse it here
            check_kem_public(self.config.suite, msg.get(F.CHANNEL_PUBLIC))
            check_kem_public(self.config.suite, msg.get(F.MASK_PUBLIC))
            self._c.adverts[sender] = msg

    def close_advertise(self) -> None:
        self._expect(ServerPhase.ADVERTISE)
        self.u1 = frozenset(self._c.adverts)
        self._need(self.u1, "advertised keys")
        self.phase = ServerPhase.SHARE_KEYS

    def adverts_for(self, index: int) -> list[bytes]:
        """The signed adverts of ``index``'s neighbours in U1 (relayed as they are)."""
        if self.phase is ServerPhase.ADVERTISE or index not in self.u1:
            raise RoundError(f"no adverts for device {index} now", code=ErrorCode.NOT_SELECTED)
        return [self._c.adverts[v].raw for v in sorted(self._graph[index] & self.u1)]

    # -- phase 2 ---------------------------------------------------------------------------------------
    def receive_shares(self, manifest: bytes, entries: Sequence[bytes]) -> None:
        self._expect(ServerPhase.SHARE_KEYS)
        msg, sender = self._signed(manifest, SecAggMsg.MANIFEST, self.u1)
        shared = self._c.shared.get(sender)
        if not self._new(None if shared is None else shared.manifest, sender, msg.raw):
            return
        listed = decode_entries(msg.get(F.ENTRIES))
        want = sorted(self._graph[sender] & self.u1)
        if not isinstance(entries, (list, tuple)):
            raise MalformedError("share entries must be a list of bytes", code=ErrorCode.MALFORMED)
        if [e.to for e in listed] != want or len(entries) != len(listed):
            raise MalformedError(f"device {sender} must share with exactly {want}", code=ErrorCode.MALFORMED)
        by_to: dict[int, SecAggMessage] = {}
        for e, raw in zip(listed, entries, strict=True):
            if not isinstance(raw, bytes) or sha256(raw) != e.digest:
                raise AuthError(f"share entry {sender}->{e.to} is not the one signed", code=ErrorCode.BAD_SHARE)
            entry = SecAggMessage.parse(raw, expected=SecAggMsg.SHARE)
            check_header(entry, self.config)
            if entry.get_int(F.FROM) != sender or entry.get_int(F.TO) != e.to:
                raise AuthError("share entry names other devices than its manifest", code=ErrorCode.BAD_SHARE)
            by_to[e.to] = entry
        self._c.shared[sender] = _Shared(msg.raw, by_to, {e.to: e for e in listed})

    def close_shares(self) -> None:
        self._expect(ServerPhase.SHARE_KEYS)
        self.u2 = frozenset(self._c.shared)
        self._need(self.u2, "shared keys")
        self.phase = ServerPhase.MASKED_INPUT

    def shares_for(self, index: int) -> list[tuple[bytes, bytes]]:
        """``(manifest, entry)`` of every U2 neighbour's share entry addressed to ``index``."""
        if self.phase in (ServerPhase.ADVERTISE, ServerPhase.SHARE_KEYS) or index not in self.u2:
            raise RoundError(f"no shares for device {index} now", code=ErrorCode.NOT_SELECTED)
        return [
            (self._c.shared[u].manifest, self._c.shared[u].entries[index].raw)
            for u in sorted(self._graph[index] & self.u2)
        ]

    # -- phase 3 ---------------------------------------------------------------------------------------
    def receive_masked(self, raw: bytes, vector: bytes) -> None:
        self._expect(ServerPhase.MASKED_INPUT)
        msg, sender = self._signed(raw, SecAggMsg.MASKED_INPUT, self.u2)
        words = self.config.length + 1
        if not isinstance(vector, bytes) or msg.get_int(F.LENGTH) != words or len(vector) != 4 * words:
            raise ValidationError(f"masked input must be {words} words", code=ErrorCode.BAD_SHAPE)
        if sha256(vector) != msg.get(F.VECTOR_HASH):
            raise ValidationError("masked input does not hash to its signed digest", code=ErrorCode.HASH_MISMATCH)
        if self._first(self._c.masked, sender, msg.raw):
            np.add(self._sum, np.frombuffer(vector, dtype="<u4"), out=self._sum)
            self._c.masked[sender] = msg.raw

    def close_masked(self) -> bytes:
        """The signed UNMASK_REQUEST (survivors U3, dropped U2 - U3) for every device of U3, which each signs
        U3 with :meth:`SecAggClient.consistency`; aborts instead when fewer than ``params.quorum`` devices
        are in U3 or some secret that must be rebuilt has fewer than ``t`` holders left in U3."""
        self._expect(ServerPhase.MASKED_INPUT)
        self.u3 = frozenset(self._c.masked)
        self._need(self.u3, "sent masked inputs")
        quorum = self.config.params.quorum
        if len(self.u3) < quorum:
            raise self._abort(f"{len(self.u3)} devices sent masked inputs, the consistency quorum is {quorum}")
        t = self.config.params.t
        for u in sorted(self.u2):  # a secret that could not be rebuilt: abort before any share is revealed
            holders = len(self._graph[u] & self.u3)
            if (u in self.u3 or holders) and holders < t:
                raise self._abort(f"device {u} keeps {holders} neighbours that sent masked inputs, threshold is {t}")
        fields = {
            F.ROUND: self.config.round.to_bytes(8, "big"),
            F.SESSION: self.config.session,
            F.SURVIVORS: encode_indices(sorted(self.u3)),
            F.DROPPED: encode_indices(sorted(self.u2 - self.u3)),
        }
        self._request = SecAggMessage.build(self.config.suite, SecAggMsg.UNMASK_REQUEST, fields, self._key).raw
        self.phase = ServerPhase.CONSISTENCY
        return self._request

    # -- phase 4: consistency check --------------------------------------------------------------------
    def receive_consistency(self, raw: bytes) -> None:
        """A device's signature on U3 (checked: signed by a device of U3, over this round's U3)."""
        self._expect(ServerPhase.CONSISTENCY)
        msg, sender = self._signed(raw, SecAggMsg.CONSISTENCY, self.u3)
        if msg.get(F.SURVIVORS_HASH) != survivors_hash(self.config.session, sorted(self.u3)):
            raise ValidationError(f"device {sender} signed another survivor set", code=ErrorCode.HASH_MISMATCH)
        if self._first(self._c.signatures, sender, msg.raw):
            self._c.signatures[sender] = msg.raw

    def close_consistency(self) -> list[bytes]:
        """The CONSISTENCY signatures to relay with the request to every signer; aborts with fewer than
        ``params.quorum`` of them (no device would answer), or when a secret that must be rebuilt has
        fewer than ``t`` holders among the signers (only they are asked to unmask: abort before any share
        is revealed rather than at ``finish``)."""
        self._expect(ServerPhase.CONSISTENCY)
        quorum = self.config.params.quorum
        if len(self._c.signatures) < quorum:
            raise self._abort(f"{len(self._c.signatures)} devices signed the survivor set, quorum is {quorum}")
        t, signers = self.config.params.t, self.signers
        for u in sorted(self.u2):
            holders = len(self._graph[u] & signers)
            if (u in self.u3 or self._graph[u] & self.u3) and holders < t:
                raise self._abort(
                    f"device {u} keeps {holders} neighbours that signed the survivor set, threshold is {t}"
                )
        self.phase = ServerPhase.UNMASK
        return self.consistency_proof()

    def consistency_proof(self) -> list[bytes]:
        """What ``SecAggClient.unmask`` takes: ``params.quorum`` CONSISTENCY signatures (the lowest signer
        indices; a quorum is all a device needs, and each signature is ~3.4 kB to download)."""
        return [self._c.signatures[i] for i in sorted(self._c.signatures)[: self.config.params.quorum]]

    # -- phase 5 ---------------------------------------------------------------------------------------
    def receive_unmask(self, raw: bytes) -> None:
        self._expect(ServerPhase.UNMASK)
        assert self._request is not None
        msg, sender = self._signed(raw, SecAggMsg.UNMASK_RESPONSE, frozenset(self._c.signatures))
        if not self._first(self._c.responses, sender, msg.raw):
            return
        if msg.get(F.REQUEST_HASH) != sha256(self._request):
            raise ValidationError("unmask response answers another request", code=ErrorCode.HASH_MISMATCH)
        session = self.config.session
        got: list[tuple[int, ShareKind, int]] = []
        for rec in decode_share_records(msg.get(F.SHARES)):
            dealer = rec.peer
            if dealer not in self._graph[sender] or dealer not in self.u2:
                raise AuthError(f"share of {dealer} from {sender}: not its neighbour in U2", code="bad_share")
            kind_wanted = ShareKind.SELF_MASK if dealer in self.u3 else ShareKind.PAIRWISE
            commit = self._c.shared[dealer].commitments.get(sender)
            if rec.kind is not kind_wanted or commit is None:
                raise AuthError(f"share of {dealer} from {sender} is not one that was asked", code="bad_share")
            expected = commit.commit_self if rec.kind is ShareKind.SELF_MASK else commit.commit_pair
            if share_commitment(session, rec.kind, dealer, sender, rec.share) != expected:
                raise AuthError(f"share of {dealer} from {sender} breaks its commitment", code=ErrorCode.BAD_SHARE)
            got.append((dealer, rec.kind, decode_share(rec.share)))
        for dealer, kind, value in got:
            self._c.shares.setdefault((dealer, kind), {})[sender] = value
        self._c.responses[sender] = msg.raw

    # -- persistence -----------------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, bytes]:
        """``(state JSON, running sum bytes)``: every accepted message and the phase."""
        c = self._c
        doc = {
            "version": 2,
            "session": self.config.session.hex(),
            "phase": self.phase.value,
            "adverts": [c.adverts[i].raw.hex() for i in sorted(c.adverts)],
            "shares": [
                [c.shared[i].manifest.hex(), [c.shared[i].entries[to].raw.hex() for to in sorted(c.shared[i].entries)]]
                for i in sorted(c.shared)
            ],
            "masked": [c.masked[i].hex() for i in sorted(c.masked)],
            "request": None if self._request is None else self._request.hex(),
            "signatures": [c.signatures[i].hex() for i in sorted(c.signatures)],
            "responses": [c.responses[i].hex() for i in sorted(c.responses)],
        }
        return json.dumps(doc), self._sum.astype("<u4", copy=False).tobytes()

    @classmethod
    def restore(
        cls, config: SecAggConfig, key: SigningKey, state: str, total: bytes, *, workers: int | None = None
    ) -> SecAggServer:
        """The coordinator of :meth:`snapshot`'s round after a restart (every message checked again)."""
        if not isinstance(state, str) or not isinstance(total, bytes):
            raise ValidationError("a round state is JSON text and the running sum bytes", code=ErrorCode.BAD_JSON)
        try:
            doc = json.loads(state)
            if doc["version"] != 2 or bytes.fromhex(doc["session"]) != config.session:
                raise ValidationError("saved state is for another round", code=ErrorCode.BAD_JSON)
            phase = ServerPhase(doc["phase"])
            adverts = [bytes.fromhex(a) for a in doc["adverts"]]
            shares = [(bytes.fromhex(m), [bytes.fromhex(e) for e in es]) for m, es in doc["shares"]]
            masked = [bytes.fromhex(m) for m in doc["masked"]]
            request = None if doc["request"] is None else bytes.fromhex(doc["request"])
            signatures = [bytes.fromhex(r) for r in doc["signatures"]]
            responses = [bytes.fromhex(r) for r in doc["responses"]]
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise ValidationError(f"not a secure-aggregation round state: {exc}", code=ErrorCode.BAD_JSON) from None
        s = cls(config, key, workers=workers)
        if phase is ServerPhase.ABORTED:
            s.phase = phase
            return s
        order = list(ServerPhase)
        for raw in adverts:
            s.receive_advert(raw)
        if order.index(phase) > order.index(ServerPhase.ADVERTISE):
            s.close_advertise()
        for manifest, entries in shares:
            s.receive_shares(manifest, entries)
        if order.index(phase) > order.index(ServerPhase.SHARE_KEYS):
            s.close_shares()
        if len(total) != 4 * (config.length + 1) or (not masked and any(total)):
            raise ValidationError("saved running sum does not fit the round", code=ErrorCode.BAD_JSON)
        for raw in masked:
            msg, sender = s._signed(raw, SecAggMsg.MASKED_INPUT, s.u2)
            s._c.masked[sender] = msg.raw
        s._sum = np.frombuffer(total, dtype="<u4").astype(np.uint32)
        if order.index(phase) > order.index(ServerPhase.MASKED_INPUT):
            if request is None:
                raise ValidationError("saved state past the masked phase has no request", code=ErrorCode.BAD_JSON)
            s.u3 = frozenset(s._c.masked)
            msg = SecAggMessage.parse(request, expected=SecAggMsg.UNMASK_REQUEST)
            check_header(msg, config)
            msg.verify(config.coordinator)
            if msg.get(F.SURVIVORS) != encode_indices(sorted(s.u3)) or msg.get(F.DROPPED) != encode_indices(
                sorted(s.u2 - s.u3)
            ):
                raise ValidationError("saved unmask request names other sets", code=ErrorCode.BAD_JSON)
            s._request = request
            s.phase = ServerPhase.CONSISTENCY
            for raw in signatures:
                s.receive_consistency(raw)
        if order.index(phase) > order.index(ServerPhase.CONSISTENCY):
            s.close_consistency()
            for raw in responses:
                s.receive_unmask(raw)
        if phase is ServerPhase.DONE:
            s.phase = ServerPhase.DONE
        return s

    def finish(self) -> SecAggResult:
        """Remove the masks and return the aggregate (once; ``secagg_aborted`` if shares are missing)."""
        self._expect(ServerPhase.UNMASK)
        t = self.config.params.t
        dropped = sorted(self.u2 - self.u3)
        needed = [(u, ShareKind.SELF_MASK) for u in sorted(self.u3)] + [
            (u, ShareKind.PAIRWISE) for u in dropped if self._graph[u] & self.u3
        ]
        for u, kind in needed:
            have = len(self._c.shares.get((u, kind), {}))
            if have < t:
                raise self._abort(f"{have} shares of device {u}'s {kind.name.lower()} secret, threshold is {t}")
        self.phase = ServerPhase.DONE  # from here on the round can only end; never unmask twice
        try:
            return self._unmask(dropped)
        except QflareError:
            self.phase = ServerPhase.ABORTED
            raise

    def _unmask(self, dropped: list[int]) -> SecAggResult:
        t = self.config.params.t
        removals: list[tuple[bytes, bool]] = []  # (seed, True: add its mask back / False: subtract it)
        for u in sorted(self.u3):
            b = reconstruct(self._c.shares[(u, ShareKind.SELF_MASK)], t)
            if self_mask_commitment(self.config, u, b) != self._c.adverts[u].get(F.SELF_COMMIT):
                raise AuthError(f"device {u}'s rebuilt self-mask seed is not the one it committed to", code="bad_share")
            removals.append((self_mask_seed(self.config, b), False))
        for u in dropped:
            if not self._graph[u] & self.u3:
                continue
            msk = reconstruct(self._c.shares[(u, ShareKind.PAIRWISE)], t)
            kem = mask_kem(self.config, msk)
            if kem.public_bytes() != self._c.adverts[u].get(F.MASK_PUBLIC):
                raise AuthError(f"device {u}'s rebuilt key is not the one it advertised", code=ErrorCode.BAD_SHARE)
            for v in sorted(self._graph[u] & self.u3):
                if u < v:  # u chose r_uv; v subtracted it
                    removals.append((pair_seed(self.config, msk, u, v), True))
                else:  # v chose r_vu and sealed it to u's mask key; v added it
                    entry = self._c.shared[v].entries[u]
                    r = open_sealed(self.config, b"pair", v, u, kem, entry.get(F.CT_MASK), entry.get(F.SEALED_PAIR))
                    removals.append((r, False))
        total = self._sum.copy()
        apply_masks(total, removals, workers=self.workers)
        mean, weight_sum = dequantize(total, len(self.u3), self.config.quant)
        return SecAggResult(total, mean, weight_sum, tuple(sorted(self.u3)), tuple(dropped))
