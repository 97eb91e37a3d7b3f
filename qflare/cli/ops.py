"""The operator's view of a running server: ``qflare status``, ``devices``, ``events``, ``rounds``, and the
two actions on a device that threat detection calls for: ``qflare quarantine ID`` and ``qflare reinstate ID``.

Each command calls one endpoint of the server's HTTP API (``/v1/status`` or the admin routes
``/v1/admin/...`` with the admin token) and prints a rich table, or the server's JSON with ``--json``.
A wrong token, a refusal or an unreachable server is one line and exit status 2.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, ServerUnavailableError, TransportError, error_from_code
from .common import console, friendly_errors
from .server import parse_duration

__all__ = ["fetch", "register"]

SERVER_ENV = "QFLARE_SERVER"
ADMIN_TOKEN_ENV = "QFLARE_ADMIN_TOKEN"  # the same variable `qflare server` reads its token from
_MAX_ANSWER = 16 * 1024 * 1024

_SERVER = typer.Option("http://127.0.0.1:8443", "--server", envvar=SERVER_ENV, help="The server's base URL.")
_TOKEN = typer.Option(
    None,
    "--admin-token",
    envvar=ADMIN_TOKEN_ENV,
    help="The admin token (printed at the server's first start, kept in DATA_DIR/admin.token).",
    show_default=False,
)
_JSON = typer.Option(False, "--json", help="Print the server's JSON answer instead of a table.")


def fetch(
    server: str,
    path: str,
    token: str | None,
    params: dict[str, Any] | None = None,
    *,
    post: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """GET ``server + path`` (POST ``post`` as JSON when given) and return its JSON object; a refusal is
    raised as its QflareError."""
    if not server.startswith(("http://", "https://")):
        raise ConfigError(f"--server {server!r} must be an http:// or https:// URL")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = server.rstrip("/") + path
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10.0), follow_redirects=False) as client,
            client.stream("GET" if post is None else "POST", url, params=params, headers=headers, json=post) as resp,
        ):
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > _MAX_ANSWER:
                    raise TransportError(f"{url}: answer larger than {_MAX_ANSWER} bytes")
    except httpx.HTTPError as exc:
        raise ServerUnavailableError(f"cannot reach {server}: {type(exc).__name__}: {exc}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise TransportError(f"{url} answered HTTP {resp.status_code} with a body that is not JSON") from None
    if resp.status_code != 200:
        code = data.get("code") if isinstance(data, dict) else None
        message = data.get("message") if isinstance(data, dict) else None
        raise error_from_code(str(code or "http_error"), str(message or f"HTTP {resp.status_code}"), resp.status_code)
    if not isinstance(data, dict):
        raise TransportError(f"{url} answered with JSON that is not an object")
    return data


def _need(token: str | None) -> str:
    if not token:
        raise ConfigError(f"this command needs the admin token: --admin-token TOKEN or {ADMIN_TOKEN_ENV}")
    return token


def _rows(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = data.get(key)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is not None and isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _since(text: str) -> str:
    """``--since``: a duration back from now (``30m``, ``2h``, ``1d``) or an ISO 8601 time."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        at = datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    return at.isoformat()


def status(server: str = _SERVER, admin_token: str | None = _TOKEN, json_: bool = _JSON) -> None:
    """The round in progress, the evaluated history and the active devices (public; no token needed)."""
    with friendly_errors():
        data = fetch(server, "/v1/status", admin_token)
    if json_:
        print(json.dumps(data))
        return
    parts = [f"state {_cell(data.get('state'))}", f"{_cell(data.get('rounds_total'))} round(s) planned"]
    if data.get("round") is not None:
        parts.append(
            f"round {_cell(data.get('round'))}: {_cell(data.get('accepted'))}/{_cell(data.get('selected'))} updates"
        )
    parts += [f"model v{_cell(data.get('model_version'))}", f"{_cell(data.get('devices'))} active device(s)"]
    console.print(" · ".join(parts))
    history = _rows(data, "history")
    if history:
        table = Table(title="evaluated rounds")
        for col in ("round", "accuracy", "loss", "updates", "examples", "closed at"):
            table.add_column(col, justify="right")
        for h in history:
            table.add_row(
                _cell(h.get("round")),
                _cell(h.get("accuracy"), 4),
                _cell(h.get("loss"), 4),
                _cell(h.get("updates")),
                _cell(h.get("examples")),
                _cell(h.get("closed_at")),
            )
        console.print(table)


def devices(
    server: str = _SERVER,
    admin_token: str | None = _TOKEN,
    status_: str | None = typer.Option(None, "--status", help="Only active, quarantined or revoked devices."),
    limit: int = typer.Option(1000, min=1, max=10_000, help="At most this many devices."),
    json_: bool = _JSON,
) -> None:
    """Enrolled devices (admin token)."""
    with friendly_errors():
        params: dict[str, Any] = {"limit": limit}
        if status_ is not None:
            params["status"] = status_
        data = fetch(server, "/v1/admin/devices", _need(admin_token), params)
    if json_:
        print(json.dumps(data))
        return
    table = Table(title=f"devices ({len(_rows(data, 'devices'))} of {_cell(data.get('total'))})")
    for col in ("device id", "status", "signature", "enrolled at", "revoked/quarantined at", "reason"):
        table.add_column(col)
    for d in _rows(data, "devices"):
        table.add_row(
            _cell(d.get("device_id")),
            _cell(d.get("status")),
            _cell(d.get("sig_alg")),
            _cell(d.get("enrolled_at")),
            _cell(d.get("revoked_at") or d.get("quarantined_at")),
            _cell(d.get("revoked_reason") or d.get("quarantine_reason")),
        )
    console.print(table)


def events(
    server: str = _SERVER,
    admin_token: str | None = _TOKEN,
    kind: str | None = typer.Option(None, help="Only events with this reason code (e.g. admin_required)."),
    device: str | None = typer.Option(None, help="Only events of this device id."),
    since: str | None = typer.Option(None, help="Only events since then: 30m, 2h, 1d, or an ISO 8601 time."),
    limit: int = typer.Option(100, min=1, max=1000, help="At most this many events (newest first)."),
    json_: bool = _JSON,
) -> None:
    """Security events, newest first (admin token)."""
    with friendly_errors():
        params: dict[str, Any] = {"limit": limit}
        if kind is not None:
            params["reason"] = kind
        if device is not None:
            params["device_id"] = device
        if since is not None:
            params["since"] = _since(since)
        data = fetch(server, "/v1/admin/events", _need(admin_token), params)
    if json_:
        print(json.dumps(data))
        return
    table = Table(title=f"security events ({len(_rows(data, 'events'))})")
    for col in ("id", "at", "reason", "device", "remote", "detail"):
        table.add_column(col)
    for e in _rows(data, "events"):
        table.add_row(
            _cell(e.get("id")),
            _cell(e.get("at")),
            _cell(e.get("reason")),
            _cell(e.get("device_id")),
            _cell(e.get("remote_addr")),
            _cell(e.get("detail")),
        )
    console.print(table)


def rounds(
    server: str = _SERVER,
    admin_token: str | None = _TOKEN,
    limit: int = typer.Option(100, min=1, max=1000, help="The newest this many rounds."),
    json_: bool = _JSON,
) -> None:
    """Rounds with their state, participants and evaluation (admin token)."""
    with friendly_errors():
        data = fetch(server, "/v1/admin/rounds", _need(admin_token), {"limit": limit})
    if json_:
        print(json.dumps(data))
        return
    table = Table(title="rounds")
    for col in ("round", "state", "selected", "updates", "examples", "accuracy", "loss", "seconds", "closed at"):
        table.add_column(col, justify="right")
    for r in _rows(data, "rounds"):
        table.add_row(
            _cell(r.get("round")),
            _cell(r.get("state")),
            _cell(r.get("selected")),
            _cell(r.get("updates")),
            _cell(r.get("examples")),
            _cell(r.get("accuracy"), 4),
            _cell(r.get("loss"), 4),
            _cell(r.get("seconds"), 1),
            _cell(r.get("closed_at")),
        )
    console.print(table)


def _device_line(data: dict[str, Any]) -> str:
    line = f"device {_cell(data.get('device_id'))}: {_cell(data.get('status'))}"
    if data.get("quarantine_reason"):
        line += f" ({_cell(data.get('quarantine_reason'))})"
    return line


def quarantine(
    device_id: str = typer.Argument(..., help="The device's id (as `qflare devices` lists it)."),
    reason: str = typer.Option(..., "--reason", help="Why (stored with the device and in the security event)."),
    server: str = _SERVER,
    admin_token: str | None = _TOKEN,
    json_: bool = _JSON,
) -> None:
    """Quarantine a device: it stays enrolled and connected but is not selected, and its updates are refused,
    until `qflare reinstate` (admin token)."""
    with friendly_errors():
        data = fetch(
            server, f"/v1/admin/devices/{_path_id(device_id)}/quarantine", _need(admin_token), post={"reason": reason}
        )
    if json_:
        print(json.dumps(data))
    else:
        console.print(escape(_device_line(data)))


def reinstate(
    device_id: str = typer.Argument(..., help="The quarantined device's id."),
    server: str = _SERVER,
    admin_token: str | None = _TOKEN,
    json_: bool = _JSON,
) -> None:
    """Reinstate a quarantined device: selectable again, its reputation starts afresh (admin token)."""
    with friendly_errors():
        data = fetch(server, f"/v1/admin/devices/{_path_id(device_id)}/reinstate", _need(admin_token), post={})
    if json_:
        print(json.dumps(data))
    else:
        console.print(escape(_device_line(data)))


def _path_id(device_id: str) -> str:
    """A device id as a URL path segment: ids are 64 hex characters; anything else is refused here."""
    if len(device_id) != 64 or any(c not in "0123456789abcdef" for c in device_id):
        raise ConfigError(f"a device id is 64 lowercase hex characters, got {device_id[:80]!r}")
    return device_id


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("devices")(devices)
    app.command("events")(events)
    app.command("rounds")(rounds)
    app.command("quarantine")(quarantine)
    app.command("reinstate")(reinstate)
