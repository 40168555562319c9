"""``/v1/artifacts`` and ``/v1/jobs/{job_id}/artifacts``: the team's checkpoints in the artifact store
(pretrained backbones, fine-tuned models), without their server paths."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.api.deps import SessionDep, TeamDep
from server.store import access
from server.store.models import ArtifactPublic

router = APIRouter(prefix="/v1", tags=["artifacts"])
JOB_ID = r"^[0-9a-f]{1,32}$"
"""Job ids are 32 hex digits; anything else (a NUL byte, which PostgreSQL refuses) is a 422."""


@router.get("/artifacts", response_model=list[ArtifactPublic])
def list_artifacts(
    team: TeamDep, session: SessionDep, job_id: Annotated[str | None, Query(pattern=JOB_ID)] = None
) -> list[ArtifactPublic]:
    """The team's artifacts, oldest first; ``job_id`` keeps those one job made."""
    return [
        ArtifactPublic.model_validate(a, from_attributes=True)
        for a in access.list_artifacts(session, team_id=team.id, job_id=job_id)
    ]


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactPublic])
def job_artifacts(
    job_id: Annotated[str, Path(pattern=JOB_ID)], team: TeamDep, session: SessionDep
) -> list[ArtifactPublic]:
    """The artifacts one job of the team made (404 for a job of another team)."""
    access.get_job(session, job_id=job_id, team_id=team.id)
    return [
        ArtifactPublic.model_validate(a, from_attributes=True)
        for a in access.list_artifacts(session, team_id=team.id, job_id=job_id)
    ]
