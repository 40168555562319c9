"""Browser-facing hardening: security headers on every answer, and CORS only where configured.

Every answer gets ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
``Referrer-Policy: no-referrer`` and a ``Content-Security-Policy`` that allows nothing (the API serves
JSON only); the interactive docs (``/docs``, ``/redoc``) get a policy that lets them load FastAPI's
Swagger UI and ReDoc bundles from their CDN; the web page (``/`` and ``/web/<file>``) gets
:data:`WEB_CSP`: its own script and style sheet only, no inline code, images from the API as ``blob:``
URLs, and no form that can navigate (so a token typed into one never lands in a URL). Answers under
``/v1`` (and ``/metrics``) get ``Cache-Control: no-store``: they hold a team's data and must not sit in
a shared cache.

CORS is off unless ``INCO_CORS_ORIGINS`` lists origins: without it a browser page on another origin
cannot read any answer. Tokens are sent as a header, never a cookie, so credentials stay off.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_CDN = "https://cdn.jsdelivr.net"
DOCS_CSP = (
    f"default-src 'self'; script-src 'self' 'unsafe-inline' {_CDN}; "
    f"style-src 'self' 'unsafe-inline' {_CDN} https://fonts.googleapis.com; font-src 'self' https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; connect-src 'self'; "
    "worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'self'"
)
"""Swagger UI and ReDoc as FastAPI serves them: their bundles from jsDelivr, an inline start script."""
DOCS_PATHS = ("/docs", "/redoc")
WEB_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)
"""The web page (server/web): nothing inline, nothing from elsewhere; fetch() to this origin; plots
and local images as ``blob:`` URLs; Trusted Types with no policy, so an ``innerHTML`` assignment throws
in the browser instead of parsing markup."""
WEB_PAGE = "/"
WEB_PREFIX = "/web/"
NO_STORE_PREFIXES = ("/v1/", "/metrics")

COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def policy_for(path: str) -> str:
    """The Content-Security-Policy of an answer to ``path``."""
    if path.startswith(DOCS_PATHS):
        return DOCS_CSP
    if path == WEB_PAGE or path.startswith(WEB_PREFIX):
        return WEB_CSP
    return API_CSP


def headers_for(path: str) -> list[tuple[bytes, bytes]]:
    """The security headers of an answer to ``path``."""
    out = [*COMMON_HEADERS, (b"content-security-policy", policy_for(path).encode())]
    if path.startswith(NO_STORE_PREFIXES) or path == "/v1":
        out.append((b"cache-control", b"no-store"))
    return out


class SecurityHeaders:
    """Pure ASGI middleware adding :func:`headers_for` to every HTTP answer (errors included); a
    header the route set itself is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = headers_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k, v) for k, v in extra if k not in have)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI, settings: Settings) -> None:
    """CORS (only for ``settings.cors_origins``), then the security headers around everything."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)
