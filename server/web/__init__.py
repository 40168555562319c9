"""The web page for plant teams: ``index.html``, ``app.js`` and ``style.css`` in this folder, written
by hand (no build step, nothing from a CDN) and served by :mod:`server.api.web` at ``/`` and
``/web/<file>``. The page holds no data of its own: it signs in with a team token the user pastes and
calls the ``/v1`` routes with it (docs/web.md)."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
PAGE = "index.html"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
"""The files served under ``/web/``, with their media types; any other name is a 404."""
