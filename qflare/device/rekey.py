"""Following a coordinator key rotation: from the pinned key to the key the coordinator now serves.

When ``/v1/identity`` serves a key that is not the pin, the device fetches ``/v1/rotations`` from the
same coordinator and moves its pin only if the chain verifies from its pinned key to the served key
(:func:`qflare.crypto.rotation.follow_chain`: both signatures on every rotation, continuity, no
revoked key used after its revocation, and an extension of the chain it verified before).  The new pin
is written only after that, atomically (:meth:`DeviceState.move_pin`).  The device keeps its own key
and enrollment: nothing is re-enrolled.

A coordinator that serves no chain, or one that does not start from the pinned key, is refused with
the original ``server_key_mismatch`` (a wrong server or a wrong pin, as before rotations existed); a
chain that names the pinned key but does not verify is refused with its specific code
(``bad_rotation_record``, ``bad_rotation_signature``, ``rotation_chain_broken``,
``coordinator_key_revoked``) and the pin stays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..crypto import Suite, VerifyKey
from ..crypto.rotation import MAX_CHAIN_RECORDS, KeyRotation, follow_chain, parse_record
from ..errors import AuthError, ErrorCode, MalformedError, NotFoundError, QflareError
from .state import DeviceState, pin_server_key, served_key

__all__ = ["IDENTITY_PATH", "MAX_ROTATIONS_RESPONSE", "ROTATIONS_PATH", "follow_rotations", "repin"]

IDENTITY_PATH, ROTATIONS_PATH = "/v1/identity", "/v1/rotations"
MAX_ROTATIONS_RESPONSE = 2 * 1024 * 1024
"""The largest ``/v1/rotations`` answer a device reads (32 ML-DSA-87 rotations in hex fit)."""


def _records(doc: Any) -> list[bytes] | None:
    """The records of a ``/v1/rotations`` document; None when it serves no chain at all."""
    if not isinstance(doc, Mapping) or "records" not in doc:
        return None
    items = doc["records"]
    if not isinstance(items, list):
        raise MalformedError("'records' is not a list", code=ErrorCode.BAD_ROTATION_RECORD)
    if len(items) > MAX_CHAIN_RECORDS:
        raise MalformedError(
            f"{len(items)} rotation records exceed {MAX_CHAIN_RECORDS}", code=ErrorCode.BAD_ROTATION_RECORD
        )
    out = []
    for n, item in enumerate(items, 1):
        try:
            out.append(bytes.fromhex(item))
        except (ValueError, TypeError):
            raise MalformedError(f"rotation record {n} is not hex", code=ErrorCode.BAD_ROTATION_RECORD) from None
    return out


def follow_rotations(
    state: DeviceState,
    identity: Mapping[str, Any],
    rotations: Any,
    mismatch: AuthError | None = None,
    pinned: str | None = None,
) -> tuple[VerifyKey, Suite]:
    """Verify ``rotations`` (the ``/v1/rotations`` JSON) from the pin (``pinned``, else the stored one) to
    the key ``identity`` serves, then move the pin; the new key and suite.  See the module docstring for
    what is refused."""
    pinned = state.pin(pinned)
    key, suite = served_key(identity)
    mismatch = mismatch or AuthError(
        f"coordinator key {key.key_id[:16]}... does not match the pinned key id {pinned[:16]}...",
        code=ErrorCode.SERVER_KEY_MISMATCH,
    )
    records = _records(rotations)
    if not records:
        raise mismatch
    if not any(isinstance(r, KeyRotation) and r.old_key.key_id == pinned for r in map(parse_record, records)):
        raise AuthError(
            f"{mismatch.message}; its rotation chain does not start from the pinned key", code=mismatch.code
        )
    known = [r.raw for r in state.rotation_chain().records]
    chain = follow_chain(records, pinned, key, known=known)
    state.move_pin(chain, key)
    return key, suite


def repin(state: DeviceState, get_json: Callable[[str], Any], pinned: str | None = None) -> tuple[VerifyKey, Suite]:
    """The coordinator's key for this device: the pinned one (``pinned``, else the stored pin), or the one
    a verified rotation leads to.  Nothing is stored when the served key is the pin (the caller stores it
    once the session verifies, :meth:`DeviceState.save_server_key`); a verified move is stored.

    ``get_json(path)`` fetches a JSON document from the coordinator (e.g. ``HttpTransport.get_json``)."""
    pinned = state.pin(pinned)
    identity = get_json(IDENTITY_PATH)
    try:
        return pin_server_key(identity, pinned)
    except AuthError as exc:
        if exc.code != ErrorCode.SERVER_KEY_MISMATCH:
            raise
        mismatch = exc
    try:
        rotations = get_json(ROTATIONS_PATH)
    except NotFoundError:  # a coordinator from before rotations: nothing to follow
        raise mismatch from None
    except QflareError as exc:
        if exc.unauthenticated and exc.http_status == 404:
            raise mismatch from None
        raise
    return follow_rotations(state, identity, rotations, mismatch, pinned)
