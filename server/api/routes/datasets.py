"""``/v1/datasets``: register folders under the server's data root by name."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, status

from inco_core.errors import ConfigError, DataError
from server.api.deps import SessionDep, SettingsDep, TeamDep
from server.store import access
from server.store.models import DatasetCreate, DatasetPublic

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def resolve_under(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) as a real folder inside ``root``; symlinks that
    lead out of it and ``..`` are refused."""
    real_root = Path(os.path.realpath(root))
    candidate = Path(path)
    target = Path(os.path.realpath(candidate if candidate.is_absolute() else real_root / candidate))
    if target != real_root and real_root not in target.parents:
        raise ConfigError(f"path: {path!r} is outside the server's data root {real_root}; copy the images under it")
    return target


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic)
def register_dataset(body: DatasetCreate, team: TeamDep, session: SessionDep, settings: SettingsDep) -> DatasetPublic:
    """Register a folder of class sub-folders (or NEU-style file names) under a name."""
    from inco_core.data import scan

    folder = resolve_under(settings.data_root_dir, body.path)
    try:
        items = scan(folder)
    except DataError as exc:
        raise ConfigError(f"path: {exc}") from None
    classes = sorted({c for _, c in items})
    if len(classes) < 2:
        raise ConfigError(f"path: {folder} holds one class ({classes[0]}); a classifier needs at least two")
    ds = access.add_dataset(
        session, team_id=team.id, name=body.name, path=str(folder), images=len(items), classes=classes
    )
    return DatasetPublic.model_validate(ds, from_attributes=True)


@router.get("", response_model=list[DatasetPublic])
def list_datasets(team: TeamDep, session: SessionDep) -> list[DatasetPublic]:
    return [
        DatasetPublic.model_validate(d, from_attributes=True) for d in access.list_datasets(session, team_id=team.id)
    ]
