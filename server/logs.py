"""Log lines of the API and the worker: one JSON object a line (``INCO_LOG_FORMAT=json``, the default)
or plain text, each carrying the job id and team where they are known.

A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``, then the fields of the
context (``job_id``, ``team``) and those a caller passes with ``extra=`` (the API's request line adds
``method``, ``route``, ``status``, ``duration_ms``). Exceptions come as ``exc``.

The context is process-wide on purpose: an RQ work horse runs one job, and the threads Ray Train and
Tune start for it (which a :class:`contextvars.ContextVar` would not reach) log for that job too.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

CONTEXT_FIELDS = ("job_id", "team")
"""Fields the context adds to every line."""
EXTRA_FIELDS = ("method", "route", "status", "duration_ms", "client")
"""Fields a caller may pass with ``extra=`` that the JSON line keeps."""

_context: dict[str, str] = {}
_lock = threading.Lock()


def bind(**fields: str | None) -> None:
    """Add ``fields`` (e.g. ``job_id``, ``team``) to every line logged from now on; None removes one."""
    with _lock:
        for key, value in fields.items():
            if value is None:
                _context.pop(key, None)
            else:
                _context[key] = str(value)


def unbind(*keys: str) -> None:
    with _lock:
        for key in keys:
            _context.pop(key, None)


def context() -> dict[str, str]:
    with _lock:
        return dict(_context)


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """:func:`bind` for the duration of a ``with`` block, then what was bound before comes back."""
    before = context()
    bind(**fields)
    try:
        yield
    finally:
        with _lock:
            _context.clear()
            _context.update(before)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (fields the record has already win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in context().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``msg``, then context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS + EXTRA_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger [job team] message key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS + EXTRA_FIELDS if hasattr(record, k)]
        return f"{text} {' '.join(tags)}" if tags else text


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be 'json' or 'text' (got {fmt!r}); set INCO_LOG_FORMAT")


def setup_logging(fmt: str = "json", *, level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's lines to ``stream`` (stderr) in ``fmt``; called once by ``inco serve`` and
    ``inco worker``. A handler set up by an earlier call is replaced, other handlers are left alone.
    uvicorn's loggers are routed here too, and its access log is silenced: the API logs one line per
    request of its own (:mod:`server.api.observability`), without headers."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_inco", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(ContextFilter())
    handler._inco = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").handlers.clear()
    logging.getLogger("uvicorn.access").disabled = True
    return handler
