"""The FastAPI application (``inco serve``; ASGI entry point ``server.api.app:app``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server import queue
from server.api import errors, observability, security, web
from server.api.limits import BodySizeLimit
from server.api.routes import artifacts, datasets, jobs, models, plots, results, tokens
from server.errors import ServiceUnavailable
from server.logs import setup_logging
from server.settings import Settings
from server.store.db import Migrator, make_engine, ping

API_VERSION = "1"
READINESS = {
    "description": "`status` (`ready` or `not ready`), then `ok` or what is wrong for each dependency",
    "content": {"application/json": {"schema": {"type": "object", "additionalProperties": {"type": "string"}}}},
}


def settle_heap() -> None:
    """Import what the routes import on first use (scanning a data set loads torch), collect, then
    move every object alive into the collector's permanent generation (``gc.freeze``).

    A serving process holds about 300,000 objects once torch is loaded, nearly all of them modules,
    classes and functions that live as long as it does. Every full collection walked them all: a pause
    of about 400 ms (more on a busy host) for every request in flight, which set the API's p99 latency
    (bench/load.py). Frozen, they are never walked again; what requests allocate is collected as usual.
    """
    import inco_core.data  # noqa: F401  (the one module the routes import on first use)

    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None, *, run_migrations: bool = True, freeze_heap: bool = False) -> FastAPI:
    """The API. ``freeze_heap`` (a serving process: ``inco serve``, the uvicorn factory) runs
    :func:`settle_heap` when the app starts; tests, which make many apps in one process, leave it off."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if freeze_heap:
            settle_heap()
        migrator = app.state.migrator
        if run_migrations:
            migrator.start()  # a database that is down is retried in the background (503 until then)
        else:
            migrator.ready.set()
        yield
        migrator.stop()
        app.state.engine.dispose()
        app.state.redis.close()

    app = FastAPI(
        title="InCo service",
        version=API_VERSION,
        description="Instance-contrast pretraining and few-label evaluation of steel-defect classifiers. "
        "Every route under /v1 needs `Authorization: Bearer <token>`; a team sees only its own jobs, "
        "data sets and results.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.db_url)
    app.state.migrator = Migrator(app.state.engine)
    app.state.redis = queue.connect(settings.redis_url)
    errors.install(app)
    app.add_middleware(BodySizeLimit)  # 413 for bodies over max_body_bytes / max_upload_bytes
    observability.install(app)  # GET /metrics; request latency and one log line per request
    security.install(app, settings)  # security headers on every answer; CORS only for INCO_CORS_ORIGINS
    for module in (jobs, results, datasets, artifacts, models, tokens, plots):
        app.include_router(module.router)
    app.include_router(web.router)  # the web page for plant teams at / (server/web, docs/web.md)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={200: READINESS, 503: {**READINESS, "description": "not ready"}})
    def readyz(request: Request) -> JSONResponse:
        """Redis and the database answer."""
        checks: dict[str, str] = {}
        migrator = request.app.state.migrator
        if not migrator.ready.is_set():
            checks["schema"] = f"not migrated yet: {migrator.error or 'migrating'}"
        for name, check in (
            ("database", lambda: ping(request.app.state.engine)),
            ("redis", lambda: queue.ping(request.app.state.redis)),
        ):
            try:
                check()
                checks[name] = "ok"
            except ServiceUnavailable as exc:
                checks[name] = str(exc)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

    return app


def app() -> FastAPI:  # uvicorn --factory server.api.app:app
    settings = Settings()
    setup_logging(settings.log_format)
    return create_app(settings, freeze_heap=True)
