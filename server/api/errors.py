"""The one place where errors become HTTP answers: ``{"detail": "<what went wrong and the fix>"}``,
and how the OpenAPI document describes them (:data:`AUTH`, :func:`answer`: the ``responses=`` of the
routes), so every status a route can answer is documented with its body and headers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from inco_core.errors import CheckpointError, ConfigError, DataError, InCoError
from server.errors import (
    Conflict,
    Forbidden,
    Gone,
    LimitReached,
    NotFound,
    ServiceUnavailable,
    TooLarge,
    Unauthorized,
)

STATUS: list[tuple[type[InCoError], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooLarge, 413),
    (LimitReached, 429),
    (NotFound, 404),
    (Gone, 410),
    (Conflict, 409),
    (ConfigError, 422),
    (DataError, 422),
    (CheckpointError, 422),
    (ServiceUnavailable, 503),
]


RETRY_AFTER_S = {429: 30, 503: 5}


class ErrorBody(BaseModel):
    """Every error answer."""

    detail: str = Field(description="what went wrong and how to fix it")


class InvalidBody(ErrorBody):
    """A 422: the request is malformed or asks for something impossible."""

    errors: list[str] = Field(
        default_factory=list,
        description="one line per invalid field, each starting with the field's name (e.g. `limit: ...`); "
        "absent when the API's own checks refused the request",
    )


def answer(
    description: str, *, model: type[BaseModel] = ErrorBody, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One entry of a route's ``responses=``: a JSON ``model`` and the headers the answer always has."""
    out: dict[str, Any] = {"description": description, "model": model}
    if headers:
        out["headers"] = headers
    return out


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": schema}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before trying again", {"type": "integer", "minimum": 1})}
INVALID = {422: answer("the request is invalid; `detail` names the field and the fix", model=InvalidBody)}
AUTH: dict[int | str, dict[str, Any]] = {
    401: answer(
        "no bearer token, or one that is unknown or revoked",
        headers={"WWW-Authenticate": _header("always `Bearer`", {"type": "string", "enum": ["Bearer"]})},
    ),
    403: answer("the token lacks the scope the route needs (read, submit, admin or predict)"),
    503: answer("the database (or Redis) is down or not migrated yet; nothing was changed", headers=RETRY_AFTER),
}
"""What every ``/v1`` route may answer besides its own: no token (401), a token without the route's
scope (403), the store down (503)."""


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
        if code in RETRY_AFTER_S:
            headers = {"Retry-After": str(getattr(exc, "retry_after_s", RETRY_AFTER_S[code]))}
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette answers a body it cannot parse (a malformed multipart form) with a bare 400
        if exc.status_code == 400:
            return JSONResponse(
                {"detail": f"the request body cannot be parsed ({exc.detail}); send multipart/form-data files"},
                status_code=422,
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_message(e) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(errors), "errors": errors}, status_code=422)
