"""The storage the protocol needs, as an interface (the shape of Flower's ``LinkState``).

:class:`~qflare.protocol.Coordinator` and :class:`~qflare.protocol.RoundManager` depend on these two
protocols only; :class:`qflare.storage.Store` (SQLAlchemy, SQLite or PostgreSQL) and
:class:`qflare.storage.BlobStore` (content-addressed files) or :class:`qflare.storage.S3BlobStore` (an
S3-compatible bucket) implement them.  Each method is one transaction: it either happens completely or
raises and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from ..errors import QflareError
from ..hashed import HashedBytes
from ..ledger import LedgerEntry
from .records import (
    DeviceRow,
    LedgerRow,
    ModelRow,
    NewUpdate,
    PendingHandshakeRow,
    RoundRow,
    SecAggRoundRow,
    SecurityEventRow,
    SessionRow,
    SharedSessionRow,
    TokenRow,
    UpdateRow,
)

__all__ = ["BlobSink", "CoordinatorStore"]


class CoordinatorStore(Protocol):
    """Devices, tokens, sessions, rounds, updates, model versions, the provenance ledger and security events."""

    # -- identity ---------------------------------------------------------------------------
    def create_tokens(self, count: int, ttl: timedelta, label: str = "") -> list[str]: ...

    def get_token(self, token: str) -> TokenRow | None:
        """The token's row, looked up by its hash (the cheap check before any signature work)."""
        ...

    def enroll_device(
        self, token: str, device_id: str, sig_alg: str, sig_public_key: bytes, enrollment_record: bytes
    ) -> DeviceRow: ...

    def get_device(self, device_id: str) -> DeviceRow | None: ...

    def device_status(self, device_id: str) -> str | None: ...

    def list_devices(self, status: str | None = None) -> list[DeviceRow]: ...

    def revoke_device(self, device_id: str, reason: str) -> DeviceRow: ...

    def quarantine_device(self, device_id: str, reason: str) -> DeviceRow:
        """Active -> quarantined (kept if already quarantined; RevokedError if revoked)."""
        ...

    def reinstate_device(self, device_id: str) -> DeviceRow:
        """Quarantined -> active (an active device is left as it is; RevokedError if revoked)."""
        ...

    def add_session(
        self, session_id: str, device_id: str, expires_at: datetime, *, created_at: datetime | None = None
    ) -> SessionRow: ...

    # -- shared sessions (CoordinatorConfig.shared_sessions; qflare.protocol.shared_state) -----
    def add_shared_session(
        self,
        session_id: str,
        device_id: str,
        expires_at: datetime,
        *,
        wrapped_keys: bytes,
        created_at: datetime | None = None,
    ) -> SessionRow:
        """A session with its wrapped keys and fresh counters; the device's other open sessions are closed."""
        ...

    def shared_session(self, session_id: str, *, with_keys: bool = False) -> SharedSessionRow | None:
        """The session, its counters and its device's status (one indexed read)."""
        ...

    def advance_session(self, session_id: str, counter: int, *, now: datetime) -> int | None:
        """ONE atomic step: last received := ``counter`` if above it (open, unexpired session), and the
        reserved send counter returned; None (nothing changed) otherwise."""
        ...

    def live_device_ids(self, *, now: datetime, seen_since: datetime) -> set[str]: ...

    def hello_seen(self, digest: str) -> bool: ...

    def record_hello(self, digest: str, *, expires_at: datetime, now: datetime, purge: bool = False) -> bool:
        """False when already recorded (atomic: one of concurrent callers gets True); ``purge`` first
        deletes the expired digests and pending handshakes."""
        ...

    def put_pending_handshake(
        self, hello_hash: str, device_id: str, state: bytes, *, started_at: datetime, expires_at: datetime
    ) -> None: ...

    def take_pending_handshake(self, hello_hash: str) -> PendingHandshakeRow | None:
        """Remove and return it: of concurrent callers exactly one gets it."""
        ...

    def count_pending_handshakes(self, *, now: datetime) -> int: ...

    def purge_shared_state(self, *, now: datetime) -> int: ...

    # -- rounds and updates -----------------------------------------------------------------
    def open_round(
        self,
        round_number: int,
        base_model_hash: str,
        selected: Sequence[str],
        min_participants: int,
        quorum: int,
        deadline: datetime,
    ) -> RoundRow: ...

    def current_round(self) -> RoundRow | None: ...

    def get_round(self, round_number: int) -> RoundRow | None: ...

    def list_rounds(self, limit: int | None = None) -> list[RoundRow]: ...

    def set_round_state(
        self, round_number: int, from_state: str, to_state: str, *, ledger: LedgerEntry | None = None, **fields: Any
    ) -> RoundRow:
        """Compare-and-set; with ``ledger`` (only to "failed"), append the round's entry in the same transaction."""
        ...

    def record_update(
        self,
        round_number: int,
        device_id: str,
        update_hash: str,
        base_model_hash: str,
        num_examples: int,
        signature: bytes,
        metrics: dict[str, Any],
        *,
        envelope: bytes | None = None,
    ) -> tuple[UpdateRow, bool]: ...

    def record_updates(self, batch: Sequence[NewUpdate]) -> list[tuple[UpdateRow, bool] | QflareError]:
        """Several ``record_update`` in one transaction (a group commit): one outcome per entry, its
        result or the QflareError refusing it; raises (recording none) if the transaction fails."""
        ...

    def extend_round_deadline(self, round_number: int, deadline: datetime) -> RoundRow: ...

    def referenced_blobs(self) -> set[str]: ...

    def updates_for_round(self, round_number: int) -> list[UpdateRow]: ...

    def count_updates(self, round_number: int | None = None) -> int:
        """Updates recorded for ``round_number`` (in all rounds when None)."""
        ...

    # -- model versions ---------------------------------------------------------------------
    def add_model_version(
        self,
        version: int,
        round_number: int | None,
        model_hash: str,
        parent_hash: str | None,
        signature: bytes,
        metrics: dict[str, Any],
    ) -> ModelRow: ...

    def publish_model(
        self,
        round_number: int,
        version: int,
        model_hash: str,
        signature: bytes,
        metrics: dict[str, Any],
        *,
        ledger: LedgerEntry | None = None,
    ) -> tuple[RoundRow, ModelRow]:
        """Close the round, add the model version and append ``ledger`` (its signed entry): one transaction."""
        ...

    def latest_model(self) -> ModelRow | None: ...

    def get_model(self, version: int) -> ModelRow | None: ...

    # -- provenance ledger ------------------------------------------------------------------
    def append_ledger(self, entry: LedgerEntry) -> LedgerRow:
        """Append an entry that closes no round; ReplayError ``ledger_conflict`` unless it extends the head."""
        ...

    def append_key_records(
        self, build: Callable[[LedgerRow | None, frozenset[str]], Sequence[LedgerEntry]]
    ) -> list[LedgerRow]:
        """Append ``build(head, record hashes already in the ledger)`` under the ledger lock, one transaction."""
        ...

    def last_ledger_entry(self) -> LedgerRow | None: ...

    def ledger_entries(self, after_seq: int = 0, limit: int = 1000) -> list[LedgerRow]:
        """Up to ``limit`` entries with ``seq > after_seq``, ascending (paging)."""
        ...

    def ledger_entry_for_round(self, round_number: int) -> LedgerRow | None: ...

    # -- audit ------------------------------------------------------------------------------
    def record_security_event(
        self,
        reason: str,
        detail: str,
        device_id: str | None = None,
        session_id: str | None = None,
        remote_addr: str | None = None,
    ) -> SecurityEventRow: ...

    # -- secure aggregation -----------------------------------------------------------------
    def save_secagg_round(
        self,
        round_number: int,
        *,
        config: dict[str, Any],
        state: str,
        total: bytes | None,
        phase_deadline: datetime,
        unmasking: bool = False,
    ) -> None:
        """Write an open secure round's state (one transaction; ``total`` None keeps the stored sum;
        ``unmasking`` stamps, once, that the masks are about to be removed)."""
        ...

    def get_secagg_round(self, round_number: int) -> SecAggRoundRow | None: ...


class BlobSink(Protocol):
    """Content-addressed bytes: ``put`` returns (SHA-256 hex, size) and raises StorageFullError when it
    cannot write; ``get`` verifies the hash on read; ``digests`` lists what is stored; ``delete``
    removes one blob (garbage collection of blobs no row refers to)."""

    def put(self, data: bytes | memoryview | HashedBytes, expected_sha256: str | None = None) -> tuple[str, int]:
        """``data`` as :class:`~qflare.hashed.HashedBytes`: written under its carried digest, not hashed again."""
        ...

    def get(self, sha256: str) -> bytes: ...

    def digests(self) -> Iterator[str]: ...

    def delete(self, sha256: str) -> bool: ...

    def written_at(self, sha256: str) -> float | None:
        """When the blob was last written (Unix seconds; a rewrite of the same bytes moves it), None if absent."""
        ...
