"""The dashboard's HTML pages and static files: package data, read once, served with strict security headers.

Pages are fixed templates with two substitutions (the session's CSRF token, HTML-escaped, and the
navigation); every number on them is fetched by ``dashboard.js`` from the JSON routes and set as text, so
no value from the database is ever parsed as HTML.  Static files are a fixed list: no path from the request
reaches the file system.
"""

from __future__ import annotations

import html
from importlib import resources

from starlette.responses import HTMLResponse, Response

__all__ = ["PAGES", "SECURITY_HEADERS", "Assets", "headers"]

#: page name -> (path under /dashboard, title)
PAGES: dict[str, tuple[str, str]] = {
    "overview": ("", "Overview"),
    "devices": ("/devices", "Devices"),
    "rounds": ("/rounds", "Rounds"),
    "events": ("/events", "Security events"),
    "tokens": ("/tokens", "Enrollment tokens"),
    "ledger": ("/ledger", "Ledger and model lineage"),
}

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: that sends "Origin: null" on our own form posts
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

_STATIC: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "vendor/uplot/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uplot/LICENSE": "text/plain; charset=utf-8",
}


def headers(cache: str = "no-store", **extra: str) -> dict[str, str]:
    """The security headers plus ``Cache-Control`` (pages and data are never cached)."""
    return {**SECURITY_HEADERS, "Cache-Control": cache, **extra}


def _read(*parts: str) -> bytes:
    return resources.files(__package__).joinpath(*parts).read_bytes()


class Assets:
    """Templates and static files loaded from the package at start-up."""

    def __init__(self) -> None:
        self.static = {name: _read("static", *name.split("/")) for name in _STATIC}
        self.templates = {
            name: _read("templates", f"{name}.html").decode("utf-8") for name in ("layout", "login", *PAGES)
        }

    def static_response(self, name: str) -> Response | None:
        body = self.static.get(name)
        if body is None:
            return None
        return Response(body, media_type=_STATIC[name], headers=headers("no-cache"))

    def page(self, name: str, csrf: str) -> HTMLResponse:
        title = PAGES[name][1]
        current = ' aria-current="page"'
        nav = "\n".join(
            f'<li><a href="/dashboard{p}"{current if n == name else ""}>{html.escape(t)}</a></li>'
            for n, (p, t) in PAGES.items()
        )
        text = (
            self.templates["layout"]
            .replace("{{main}}", self.templates[name])
            .replace("{{nav}}", nav)
            .replace("{{title}}", html.escape(title))
            .replace("{{page}}", name)
            .replace("{{csrf}}", html.escape(csrf))
        )
        return HTMLResponse(text, headers=headers())

    def login(self, nonce: str, message: str = "", status: int = 200, **extra: str) -> HTMLResponse:
        note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        text = self.templates["login"].replace("{{csrf}}", html.escape(nonce)).replace("{{message}}", note)
        return HTMLResponse(text, status_code=status, headers=headers(**extra))
