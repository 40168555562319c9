"""The one place where errors become HTTP answers: ``{"detail": "<what went wrong and the fix>"}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from inco_core.errors import CheckpointError, ConfigError, DataError, InCoError
from server.errors import Conflict, Forbidden, LimitReached, NotFound, ServiceUnavailable, TooLarge, Unauthorized

STATUS: list[tuple[type[InCoError], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooLarge, 413),
    (LimitReached, 429),
    (NotFound, 404),
    (Conflict, 409),
    (ConfigError, 422),
    (DataError, 422),
    (CheckpointError, 422),
    (ServiceUnavailable, 503),
]


def status_for(exc: InCoError) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 400


def _field_message(err: dict) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):  # where it was, not a field (a field may be "path")
        loc = loc[1:]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field; check the spelling against the API's schema (GET /openapi.json)"
    elif err.get("type") == "missing":
        msg = "field required"
    elif err.get("type") == "literal_error" and "expected" in err.get("ctx", {}):
        msg = f"must be one of {err['ctx']['expected']} (got {err.get('input')!r})"
    elif err.get("type") == "json_invalid":
        msg = f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def install(app: FastAPI) -> None:
    @app.exception_handler(InCoError)
    async def _inco(request: Request, exc: InCoError) -> JSONResponse:
        code = status_for(exc)
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
        if code in (429, 503):
            headers = {"Retry-After": "5" if code == 503 else "30"}
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_message(e) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(errors), "errors": errors}, status_code=422)
