"""Errors a user can cause, in one tree.

    InCoError                  base: every message says what went wrong and how to fix it
    ├── ConfigError            a run spec, preset or override that cannot be used
    ├── DataError              a data set that cannot be loaded or split
    │   └── ImageDecodeError   one image file that cannot be decoded (``path`` names it)
    └── CheckpointError        a checkpoint that is missing, corrupt or of another format

The CLI prints ``Error: <message>`` and exits 1; the API (issue 3) maps the tree to HTTP 4xx.
Anything else that escapes is a bug.
"""

from __future__ import annotations

from pathlib import Path


class InCoError(Exception):
    """Base of every error a user can cause."""


class ConfigError(InCoError):
    """A run spec, preset or override that cannot be used."""


class DataError(InCoError):
    """A data set that cannot be loaded or split."""


class ImageDecodeError(DataError):
    """An image file that cannot be decoded."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read image {path}: {reason}; remove or replace the file and run again")

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[Path, str]]:
        return (type(self), (self.path, self.reason))  # picklable across processes (Ray workers)


class CheckpointError(InCoError):
    """A checkpoint that is missing, corrupt or written in another format."""
