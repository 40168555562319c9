"""Checkpoint files: weights plus the resolved config, code version and data fingerprint.

A checkpoint is a ``torch.save`` dict loadable with ``weights_only=True``:

    format          int, CHECKPOINT_FORMAT
    kind            "pretrain" | "finetune"
    method          method name
    state_dict      the module's weights
    config          the resolved TrainingConfig (plain JSON data)
    code_version    inco_core version + git commit when known
    data_fingerprint
    meta            free JSON data (seed, classes, epochs, metrics, ...)
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

import inco_core
from inco_core.errors import CheckpointError

CHECKPOINT_FORMAT = 1


@functools.cache
def code_version() -> str:
    """``0.1.0`` or ``0.1.0+g<commit>`` (``-dirty`` with local changes) inside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return inco_core.__version__
    return f"{inco_core.__version__}+g{sha}{'-dirty' if dirty else ''}"


def save_checkpoint(
    path: Path,
    *,
    kind: str,
    method: str,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    data_fingerprint: str,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "method": method,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "config": config,
        "code_version": code_version(),
        "data_fingerprint": data_fingerprint,
        "meta": meta or {},
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint. Raises :class:`CheckpointError` with the fix."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); delete it and run again") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an InCo checkpoint of format {CHECKPOINT_FORMAT}; it was written by "
            "another program or version"
        )
    return blob
