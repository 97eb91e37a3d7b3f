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
from ..storage import DeviceRow, RoundRow, SecurityEventRow
from .gate import RequestGate
from .limits import require_media_type
from .runtime import ServerRuntime

__all__ = ["QuarantineRequest", "RevokeRequest", "TokenRequest", "admin_router"]

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


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except PydanticValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
        raise ValidationError("; ".join(parts), code="validation_error") from None


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _device(d: DeviceRow) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "sig_alg": d.sig_alg,
        "status": d.status,
        "enrolled_at": _iso(d.enrolled_at),
        "revoked_at": _iso(d.revoked_at),
        "revoked_reason": d.revoked_reason,
        "quarantined_at": _iso(d.quarantined_at),
        "quarantine_reason": d.quarantine_reason,
    }


def _event(e: SecurityEventRow) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": _iso(e.at),
        "reason": e.reason,
        "detail": e.detail,
        "device_id": e.device_id,
        "session_id": e.session_id,
        "remote_addr": e.remote_addr,
    }


def _round(r: RoundRow, models: dict[int, dict[str, Any]]) -> dict[str, Any]:
    metrics = models.get(r.round_number, {})
    ev = metrics.get("eval")
    return {
        "round": r.round_number,
        "state": r.state,
        "selected": len(r.selected_devices),
        "min_participants": r.min_participants,
        "updates": metrics.get("updates"),
        "examples": metrics.get("examples"),
        "accuracy": ev.get("accuracy") if isinstance(ev, dict) else None,
        "loss": ev.get("loss") if isinstance(ev, dict) else None,
        "opened_at": _iso(r.opened_at),
        "closed_at": _iso(r.closed_at),
        "seconds": (r.closed_at - r.opened_at).total_seconds() if r.closed_at is not None else None,
        "result_model_sha256": r.result_model_hash,
    }


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
        req: TokenRequest = _parse(TokenRequest, await gate.body(request, small))
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
        req: RevokeRequest = _parse(RevokeRequest, await gate.body(request, small))

        def work() -> DeviceRow:
            if store.get_device(device_id) is None:
                raise NotFoundError(f"no device {device_id[:80]!r} is enrolled", code="unknown_device")
            coordinator.revoke(device_id, req.reason)
            row = store.get_device(device_id)
            assert row is not None
            return row

        return _device(await run_in_threadpool(work))

    @router.post(
        "/devices/{device_id}/quarantine",
        summary="Quarantine a device (it stays connected but is not selected; its updates are refused)",
        openapi_extra=_json_body(QuarantineRequest),
    )
    async def quarantine(device_id: str, request: Request) -> dict[str, Any]:
        require_media_type(request, _JSON)
        req: QuarantineRequest = _parse(QuarantineRequest, await gate.body(request, small))

        def work() -> DeviceRow:
            if store.get_device(device_id) is None:
                raise NotFoundError(f"no device {device_id[:80]!r} is enrolled", code="unknown_device")
            coordinator.quarantine(device_id, f"operator: {req.reason}")
            row = store.get_device(device_id)
            assert row is not None
            return row

        return _device(await run_in_threadpool(work))

    @router.post(
        "/devices/{device_id}/reinstate", summary="Reinstate a quarantined device (its reputation starts afresh)"
    )
    async def reinstate(device_id: str) -> dict[str, Any]:
        def work() -> DeviceRow:
            if store.get_device(device_id) is None:
                raise NotFoundError(f"no device {device_id[:80]!r} is enrolled", code="unknown_device")
            coordinator.reinstate(device_id)
            row = store.get_device(device_id)
            assert row is not None
            return row

        return _device(await run_in_threadpool(work))

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
        def work() -> list[dict[str, Any]]:
            rows = store.list_rounds(limit)
            models = {m.round_number: dict(m.metrics) for m in store.list_models() if m.round_number is not None}
            return [_round(r, models) for r in rows]

        return {"rounds": await run_in_threadpool(work)}

    return router
