"""``/v1/datasets``: register folders under the server's data root by name, or upload an archive.

``POST /v1/datasets`` takes either body:

* JSON ``{"name": ..., "path": ...}``: a folder already under the data root;
* an archive (``application/zip``, ``application/x-tar``, ``application/gzip`` for .tar.gz) with the
  name in the query, ``?name=NAME``: streamed to a temporary file under the data root, checked entry
  by entry (:mod:`server.archives`), unpacked into a temporary folder and renamed to
  ``<data root>/uploads/<team id>/<name>`` once it scans as a data set. A failed upload leaves no
  folder and no row.

Both are one operation in the OpenAPI document; two routes serve it, told apart by Content-Type.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.routing import APIRoute
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Scope

from inco_core.errors import ConfigError, DataError
from server import archives
from server.api.deps import SessionDep, SettingsDep, SubmitTeamDep, TeamDep
from server.api.errors import AUTH, INVALID, RETRY_AFTER, answer
from server.api.limits import is_json, too_large_message
from server.errors import Conflict, ServiceUnavailable, TooLarge
from server.settings import Settings
from server.store import access
from server.store.models import NAME_PATTERN, DatasetCreate, DatasetPublic, Team

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=AUTH)
UPLOADS = "uploads"
MAX_NAMES_SHOWN = 20
_BINARY = {"schema": {"type": "string", "format": "binary"}}
ARCHIVE_BODY: dict[str, Any] = {
    "requestBody": {
        "description": "JSON names a folder under the data root; an archive (zip, tar, tar.gz) is unpacked "
        "under the data root, and then needs `?name=NAME`",
        "content": {
            "application/zip": _BINARY,
            "application/x-tar": _BINARY,
            "application/gzip": _BINARY,
        },
    },
    "parameters": [
        {
            "name": "name",
            "in": "query",
            "required": False,
            "description": "archive uploads: the data set's name (letters, digits, '_', '.', '-'; up to 64)",
            "schema": {"type": "string", "pattern": NAME_PATTERN},
        }
    ],
}


def resolve_under(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) as a real folder inside ``root``; symlinks that
    lead out of it and ``..`` are refused, and so are names the file system cannot hold."""
    if "\x00" in path:
        raise ConfigError("path: contains a NUL byte; name a folder under the server's data root")
    real_root = Path(os.path.realpath(root))
    candidate = Path(path)
    try:
        target = Path(os.path.realpath(candidate if candidate.is_absolute() else real_root / candidate))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"path: {path[:100]!r} cannot be used ({exc}); name a folder under the data root") from None
    if target != real_root and real_root not in target.parents:
        raise ConfigError(
            f"path: {path[:200]!r} is outside the server's data root {real_root}; copy the images under it"
        )
    return target


def _clip(text: str, size: int = 600) -> str:
    """``text``, or its start and end around '...' when it is longer than ``size``."""
    return text if len(text) <= size else f"{text[: size - 200]}...{text[-180:]}"


def _uploads(settings: Settings) -> Path:
    return Path(os.path.realpath(settings.data_root_dir)) / UPLOADS


def _scan_for(folder: Path, real_root: Path, label: str) -> tuple[int, list[str]]:
    """(images, classes) of a data set folder; every image must really be inside ``real_root``."""
    from inco_core.files import scan

    try:
        items = scan(folder)
    except DataError as exc:
        raise ConfigError(f"{label}: {_clip(str(exc))}") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {folder} ({exc.strerror or exc})") from None
    inside = os.path.join(real_root, "")  # the root with a trailing separator
    outside = [str(f) for f, _ in items if not os.path.realpath(f).startswith(inside)]
    if outside:
        shown = ", ".join(outside[:MAX_NAMES_SHOWN]) + (" ..." if len(outside) > MAX_NAMES_SHOWN else "")
        raise ConfigError(
            f"{label}: {len(outside)} image(s) are symlinks out of the data root {real_root} ({shown}): "
            "copy the files themselves"
        )
    classes = sorted({c for _, c in items})
    if len(classes) < 2:
        raise ConfigError(f"{label}: {folder} holds one class ({classes[0]}); a classifier needs at least two")
    return len(items), classes


@router.get("", response_model=list[DatasetPublic])
def list_datasets(team: TeamDep, session: SessionDep) -> list[DatasetPublic]:
    return [
        DatasetPublic.model_validate(d, from_attributes=True) for d in access.list_datasets(session, team_id=team.id)
    ]


# -- archive uploads: a route of its own, matched only for bodies that are not JSON ---------------------
class _ArchiveRoute(APIRoute):
    """Matches ``POST /v1/datasets`` when the Content-Type is set and is not JSON, so the JSON route
    keeps FastAPI's body parsing and this one can stream."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and not is_json(Headers(scope=scope).get("content-type")):
            return match, child
        return Match.NONE, {}


async def upload_dataset(
    request: Request,
    team: SubmitTeamDep,
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
) -> DatasetPublic:
    """Unpack an archive of images (zip, tar, tar.gz) under the data root and register it."""
    content_type = request.headers.get("content-type", "")
    kind = archives.archive_kind(content_type)
    if kind is None:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f'Content-Type {content_type[:100]!r} is not accepted: send JSON {{"name", "path"}}, or an archive '
            "as application/zip, application/x-tar or application/gzip (.tar.gz) with ?name=NAME",
        )
    if name is None:
        raise ConfigError("name: field required; an archive upload names its data set in the query: ?name=NAME")
    await run_in_threadpool(_name_free, session, team, name, settings)
    incoming = _uploads(settings) / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    part = incoming / f"{secrets.token_hex(8)}.part"
    try:
        size = 0
        with part.open("xb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise TooLarge(too_large_message(settings.max_upload_bytes, "archive"))
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise ServiceUnavailable(
                        f"the server cannot store the upload ({exc.strerror or exc}); nothing was kept, try again later"
                    ) from None
        if size == 0:
            raise ConfigError("the archive is empty: send the archive's bytes as the request body")
        return await run_in_threadpool(_register_archive, session, team, name, part, kind, settings)
    finally:
        part.unlink(missing_ok=True)


router.add_api_route(
    "",
    upload_dataset,
    methods=["POST"],
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    include_in_schema=False,  # documented on the JSON route: one operation, two bodies
    route_class_override=_ArchiveRoute,
)


def _name_free(session: Session, team: Team, name: str, settings: Settings) -> None:
    """409 before the body is read when the name is taken (by a row, or by an upload folder)."""
    if any(d.name == name for d in access.list_datasets(session, team_id=team.id)):
        raise Conflict(f"data set {name!r} exists already: pick another name")
    if (_uploads(settings) / str(team.id) / name).exists():
        raise Conflict(f"an upload named {name!r} is in progress or was left behind: pick another name")


def _register_archive(
    session: Session, team: Team, name: str, archive: Path, kind: str, settings: Settings
) -> DatasetPublic:
    """Unpack into a temporary folder, scan, rename into place, store the row; undo all on failure."""
    team_dir = _uploads(settings) / str(team.id)
    team_dir.mkdir(parents=True, exist_ok=True)
    final = team_dir / name
    work = team_dir / f".{name}.{secrets.token_hex(6)}"  # hidden: never scanned, never a name
    try:
        archives.extract(
            archive,
            kind,
            work / "x",
            max_files=settings.max_upload_files,
            max_bytes=settings.max_upload_bytes * archives.UNPACK_FACTOR,
        )
        root = archives.single_root(work / "x")
        images, classes = _scan_for(root, Path(os.path.realpath(settings.data_root_dir)), "archive")
        try:
            os.rename(root, final)  # atomic: the folder appears whole or not at all
        except OSError:
            raise Conflict(f"an upload named {name!r} is in progress or was left behind: pick another name") from None
        try:
            ds = access.add_dataset(
                session, team_id=team.id, name=name, path=str(final), images=images, classes=classes
            )
            session.commit()
        except IntegrityError:  # the same name registered by a request that ran alongside
            session.rollback()
            archives.remove(final)
            raise Conflict(f"data set {name!r} exists already: pick another name") from None
        except BaseException:
            session.rollback()
            archives.remove(final)
            raise
    finally:
        archives.remove(work)
    return DatasetPublic.model_validate(ds, from_attributes=True)


def _check_not_others_uploads(folder: Path, path: str, uploads: Path, team: Team) -> None:
    """A team registers its own uploads only: not another team's, nor a folder that holds them all."""
    own = uploads / str(team.id)
    if folder in uploads.parents or folder == uploads:
        raise ConfigError(f"path: {path[:200]!r} holds the uploads of every team; name a folder inside it")
    if uploads in folder.parents and folder != own and own not in folder.parents:
        raise ConfigError(f"path: {path[:200]!r} is another team's upload; register your own folders")


# -- JSON: a folder already under the data root ---------------------------------------------------------
REGISTER_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: answer("the team has a data set of this name already (or an upload of it is in progress)"),
    413: answer("the body is larger than the server's limit (INCO_MAX_BODY_BYTES; INCO_MAX_UPLOAD_BYTES for archives)"),
    415: answer("the Content-Type is neither JSON nor an archive (zip, tar, gzip)"),
    **INVALID,
    503: answer("the database is down, or the server cannot store the upload; nothing was kept", headers=RETRY_AFTER),
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses=REGISTER_RESPONSES,
    openapi_extra=ARCHIVE_BODY,
)
def register_dataset(
    body: DatasetCreate, team: SubmitTeamDep, session: SessionDep, settings: SettingsDep
) -> DatasetPublic:
    """Register a folder of class sub-folders (or NEU-style file names) under a name, or upload an
    archive of one (zip, tar, tar.gz; `?name=NAME`), which is unpacked under the data root."""
    folder = resolve_under(settings.data_root_dir, body.path)
    _check_not_others_uploads(folder, body.path, _uploads(settings), team)
    real_root = Path(os.path.realpath(settings.data_root_dir))
    images, classes = _scan_for(folder, real_root, "path")
    ds = access.add_dataset(session, team_id=team.id, name=body.name, path=str(folder), images=images, classes=classes)
    return DatasetPublic.model_validate(ds, from_attributes=True)
