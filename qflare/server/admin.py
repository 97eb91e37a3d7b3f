"""Administrator routes (``/v1/admin/...``): mint enrollment tokens, revoke, quarantine and reinstate devices,
read the audit trail (devices, security events filtered by reason/device/time, rounds).  Every listing has a bounded page size.

Every route needs ``Authorization: Bearer <admin token>`` (compared in constant time); a missing token
is 401, a wrong one 403, both with code ``admin_required`` and both recorded as security events.  The
credentials are checked before the request body is read, and a POST body must be ``application/json``
(else 415 ``unsupported_media_type``, the administrator's own error: answered, not recorded as an event).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import AdminAuthError, NotFoundError, ValidationError
from ..storage import DeviceRow, SecurityEventRow
from .gate import RequestGate
from .limits import require_media_type
from .runtime import ServerRuntime
from .views import device_view as _device
from .views import event_view as _event
from .views import rounds_view

__all__ = [
    "QuarantineRequest",
    "RevokeRequest",
    "TokenRequest",
    "admin_router",
    "parse_json",
    "quarantine_device",
    "reinstate_device",
    "revoke_device",
]

_bearer = HTTPBearer(auto_error=False, description="The admin token (QFLARE_ADMIN_TOKEN or DATA_DIR/admin.token)")
_MAX_TTL_S = 365 * 24 * 3600.0
_JSON = "application/json"


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, le=10_000, description="How many one-time tokens")
    ttl_s: float = Field(3600.0, gt=0, le=_MAX_TTL_S, allow_inf_nan=False, description="Validity in seconds")
    label: str = Field("", max_length=200, description="Free text stored with the tokens")


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class QuarantineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {_JSON: {"schema": model.model_json_schema()}}}}


def parse_json(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except PydanticValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
        raise ValidationError("; ".join(parts), code="validation_error") from None


def _enrolled(runtime: ServerRuntime, device_id: str) -> None:
    if runtime.store.get_device(device_id) is None:
        raise NotFoundError(f"no device {device_id[:80]!r} is enrolled", code="unknown_device")


def _reread(runtime: ServerRuntime, device_id: str) -> DeviceRow:
    row = runtime.store.get_device(device_id)
    assert row is not None
    return row


def revoke_device(runtime: ServerRuntime, device_id: str, reason: str) -> DeviceRow:
    """Revoke an enrolled device (its sessions end at once); NotFoundError ``unknown_device`` otherwise."""
    _enrolled(runtime, device_id)
    runtime.coordinator.revoke(device_id, reason)
    return _reread(runtime, device_id)


def quarantine_device(runtime: ServerRuntime, device_id: str, reason: str) -> DeviceRow:
    """An operator's quarantine of an enrolled device (recorded as ``operator: <reason>``)."""
    _enrolled(runtime, device_id)
    runtime.coordinator.quarantine(device_id, f"operator: {reason}")
    return _reread(runtime, device_id)


def reinstate_device(runtime: ServerRuntime, device_id: str) -> DeviceRow:
    """Reinstate a quarantined device (its reputation starts afresh)."""
    _enrolled(runtime, device_id)
    runtime.coordinator.reinstate(device_id)
    return _reread(runtime, device_id)


def admin_router(runtime: ServerRuntime, gate: RequestGate) -> APIRouter:
    store, coordinator, small = runtime.store, runtime.coordinator, runtime.config.http.small_body_bytes

    async def require_admin(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        await gate.admit(request)
        header = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else None
        try:
            runtime.admin.check(header)
        except AdminAuthError as exc:
            raise await gate.refuse(exc, request) from None

    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])

    @router.post("/tokens", summary="Mint one-time enrollment tokens", openapi_extra=_json_body(TokenRequest))
    async def create_tokens(request: Request) -> dict[str, Any]:
        require_media_type(request, _JSON)
        req: TokenRequest = parse_json(TokenRequest, await gate.body(request, small))
        tokens = await run_in_threadpool(coordinator.create_tokens, req.count, req.ttl_s, req.label)
        expires = datetime.now(UTC) + timedelta(seconds=req.ttl_s)
        return {"tokens": tokens, "expires_at": expires.isoformat(), "label": req.label}

    @router.post(
        "/devices/{device_id}/revoke",
        summary="Revoke a device (its sessions end at once)",
        openapi_extra=_json_body(RevokeRequest),
    )
    async def revoke(device_id: str, request: Request) -> dict[str, Any]:
        require_media_type(request, _JSON)
        req: RevokeRequest = parse_json(RevokeRequest, await gate.body(request, small))

        return _device(await run_in_threadpool(revoke_device, runtime, device_id, req.reason))

    @router.post(
        "/devices/{device_id}/quarantine",
        summary="Quarantine a device (it stays connected but is not selected; its updates are refused)",
        openapi_extra=_json_body(QuarantineRequest),
    )
    async def quarantine(device_id: str, request: Request) -> dict[str, Any]:
        require_media_type(request, _JSON)
        req: QuarantineRequest = parse_json(QuarantineRequest, await gate.body(request, small))

        return _device(await run_in_threadpool(quarantine_device, runtime, device_id, req.reason))

    @router.post(
        "/devices/{device_id}/reinstate", summary="Reinstate a quarantined device (its reputation starts afresh)"
    )
    async def reinstate(device_id: str) -> dict[str, Any]:
        return _device(await run_in_threadpool(reinstate_device, runtime, device_id))

    @router.get("/devices", summary="Enrolled devices (oldest first, at most `limit`)")
    async def devices(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        status: Annotated[Literal["active", "revoked", "quarantined"] | None, Query()] = None,
    ) -> dict[str, Any]:
        rows = await run_in_threadpool(store.list_devices, status)
        return {"devices": [_device(d) for d in rows[:limit]], "total": len(rows)}

    @router.get("/events", summary="Security events, newest first, optionally filtered")
    async def events(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        reason: Annotated[str | None, Query(min_length=1, max_length=64, description="Only this reason code")] = None,
        device_id: Annotated[str | None, Query(min_length=1, max_length=128, description="Only this device")] = None,
        since: Annotated[datetime | None, Query(description="Only events at or after this time (ISO 8601)")] = None,
    ) -> dict[str, Any]:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)  # a time without a zone is read as UTC

        def work() -> list[SecurityEventRow]:
            return store.security_events(limit, device_id=device_id, reason=reason, since=since)

        return {"events": [_event(e) for e in await run_in_threadpool(work)]}

    @router.get("/rounds", summary="The newest rounds (at most `limit`), oldest first, with their results")
    async def rounds(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        return {"rounds": await run_in_threadpool(rounds_view, store, limit)}

    return router
