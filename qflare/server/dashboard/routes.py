"""The dashboard's routes under ``/dashboard``: login and logout, the pages, their JSON data, actions, live stream.

Access (see :mod:`.auth`): a page without a live operator session redirects to ``/dashboard/login``; a data
or action route answers 401 ``admin_required`` (recorded).  Every state-changing request (``POST``) must carry
its session's CSRF token (header ``X-CSRF-Token``, or the form field ``csrf_token`` for the HTML forms) and,
when the browser sends them, a same-origin ``Origin`` and no cross-site ``Sec-Fetch-Site``; else 403
``csrf_failed`` (recorded) and nothing changes.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response, StreamingResponse

from ...errors import AdminAuthError, ErrorCode, NotFoundError, RateLimitedError, TokenError, ValidationError
from ..admin import QuarantineRequest, RevokeRequest, TokenRequest, parse_json
from ..admin import quarantine_device as _quarantine
from ..admin import reinstate_device as _reinstate
from ..admin import revoke_device as _revoke
from ..gate import RequestGate, remote_of
from ..limits import require_media_type
from ..runtime import ServerRuntime
from ..views import device_view, devices_view, event_view, ledger_view, round_detail, rounds_view, token_view
from .auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, OperatorAuth, csrf_token
from .pages import PAGES, Assets, headers
from .stream import LiveState, sse_events

__all__ = ["dashboard_router"]

_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
_LOGIN_NONCE_S = 1800
_DeviceId = Annotated[str, Path(min_length=1, max_length=128)]


def _form(body: bytes) -> dict[str, str]:
    """A urlencoded form's first value of each field (total: bad bytes are replaced, extra fields dropped)."""
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8)
    return {k: v[0] for k, v in fields.items() if v}


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def _json(data: dict[str, Any], status: int = 200) -> Response:
    return JSONResponse(data, status_code=status, headers=headers())


def dashboard_router(runtime: ServerRuntime, gate: RequestGate) -> APIRouter:
    """The ``/dashboard`` routes of one coordinator (mounted by :func:`qflare.server.create_app`)."""
    store, coordinator = runtime.store, runtime.coordinator
    small = runtime.config.http.small_body_bytes
    auth = OperatorAuth(store, runtime.admin, runtime.data_dir)
    live = LiveState(runtime)
    assets = Assets()
    router = APIRouter(prefix="/dashboard", include_in_schema=False)

    async def operator(request: Request) -> str:
        """The request's operator session id; 401 ``admin_required`` (recorded) without one."""
        await gate.admit(request)
        session = await run_in_threadpool(auth.session_of, request)
        if session is None:
            exc = AdminAuthError("operator login required: log in at /dashboard/login")
            raise await gate.refuse(exc, request) from None
        return session

    async def csrf_refused(request: Request, why: str) -> AdminAuthError:
        exc = AdminAuthError(f"CSRF check failed: {why}", forbidden=True, code=ErrorCode.CSRF_FAILED)
        return await gate.refuse(exc, request)  # type: ignore[return-value]

    async def check_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise await csrf_refused(request, "cross-origin request")
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise await csrf_refused(request, "cross-site request")

    async def acting(request: Request, session: str = Depends(operator)) -> str:
        """An operator session whose request carries its CSRF token (header ``X-CSRF-Token``)."""
        await check_origin(request)
        if not _same(request.headers.get("x-csrf-token", ""), csrf_token(session)):
            raise await csrf_refused(request, "missing or wrong X-CSRF-Token")
        return session

    # ------------------------------------------------------------------ login and logout
    def login_page(message: str = "", status: int = 200, **extra: str) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = assets.login(nonce, message, status, **extra)
        response.set_cookie(
            LOGIN_CSRF_COOKIE, nonce, max_age=_LOGIN_NONCE_S, path="/", secure=True, httponly=True, samesite="strict"
        )
        return response

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        await gate.admit(request)
        if await run_in_threadpool(auth.session_of, request) is not None:
            return RedirectResponse("/dashboard", 303, headers=headers())
        return login_page()

    @router.post("/login")
    async def login(request: Request) -> Response:
        await gate.admit(request)
        remote = remote_of(request)
        decision = auth.limiter.check(remote)
        if not decision.allowed:
            if decision.report:
                detail = (
                    f"POST /dashboard/login: address {remote} over its failed-login limit "
                    f"({decision.refused_since_report} refusal(s) since the last event)"
                )
                await gate.record(ErrorCode.RATE_LIMITED, detail, request)
            retry = max(1, int(decision.retry_after_s + 0.999))
            return login_page(f"Too many failed logins; try again in {retry} s.", 429, **{"Retry-After": str(retry)})
        await check_origin(request)
        require_media_type(request, _FORM)
        form = _form(await gate.body(request, small))
        nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not nonce or not _same(form.get("csrf_token", ""), nonce):
            await csrf_refused(request, "login form without its nonce")
            return login_page("The login form expired; try again.", 403)
        try:
            method = await run_in_threadpool(auth.verify, form.get("secret", ""))
        except AdminAuthError as exc:
            auth.limiter.failed(remote)
            await gate.refuse(exc, request)
            return login_page("Wrong admin token or operator password.", 403)
        session, max_age = await run_in_threadpool(auth.open_session, method, remote)
        response = RedirectResponse("/dashboard", 303, headers=headers())
        response.set_cookie(
            SESSION_COOKIE, session, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict"
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    @router.post("/logout")
    async def logout(request: Request, session: str = Depends(operator)) -> Response:
        await check_origin(request)
        require_media_type(request, _FORM)
        form = _form(await gate.body(request, small))
        if not _same(form.get("csrf_token", ""), csrf_token(session)):
            raise await csrf_refused(request, "logout form without the session's token")
        await run_in_threadpool(auth.close, session)
        response = RedirectResponse("/dashboard/login", 303, headers=headers())
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ pages and static files
    def page_route(name: str, path: str) -> None:
        async def serve(request: Request) -> Response:
            await gate.admit(request)
            session = await run_in_threadpool(auth.session_of, request)
            if session is None:
                return RedirectResponse("/dashboard/login", 303, headers=headers())
            return assets.page(name, csrf_token(session))

        serve.__name__ = f"dashboard_{name}"
        router.get(path)(serve)

    for name, (path, _) in PAGES.items():
        page_route(name, path)
    page_route("overview", "/")

    @router.get("/static/{name:path}")
    async def static(request: Request, name: str) -> Response:
        await gate.admit(request)
        response = assets.static_response(name)
        if response is None:
            raise NotFoundError("no such dashboard file", code="not_found")
        return response

    # ------------------------------------------------------------------ data
    @router.get("/api/overview", dependencies=[Depends(operator)])
    async def overview() -> Response:
        def work() -> dict[str, Any]:
            return {"status": live.overview(), "rounds": rounds_view(store, 1000)}

        return _json(await run_in_threadpool(work))

    @router.get("/api/devices", dependencies=[Depends(operator)])
    async def devices(
        status: Annotated[Literal["active", "revoked", "quarantined"] | None, Query()] = None,
    ) -> Response:
        rows = await run_in_threadpool(devices_view, store, coordinator, status)
        detection = coordinator.rounds.detector is not None
        return _json({"devices": rows, "detection": detection, "suite": runtime.config.federation.suite.name})

    @router.get("/api/rounds", dependencies=[Depends(operator)])
    async def rounds(limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Response:
        return _json({"rounds": await run_in_threadpool(rounds_view, store, limit)})

    @router.get("/api/rounds/{number}", dependencies=[Depends(operator)])
    async def round_one(number: Annotated[int, Path(ge=0, le=2**31 - 1)]) -> Response:
        detail = await run_in_threadpool(round_detail, store, number)
        if detail is None:
            raise NotFoundError(f"no round {number}", code="not_found")
        return _json(detail)

    @router.get("/api/events", dependencies=[Depends(operator)])
    async def events(
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        reason: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        device_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        since: Annotated[datetime | None, Query()] = None,
    ) -> Response:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)

        def work() -> dict[str, Any]:
            rows = store.security_events(limit, device_id=device_id, reason=reason, since=since)
            kinds = sorted({e.reason for e in store.security_events(1000)})
            return {"events": [event_view(e) for e in rows], "kinds": kinds}

        return _json(await run_in_threadpool(work))

    @router.get("/api/tokens", dependencies=[Depends(operator)])
    async def tokens(limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Response:
        def work() -> list[dict[str, Any]]:
            now = datetime.now(UTC)
            return [token_view(t, now) for t in store.list_tokens(limit)]

        return _json({"tokens": await run_in_threadpool(work)})

    @router.get("/api/ledger", dependencies=[Depends(operator)])
    async def ledger(limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Response:
        return _json(await run_in_threadpool(ledger_view, store, limit))

    @router.get("/api/stream")
    async def stream(request: Request, session: str = Depends(operator)) -> Response:
        if live.open_streams >= live.max_streams:
            raise RateLimitedError("too many live dashboards are open; retry later", retry_after_s=5.0)

        def still_logged_in() -> bool:
            return store.operator_session_valid(session)

        return StreamingResponse(
            sse_events(request, live, still_logged_in),
            media_type="text/event-stream",
            headers=headers(**{"X-Accel-Buffering": "no"}),
        )

    # ------------------------------------------------------------------ actions (CSRF-checked)
    async def body_of(request: Request, model: type[Any]) -> Any:
        require_media_type(request, _JSON)
        return parse_json(model, await gate.body(request, small))

    @router.post("/api/tokens", dependencies=[Depends(acting)])
    async def mint(request: Request) -> Response:
        req: TokenRequest = await body_of(request, TokenRequest)
        minted = await run_in_threadpool(coordinator.create_tokens, req.count, req.ttl_s, req.label)
        expires = datetime.now(UTC) + timedelta(seconds=req.ttl_s)
        return _json({"tokens": minted, "expires_at": expires.isoformat(), "label": req.label})

    @router.post("/api/tokens/{token_sha256}/revoke", dependencies=[Depends(acting)])
    async def revoke_token(token_sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]) -> Response:
        try:
            row = await run_in_threadpool(store.revoke_token, token_sha256)
        except TokenError as exc:  # an operator's mistake, not an authentication failure (TokenError is 401)
            if exc.code == ErrorCode.TOKEN_UNKNOWN:
                raise NotFoundError("no such enrollment token", code="not_found") from None
            raise ValidationError(exc.message, code=exc.code) from None
        return _json(token_view(row, datetime.now(UTC)))

    @router.post("/api/devices/{device_id}/revoke", dependencies=[Depends(acting)])
    async def revoke(request: Request, device_id: _DeviceId) -> Response:
        req: RevokeRequest = await body_of(request, RevokeRequest)
        return _json(device_view(await run_in_threadpool(_revoke, runtime, device_id, req.reason)))

    @router.post("/api/devices/{device_id}/quarantine", dependencies=[Depends(acting)])
    async def quarantine(request: Request, device_id: _DeviceId) -> Response:
        req: QuarantineRequest = await body_of(request, QuarantineRequest)
        return _json(device_view(await run_in_threadpool(_quarantine, runtime, device_id, req.reason)))

    @router.post("/api/devices/{device_id}/reinstate", dependencies=[Depends(acting)])
    async def reinstate(device_id: _DeviceId) -> Response:
        return _json(device_view(await run_in_threadpool(_reinstate, runtime, device_id)))

    return router
