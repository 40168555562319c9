"""``/v1/artifacts`` and ``/v1/jobs/{job_id}/artifacts``: the team's checkpoints in the artifact store
(pretrained backbones, fine-tuned models), without their server paths."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from server.api.deps import SessionDep, TeamDep
from server.api.errors import AUTH, INVALID, answer
from server.api.params import JOB_ID, JobIdFilter
from server.store import access
from server.store.models import ArtifactPublic

router = APIRouter(prefix="/v1", tags=["artifacts"], responses=AUTH)


@router.get("/artifacts", response_model=list[ArtifactPublic], responses=INVALID)
def list_artifacts(team: TeamDep, session: SessionDep, job_id: JobIdFilter = None) -> list[ArtifactPublic]:
    """The team's artifacts, oldest first; ``job_id`` keeps those one job made."""
    return [
        ArtifactPublic.model_validate(a, from_attributes=True)
        for a in access.list_artifacts(session, team_id=team.id, job_id=job_id)
    ]


@router.get(
    "/jobs/{job_id}/artifacts",
    response_model=list[ArtifactPublic],
    responses={404: answer("the team has no job with this id"), **INVALID},
)
def job_artifacts(
    job_id: Annotated[str, Path(pattern=JOB_ID, description="the job's id (32 hex digits)")],
    team: TeamDep,
    session: SessionDep,
) -> list[ArtifactPublic]:
    """The artifacts one job of the team made (404 for a job of another team)."""
    access.get_job(session, job_id=job_id, team_id=team.id)
    return [
        ArtifactPublic.model_validate(a, from_attributes=True)
        for a in access.list_artifacts(session, team_id=team.id, job_id=job_id)
    ]
