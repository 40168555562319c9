"""Path and query parameters, each bounded in its declaration: the OpenAPI document shows the bounds
(``minimum``/``maximum``, ``maxLength``, ``pattern``), and a value outside them is a 422 naming the
parameter before a route runs, never a query the database cannot run (an offset of 2**70 overflows
SQLite's and PostgreSQL's 64-bit integers; PostgreSQL refuses strings with a NUL byte).

tests/server/test_bounds.py walks the document and fails on an integer parameter without both bounds.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path, Query

from inco_core.config import METHODS, PresetName
from server.store.models import NAME_PATTERN

INT32_MAX = 2**31 - 1
"""The largest value an SQL ``INTEGER`` column holds (row ids, counts): the upper bound of every
integer parameter, so whatever a parameter is compared with, the store can hold the value."""
JOB_ID = r"^[0-9a-f]{1,32}$"
"""Job ids are 32 hex digits; a filter that is anything else is a 422."""
STAGE = r"^[\x20-\x7e]{1,64}$"
"""Stage names ('pretrain', 'finetune 1:16 seed 2') are printable ASCII, at most 64 characters."""

JobIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=32,
        description="the job's id (32 hex digits, from POST /v1/jobs or GET /v1/jobs); another id is not found (404)",
    ),
]
JobIdFilter = Annotated[str | None, Query(pattern=JOB_ID, description="only what this job made (its id)")]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many jobs (1 to 1000)")]
Offset = Annotated[int, Query(ge=0, le=INT32_MAX, description=f"skip this many jobs first (0 to {INT32_MAX})")]
AfterLogId = Annotated[
    int,
    Query(
        ge=0,
        le=INT32_MAX,
        description="only the lines stored after the line with this id (0, the default: every line)",
    ),
]
StageFilter = Annotated[
    str | None, Query(pattern=STAGE, description="only this stage's metrics, e.g. `pretrain` or `finetune 1:16`")
]
DatasetFilter = Annotated[str | None, Query(pattern=NAME_PATTERN, description="only results on this data set")]
MethodFilter = Annotated[str | None, Query(max_length=32, description=f"one of {', '.join(METHODS)}")]
"""Checked against the known methods by :func:`checked_method` (a 422 naming them)."""
RatioFilter = Annotated[str | None, Query(max_length=32, description="a label ratio, e.g. `1:16`")]
"""Written the one way the store keeps it by :func:`normal_ratio`."""
EvalFilter = Literal["finetune", "linear"] | None
PresetFilter = PresetName | None
"""The presets of :mod:`inco_core.config`."""


def checked_method(method: str | None) -> str | None:
    """A ``method`` filter: one of the known methods (422 naming them otherwise)."""
    from inco_core.errors import ConfigError

    if method is not None and method not in METHODS:
        raise ConfigError(f"method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def normal_ratio(ratio: str | None) -> str | None:
    """A ``ratio`` filter as stored (``1:16``), from ``1:16`` or `` 1 : 16 ``; 422 naming it otherwise."""
    from inco_core.config import parse_ratio
    from inco_core.errors import ConfigError

    if ratio is None:
        return None
    try:
        return f"1:{parse_ratio(ratio)}"
    except ConfigError as exc:
        raise ConfigError(f"ratio: {exc}") from None
