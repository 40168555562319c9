"""The web page (``GET /``) and its files (``GET /web/<file>``), from :mod:`server.web`.

Only the files named in :data:`server.web.ASSETS` are served (no directory is mounted, so no path can
reach another file). The answers carry the page's strict Content-Security-Policy
(:data:`server.api.security.WEB_CSP`) and ``Cache-Control: no-cache``: the browser revalidates, so a
new release's files load at once. The routes are left out of the OpenAPI document: they are not API.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import NotFound
from server.web import ASSETS, FOLDER, PAGE

router = APIRouter(include_in_schema=False)
CACHE = {"Cache-Control": "no-cache"}


@router.get("/")
def page() -> FileResponse:
    """The single page: sign-in, leaderboard, jobs, a job, models (hash routes in app.js)."""
    return FileResponse(FOLDER / PAGE, media_type="text/html; charset=utf-8", headers=CACHE)


@router.get("/web/{name}")
def asset(name: str) -> FileResponse:
    """One of the page's files; any other name is a 404."""
    if name not in ASSETS:
        raise NotFound(f"the page has no file {name[:100]!r}: it has {', '.join(sorted(ASSETS))}")
    return FileResponse(FOLDER / name, media_type=ASSETS[name], headers=CACHE)
