"""Request body size limits, as a pure ASGI middleware.

A JSON body may be at most ``settings.max_body_bytes``; a data set archive (``POST /v1/datasets``
with a body that is not JSON) at most ``settings.max_upload_bytes``. A ``Content-Length`` over the
limit is answered ``413`` before the app runs; a body without one (chunked) is counted while it
streams, and the request ends with ``413`` as soon as it passes the limit, so no route ever holds
more than the limit in memory or on disk.

A JSON body (at most ``max_body_bytes``, so it is read whole here) is also refused with ``422``
when it nests more than :data:`MAX_JSON_DEPTH` arrays and objects (Python's JSON parser would
otherwise run out of stack on it), or when its bytes are not text in the encoding JSON's parser
reads them as (FastAPI would answer an unhelpful 400). The body is then handed on to the app unchanged.

The limits are read from ``app.state.settings`` on every request, so a test (or an operator) that
swaps the settings sees the new limits at once.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings

UPLOAD_PATH = "/v1/datasets"
MAX_JSON_DEPTH = 64
# a JSON string, or an unterminated one up to the end; possessive, so a body of escaped quotes is linear
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit; FastAPI answers it as 413
    (an ``HTTPException`` passes FastAPI's body parsing unchanged, any other error would be a 400)."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(status_code=413, detail=too_large_message(limit, what))


def too_large_message(limit: int, what: str) -> str:
    fix = "upload the data set in parts" if what == "archive" else "send a smaller request"
    setting = "INCO_MAX_UPLOAD_BYTES" if what == "archive" else "INCO_MAX_BODY_BYTES"
    return f"the {what} is larger than the server's limit of {_human(limit)} ({setting}): {fix}"


def _human(n: int) -> str:
    """1048576 -> '1 MiB'; 1500 -> '1.465 KiB'."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            return f"{value:.4g} {unit}"
    raise AssertionError("unreachable")


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body`` (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", body))
    if not brackets:
        return 0
    return max(accumulate(1 if c in b"[{" else -1 for c in brackets))


def undecodable(body: bytes) -> str | None:
    """Why ``body`` cannot be JSON text (its bytes do not decode in the encoding the JSON parser
    reads them as: UTF-8, or UTF-16/32 by their first bytes), else None."""
    encoding = json.detect_encoding(body)
    try:
        body.decode(encoding, "surrogatepass")  # as json.loads decodes bytes
    except UnicodeDecodeError as exc:
        return f"the body is not valid JSON: byte {exc.start} is not {encoding} text; send the JSON as UTF-8"
    return None


def is_json(content_type: str | None) -> bool:
    """A missing content type counts as JSON, as FastAPI reads it."""
    if not content_type:
        return True
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


PREDICT_PATH = re.compile(r"^/v1/models/[^/]+/predict/?$")


def is_upload(scope: Scope) -> bool:
    """``POST /v1/datasets`` with a body that is not JSON (an archive), or the files of a predict
    request (``POST /v1/models/{id}/predict``)."""
    if scope.get("method") != "POST":
        return False
    path = scope.get("path", "")
    if path.rstrip("/") != UPLOAD_PATH and not PREDICT_PATH.match(path):
        return False
    return not is_json(Headers(scope=scope).get("content-type"))


class BodySizeLimit:
    """``app.add_middleware(BodySizeLimit)``: 413 ``{"detail": ...}`` for bodies over the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        upload = is_upload(scope)
        predict = upload and PREDICT_PATH.match(scope.get("path", "")) is not None
        if predict:
            limit, what = settings.max_predict_bytes, "predict request (its images or archive)"
        else:
            limit = settings.max_upload_bytes if upload else settings.max_body_bytes
            what = "archive" if upload else "request body"
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _answer(send, 400, f"Content-Length must be a number of bytes (got {length[:40]!r})")
                return
            if int(length) > limit:
                await _answer(send, 413, too_large_message(limit, what))
                return

        if not upload and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await _read_json(receive, limit, what)
            if body is None:
                await _answer(send, 413, too_large_message(limit, what))
                return
            depth = json_depth(body)
            if depth > MAX_JSON_DEPTH:
                await _answer(
                    send,
                    422,
                    f"the JSON body is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted: "
                    "send the fields of the API's schema (GET /openapi.json)",
                )
                return
            problem = undecodable(body)
            if problem is not None:
                await _answer(send, 422, problem)
                return
            await self.app(scope, _replay(body, receive), send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, what)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside FastAPI's handlers (e.g. by another middleware)
            if started:
                raise
            await _answer(send, 413, str(exc.detail))


async def _read_json(receive: Receive, limit: int, what: str) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app sees an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the client sends (a disconnect)."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    scope: dict[str, Any] = {"type": "http"}
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}
