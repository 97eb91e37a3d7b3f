"""The HTTP API v1 of the coordinator: a thin FastAPI adapter over :meth:`Coordinator.handle`.

Protocol routes take and return ``application/octet-stream`` bodies; the adapter checks limits, calls
the coordinator in a worker thread (it is synchronous and CPU-bound), and maps a refusal
(:class:`~qflare.errors.QflareError`) to ``{"code", "message"}`` with the error's HTTP status.

Cheap checks come first, and nothing unauthenticated is buffered beyond the small-body limit: an update
upload is judged from its headers (Content-Type, a declared Content-Length within the limit, a session
that names a selected device of the open round) before it may take an upload slot or have a byte read,
and every body must keep up a minimum transfer rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ErrorCode, QflareError, RateLimitedError, StorageFullError
from ..protocol import Route
from ..protocol.messages import SECAGG_ROUTES
from .admin import admin_router
from .dashboard import dashboard_router
from .gate import SESSION_HEADER, RequestGate, remote_of
from .limits import declared_length
from .logs import REQUEST_ID_HEADER, bind_request
from .metrics import CONTENT_TYPE, ServerMetrics
from .runtime import ServerRuntime

__all__ = ["API_VERSION", "create_app"]

API_VERSION = "1"
_log = logging.getLogger("qflare.server")
_OCTETS = "application/octet-stream"
_BINARY = {_OCTETS: {"schema": {"type": "string", "format": "binary"}}}
_ERROR = {
    "description": "Refused: {code, message}",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        }
    },
}
_PROTOCOL_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": _BINARY},
}
_PROTOCOL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Protocol reply bytes", "content": _BINARY},
    **{s: _ERROR for s in (400, 401, 403, 408, 409, 411, 413, 415, 422, 429)},
}
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
_HANDSHAKE_STEPS = {Route.HELLO: "hello", Route.FINISH: "finish"}
SessionHeader = Annotated[str | None, Header(alias=SESSION_HEADER, description="Session id (hex) from the handshake")]

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


def error_response(
    metrics: ServerMetrics, status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.refusals.labels(code).inc()
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class _RequestMetrics:
    """Counts and times every HTTP response, and its body bytes in and out, by route template (not raw
    path), method and status: every label takes a bounded set of values (an unknown path is ``unmatched``,
    an unknown method ``OTHER``).  It also binds the request id and the open round to the request's log
    records (:func:`~qflare.server.logs.bind_request`) and answers the id in ``X-Request-Id``."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServerMetrics,
        known_paths: Callable[[], set[str]],
        open_round: Callable[[], int | None],
    ) -> None:
        self.app, self.metrics, self._known_paths, self._open_round = app, metrics, known_paths, open_round
        self._known: set[str] | None = None

    def _label(self, scope: MutableMapping[str, Any]) -> str:
        route = getattr(scope.get("route"), "path", None)
        if route is not None:
            return str(route)
        if self._known is None:
            self._known = self._known_paths()
        path = scope.get("path", "")
        return path if path in self._known else "unmatched"  # plain (non-API) routes like /openapi.json

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, start, received, sent = 500, time.perf_counter(), 0, 0
        request_id, unbind = bind_request(self._open_round())

        async def receive_wrapper() -> Any:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
            return message

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id.encode("ascii"))]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            unbind()
            route, method = self._label(scope), scope.get("method", "")
            method = method if method in _METHODS else "OTHER"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_seconds.labels(route, method).observe(time.perf_counter() - start)
            self.metrics.received_bytes.labels(route).inc(received)
            self.metrics.sent_bytes.labels(route).inc(sent)


def create_app(runtime: ServerRuntime) -> FastAPI:
    """The ASGI app serving ``runtime`` (its lifespan starts and stops the runtime's threads)."""
    metrics, coordinator = runtime.metrics, runtime.coordinator
    limits = runtime.config.http
    gate = RequestGate(limits, runtime.store, metrics)
    coordinator.event_filter = gate.throttled  # the coordinator's refusals share the gate's flood bound
    metrics.upload_slots.set(limits.max_concurrent_uploads)
    small, update_limit = limits.small_body_bytes, limits.update_body_bytes(runtime.config.max_update_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)

    app = FastAPI(
        title="QFLARE coordinator",
        version=API_VERSION,
        lifespan=lifespan,
        docs_url=None,  # served below, behind the gate's per-address rate limit
        redoc_url=None,
        description="Federated learning coordinator with post-quantum security. Protocol bodies are "
        "application/octet-stream; errors are {code, message}.",
    )
    app.state.runtime, app.state.gate = runtime, gate
    app.add_middleware(
        _RequestMetrics,
        metrics=metrics,
        known_paths=lambda: {str(getattr(r, "path", "")) for r in app.routes},
        open_round=runtime.open_round,
    )

    @app.exception_handler(QflareError)
    async def _qflare_error(_: Request, exc: QflareError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimitedError | StorageFullError):  # storage_full: 503, devices wait it out
            headers = {"Retry-After": str(max(1, int(exc.retry_after_s + 0.999)))}
        return error_response(metrics, exc.http_status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]]
        return error_response(metrics, 422, ErrorCode.VALIDATION_ERROR, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
        return error_response(metrics, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        _log.error("database error serving %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
        return error_response(
            metrics,
            503,
            ErrorCode.DATABASE_UNAVAILABLE,
            "the database is unavailable; retry later",
            {"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(metrics, 500, ErrorCode.INTERNAL_ERROR, "internal server error")

    async def call(route: Route, request: Request, body: bytes, session_id: str | None, media_type: str) -> Response:
        try:
            reply = await run_in_threadpool(
                coordinator.handle, route, body, session_id=session_id, remote=remote_of(request)
            )
        except QflareError as exc:
            if exc.device_id is not None:  # refused after its frame authenticated: the device's own request
                gate.charge_session(session_id)
            raise
        gate.charge_session(session_id)
        return Response(content=reply, media_type=media_type)

    def protocol_route(
        route: Route, summary: str, media_type: str = "application/octet-stream", limit: int | None = None
    ) -> None:
        async def serve(request: Request, session_id: str | None) -> Response:
            await gate.admit(request, session_id)
            if route in (Route.ENROLL, Route.HELLO):
                await gate.admit_keys(request)
            await gate.media_type(request, _OCTETS, session_id)
            if limit is not None:  # a model-sized body: its declared length is refused before it is read
                try:
                    declared_length(request, limit)
                except QflareError as exc:
                    raise await gate.refuse(exc, request, session_id) from None
            body = await gate.body(request, small if limit is None else limit, session_id)
            return await call(route, request, body, session_id, media_type)

        async def counted(request: Request, session_id: str | None) -> Response:
            step = _HANDSHAKE_STEPS.get(route)
            if step is None:
                return await serve(request, session_id)
            try:
                response = await serve(request, session_id)
            except QflareError:
                metrics.handshakes.labels(step, "refused").inc()
                raise
            metrics.handshakes.labels(step, "ok").inc()
            return response

        endpoint: Callable[..., Awaitable[Response]]
        if route in (Route.TASK, Route.MODEL, Route.PROOF) or route in SECAGG_ROUTES:

            async def endpoint(request: Request, x_qflare_session: SessionHeader = None) -> Response:
                return await counted(request, x_qflare_session)

        else:

            async def endpoint(request: Request) -> Response:
                return await counted(request, None)

        endpoint.__name__ = "protocol_" + route.value.replace("/", "_")
        app.post(
            f"/v1/{route.value}",
            summary=summary,
            openapi_extra=_PROTOCOL_DOC,
            responses=_PROTOCOL_RESPONSES,
            response_class=Response,
            tags=["protocol"],
        )(endpoint)

    protocol_route(Route.ENROLL, "Enroll a device: ENROLL_REQUEST -> ENROLL_RECORD")
    protocol_route(Route.HELLO, "Handshake step 1: CLIENT_HELLO -> SERVER_HELLO")
    protocol_route(
        Route.FINISH, "Handshake step 2: SHA-256(server hello) || CLIENT_FINISH -> session id (hex)", "text/plain"
    )
    protocol_route(Route.TASK, "Sealed task request -> sealed task")
    protocol_route(Route.MODEL, "Sealed model request -> sealed signed global model")
    protocol_route(
        Route.PROOF,
        "Sealed proof request (a closed round) -> sealed signed ledger entry + this device's inclusion proof "
        "or left-out reason",
    )

    # secure aggregation (docs/secure-aggregation.md): sealed phase messages, each answered by the same
    # Coordinator.handle as in-process; only the masked input is model-sized
    protocol_route(Route.SECAGG_CONFIG, "Sealed request -> the open secure round's configuration")
    protocol_route(Route.SECAGG_RELAY, "Sealed relay request -> the phase messages relayed to this device")
    protocol_route(Route.SECAGG_ADVERTISE, "Sealed signed ADVERTISE -> sealed ack")
    protocol_route(Route.SECAGG_SHARES, "Sealed signed MANIFEST + SHARE entries -> sealed ack", limit=update_limit)
    protocol_route(Route.SECAGG_MASKED, "Sealed signed MASKED_INPUT + masked vector -> sealed ack", limit=update_limit)
    protocol_route(Route.SECAGG_CONSISTENCY, "Sealed signed CONSISTENCY (a signature on U3) -> sealed ack")
    protocol_route(Route.SECAGG_UNMASK, "Sealed signed UNMASK_RESPONSE -> sealed ack")

    @app.post(
        "/v1/update",
        summary="Sealed signed update -> sealed signed receipt",
        openapi_extra=_PROTOCOL_DOC,
        responses=_PROTOCOL_RESPONSES,
        response_class=Response,
        tags=["protocol"],
    )
    async def protocol_update(request: Request, x_qflare_session: SessionHeader = None) -> Response:
        try:
            return await receive_update(request, x_qflare_session)
        except QflareError as exc:
            metrics.updates_refused.labels(exc.code).inc()
            raise

    async def receive_update(request: Request, session: str | None) -> Response:
        await gate.admit(request, session)
        await gate.media_type(request, _OCTETS, session)
        try:  # from the headers alone, before a slot is taken or a byte is read
            declared_length(request, update_limit)
            await run_in_threadpool(coordinator.check_upload_admissible, session)
        except QflareError as exc:
            raise await gate.refuse(exc, request, session) from None
        async with gate.upload_slot():  # the slot is taken BEFORE the body is read: bounded memory
            body = await gate.body(request, update_limit, session)
            metrics.upload_bytes.observe(len(body))
            return await call(Route.UPDATE, request, body, session, _OCTETS)

    @app.get("/v1/identity", tags=["public"], summary="The coordinator's signing key (devices pin key_id) and model")
    async def identity(request: Request) -> dict[str, Any]:
        await gate.admit(request)
        return runtime.identity_info()

    @app.get(
        "/v1/rotations",
        tags=["public"],
        summary="The coordinator's key rotation chain (hex records, at most 32): devices pinned to a former "
        "key verify it and move their pin",
    )
    async def rotations(request: Request) -> dict[str, Any]:
        await gate.admit(request)
        return runtime.rotation_info()

    @app.get("/v1/status", tags=["public"], summary="Round state, evaluated history, device count")
    async def status(request: Request) -> dict[str, Any]:
        await gate.admit(request)
        return await run_in_threadpool(runtime.status)

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        """Swagger UI over /openapi.json (FastAPI's page; its script and style load from the jsDelivr CDN)."""
        await gate.admit(request)  # the same per-address rate limit as the other public reads
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API")

    @app.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Database reachable, storage writable and coordinator loaded (503 otherwise)",
        responses={503: {"description": "not ready"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        await gate.admit_ops(request)
        try:
            with anyio.fail_after(5.0):
                result = await anyio.to_thread.run_sync(runtime.readiness, abandon_on_cancel=True)
        except TimeoutError:
            result = {"ready": False, "database": False, "coordinator": True, "error": "database check timed out"}
        return JSONResponse(result, status_code=200 if result["ready"] else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def prometheus(request: Request) -> Response:
        await gate.admit_ops(request)
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    app.include_router(admin_router(runtime, gate))
    app.include_router(dashboard_router(runtime, gate))
    return app
