"""``/v1/jobs``: submit, list, inspect, follow and cancel jobs of the caller's team."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session

from inco_core.config import RunSpec, load_spec
from inco_core.errors import ConfigError
from server import queue
from server.api.deps import RedisDep, SessionDep, SettingsDep, SubmitTeamDep, TeamDep
from server.api.errors import AUTH, INVALID, RETRY_AFTER, answer
from server.api.params import AfterLogId, JobIdPath, Limit, Offset, StageFilter
from server.errors import Conflict, LimitReached, NotFound, StoreUnavailable
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import (
    Job,
    JobCreate,
    JobKind,
    JobLogPublic,
    JobPublic,
    JobStatus,
    MetricPublic,
    ResultPublic,
    Team,
    TrialPublic,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTH)
DEFAULT_DATASET = "default"
NO_JOB = {404: answer("the team has no job with this id")}
JOB_ROUTES = {
    "GetJob": ("get", "/v1/jobs/{job_id}"),
    "JobMetrics": ("get", "/v1/jobs/{job_id}/metrics"),
    "JobLogs": ("get", "/v1/jobs/{job_id}/logs"),
    "JobResults": ("get", "/v1/jobs/{job_id}/results"),
    "JobTrials": ("get", "/v1/jobs/{job_id}/trials"),
    "JobArtifacts": ("get", "/v1/jobs/{job_id}/artifacts"),
    "CancelJob": ("post", "/v1/jobs/{job_id}/cancel"),
}


def job_links() -> dict[str, Any]:
    """OpenAPI links from an answer that shows a job to the routes about that job (clients and
    schemathesis's stateful tests follow them)."""
    links: dict[str, Any] = {
        name: {
            "operationRef": f"#/paths/{path.replace('/', '~1')}/{method}",
            "parameters": {"job_id": "$response.body#/id"},
        }
        for name, (method, path) in JOB_ROUTES.items()
    }
    links["ArtifactsOfJob"] = {
        "operationRef": "#/paths/~1v1~1artifacts/get",
        "parameters": {"query.job_id": "$response.body#/id"},
    }
    return links


IDEMPOTENCY_KEY = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces


def request_hash(body: JobCreate) -> str:
    """SHA-256 of the request as validated, so the same request sent twice hashes the same."""
    canonical = json.dumps(body.model_dump(mode="json", exclude_unset=False), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_gpus(spec: RunSpec) -> int:
    return math.ceil(spec.resources.gpus)


def _check_limits(session: Session, team: Team, settings: Settings, gpus: int) -> None:
    """Per-team limits: queued + running jobs, and the GPUs they hold (429 while at the limit)."""
    max_jobs = team.max_active_jobs if team.max_active_jobs is not None else settings.max_active_jobs
    max_gpus = team.max_gpus if team.max_gpus is not None else settings.max_gpus
    if gpus > max_gpus:
        raise ConfigError(
            f"spec.resources: the job needs {gpus} GPU(s) but team {team.name!r} may use {max_gpus} at once; "
            "lower resources.workers / gpus_per_worker, or ask an admin to raise the team's GPU limit"
        )
    count, held = access.active_usage(session, team_id=team.id)
    if count >= max_jobs:
        raise LimitReached(
            f"team {team.name!r} has {count} queued or running jobs, its limit is {max_jobs}: "
            "wait for one to end or cancel one (inco jobs, inco cancel ID), then submit again"
        )
    if gpus and held + gpus > max_gpus:
        raise LimitReached(
            f"team {team.name!r} holds {held} of its {max_gpus} GPU(s) in queued or running jobs and this job needs "
            f"{gpus}: wait for one to end, then submit again"
        )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={
        200: {
            "description": "the same Idempotency-Key and request were sent before: the job made then",
            "model": JobPublic,
            "headers": {
                "Idempotent-Replayed": {
                    "description": "`true`: this job was made by an earlier request",
                    "required": True,
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
            "links": job_links(),
        },
        201: {"description": "the job, stored `queued` and on the queue", "links": job_links()},
        409: answer(
            "the Idempotency-Key was used with another request, or the tune job named in from_tune "
            "has not succeeded or has no finished trial"
        ),
        413: answer("the body is larger than the server's limit (INCO_MAX_BODY_BYTES)"),
        **INVALID,
        429: answer("the team is at its limit of queued + running jobs or GPUs", headers=RETRY_AFTER),
        503: answer("Redis or the database is down; nothing was stored", headers=RETRY_AFTER),
    },
)
def submit_job(
    body: JobCreate,
    team: SubmitTeamDep,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=IDEMPOTENCY_KEY,
            description="any unique string (a UUID): sending the same request again with the same key returns "
            "the job made the first time instead of a second job",
        ),
    ] = None,
) -> JobPublic:
    """Validate a job, store it ``queued`` and put its id on the queue. If Redis is down the answer is
    503 and nothing is stored."""
    digest = request_hash(body)
    if idempotency_key is not None:
        earlier = access.job_for_key(session, team_id=team.id, key=idempotency_key)
        if earlier is not None:
            return _replay(session, team, earlier, digest, response)
    from_tune: dict[str, object] | None = None
    if body.from_tune:
        body, from_tune = _apply_tune(session, team_id=team.id, body=body)
    name = body.spec.data.dataset or DEFAULT_DATASET
    try:
        dataset = access.get_dataset(session, team_id=team.id, name=name)
    except NotFound as exc:
        raise ConfigError(f"spec.data.dataset: {exc}") from None
    depends_on = None
    if body.pretrained_job:
        try:
            parent = access.get_job(session, job_id=body.pretrained_job, team_id=team.id)
        except NotFound:
            raise ConfigError(f"pretrained_job: no job {body.pretrained_job!r} in your team") from None
        if parent.kind != JobKind.pretrain:
            raise ConfigError(f"pretrained_job: job {parent.id} is a {parent.kind} job, not a pretrain job")
        if parent.spec.get("method") != body.spec.method:
            raise ConfigError(
                f"pretrained_job: job {parent.id} pretrained {parent.spec.get('method')!r}, "
                f"but this job's method is {body.spec.method!r}"
            )
        if parent.status in (JobStatus.failed, JobStatus.canceled):
            raise ConfigError(f"pretrained_job: job {parent.id} ended {parent.status}; submit a new pretrain job")
        missing = set(body.spec.seeds) - set(parent.spec.get("seeds", []))
        if missing:
            raise ConfigError(f"pretrained_job: job {parent.id} did not pretrain seed(s) {sorted(missing)}")
        if parent.status != JobStatus.succeeded:
            depends_on = parent.id
    spec = body.spec.model_copy(
        update={"data": body.spec.data.model_copy(update={"path": dataset.path, "dataset": name})}
    )
    gpus = job_gpus(spec)
    _check_limits(session, team, settings, gpus)
    queue.ping(redis)
    try:
        job = _store(session, team.id, body, spec, gpus, idempotency_key, digest, from_tune)
    except IntegrityError:
        session.rollback()
        earlier = access.job_for_key(session, team_id=team.id, key=idempotency_key) if idempotency_key else None
        if earlier is None:
            raise
        return _replay(session, team, earlier, digest, response)  # the same key raced in from a second request
    except SQLAlchemyError as exc:
        raise StoreUnavailable("the database is unreachable, the job was not stored") from exc
    try:
        queue.enqueue(
            redis,
            queue_name=settings.queue,
            job_id=job.id,
            depends_on=depends_on,
            retries=settings.job_retries,
            timeout_s=settings.job_timeout_s,
        )
    except Exception:
        with session_scope(session.get_bind()) as s:  # nothing half-made: the row goes again
            access.delete_job(s, job_id=job.id)
        raise
    return access.job_public(session, job_id=job.id, team_id=team.id, team=team.name)


def _store(
    session: Session,
    team_id: int,
    body: JobCreate,
    spec: RunSpec,
    gpus: int,
    key: str | None,
    digest: str,
    from_tune: dict[str, object] | None,
) -> Job:
    """Insert and commit the queued row (before it is queued, so a worker always finds it)."""
    job = access.create_job(
        session,
        team_id=team_id,
        request=body,
        spec=spec.model_dump(mode="json"),
        gpus=gpus,
        idempotency_key=key,
        request_hash=digest,
    )
    if from_tune is not None:
        job.outputs = {"from_tune": from_tune}
        access.add_log(
            session,
            job_id=job.id,
            message=f"settings of tune job {from_tune['job']}, trial {from_tune['trial']} "
            f"(validation accuracy {from_tune['score']:.4f}): {from_tune['params']}",
        )
    session.commit()
    return job


def _replay(session: Session, team: Team, job: Job, digest: str, response: Response) -> JobPublic:
    if job.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key was used for job {job.id} with a different request: "
            "send a new key for a new job, or the same request to get that job"
        )
    response.status_code = status.HTTP_200_OK
    response.headers["Idempotent-Replayed"] = "true"
    return access.job_public(session, job_id=job.id, team_id=team.id, team=team.name)


def _apply_tune(session: Session, *, team_id: int, body: JobCreate) -> tuple[JobCreate, dict[str, object]]:
    """An experiment with the best trial of a finished tune job: the trial's overrides, under the
    request's own; method, preset, optimiser, data set and resources default to the tune job's."""
    assert body.from_tune is not None
    try:
        source = access.get_job(session, job_id=body.from_tune, team_id=team_id)
    except NotFound:
        raise ConfigError(f"from_tune: no job {body.from_tune!r} in your team (inco jobs lists them)") from None
    if source.kind != JobKind.tune:
        raise ConfigError(f"from_tune: job {source.id} is a {source.kind} job, not a tune job")
    if source.status != JobStatus.succeeded:
        raise Conflict(
            f"tune job {source.id} is {source.status}; submit from it once it has succeeded (inco wait {source.id})"
        )
    best = access.best_trial(session, job_id=source.id)
    if best is None:
        raise Conflict(f"tune job {source.id} has no trial that ran to the end; run a new search with more trials")
    given = body.spec.model_fields_set
    merged = body.spec.model_dump(mode="json")
    for field in ("method", "preset", "optimizer", "resources"):
        if field not in given:
            merged[field] = source.spec[field]
    if body.spec.data.dataset is None:
        merged["data"]["dataset"] = source.spec["data"].get("dataset")
    merged["overrides"] = {**source.spec.get("overrides", {}), **best.params, **body.spec.overrides}
    spec = load_spec(merged)
    if spec.method != source.spec["method"]:
        raise ConfigError(
            f"from_tune: tune job {source.id} tuned {source.spec['method']!r}, not {spec.method!r}; "
            "leave the method out to use the tune job's"
        )
    picked = {"job": source.id, "trial": best.number, "score": best.score, "params": best.params}
    return body.model_copy(update={"spec": spec}), picked


@router.get("", response_model=list[JobPublic], responses=INVALID)
def list_jobs(
    team: TeamDep,
    session: SessionDep,
    status: JobStatus | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> list[JobPublic]:
    """The team's jobs, newest first."""
    return access.list_jobs_public(session, team_id=team.id, team=team.name, status=status, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses={**NO_JOB, **INVALID})
def get_job(job_id: JobIdPath, team: TeamDep, session: SessionDep) -> JobPublic:
    return access.job_public(session, job_id=job_id, team_id=team.id, team=team.name)


@router.get("/{job_id}/metrics", response_model=list[MetricPublic], responses={**NO_JOB, **INVALID})
def job_metrics(job_id: JobIdPath, team: TeamDep, session: SessionDep, stage: StageFilter = None) -> list[MetricPublic]:
    """Per-epoch metrics of every stage (loss, DWV weight, kNN accuracy, images/s, ...)."""
    access.get_job(session, job_id=job_id, team_id=team.id)
    return [
        MetricPublic.model_validate(m, from_attributes=True)
        for m in access.list_metrics(session, job_id=job_id, stage=stage)
    ]


@router.get("/{job_id}/logs", response_model=list[JobLogPublic], responses={**NO_JOB, **INVALID})
def job_logs(job_id: JobIdPath, team: TeamDep, session: SessionDep, after: AfterLogId = 0) -> list[JobLogPublic]:
    """The job's log: status changes, stages, one line per epoch, errors."""
    access.get_job(session, job_id=job_id, team_id=team.id)
    return [
        JobLogPublic.model_validate(r, from_attributes=True)
        for r in access.list_logs(session, job_id=job_id, after=after)
    ]


@router.get("/{job_id}/results", response_model=list[ResultPublic], responses={**NO_JOB, **INVALID})
def job_results(job_id: JobIdPath, team: TeamDep, session: SessionDep) -> list[ResultPublic]:
    """Per-seed result rows of one job (accuracy, per-class recall, confusion matrix, ...)."""
    access.get_job(session, job_id=job_id, team_id=team.id)
    rows = access.list_results(session, team_id=team.id, job_id=job_id)
    return [ResultPublic.model_validate(r, from_attributes=True) for r in rows]


@router.get(
    "/{job_id}/trials",
    response_model=list[TrialPublic],
    responses={404: answer("the team has no job with this id, or the job is not a tune job"), **INVALID},
)
def job_trials(job_id: JobIdPath, team: TeamDep, session: SessionDep) -> list[TrialPublic]:
    """The trials of a tune job, best first: trials that ran every epoch by validation accuracy,
    then trials ASHA stopped early, running trials and failed ones."""
    job: Job = access.get_job(session, job_id=job_id, team_id=team.id)
    if job.kind != JobKind.tune:
        raise NotFound(f"job {job.id} is a {job.kind} job; trials belong to tune jobs (inco tune)")
    return [TrialPublic.model_validate(t, from_attributes=True) for t in access.list_trials(session, job_id=job.id)]


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={
        200: {"description": "the job, `canceled` or with its cancel requested", "links": job_links()},
        **NO_JOB,
        409: answer("the job already ended"),
        413: answer("the body is larger than the server's limit (INCO_MAX_BODY_BYTES); send none"),
        **INVALID,
        503: answer("Redis or the database is down; nothing was changed", headers=RETRY_AFTER),
    },
)
def cancel_job(job_id: JobIdPath, team: SubmitTeamDep, session: SessionDep, redis: RedisDep) -> JobPublic:
    """A queued job ends ``canceled`` at once; a running one stops within seconds. Fine-tune jobs
    waiting for it are canceled too. 409 when the job already ended."""
    job = access.get_job(session, job_id=job_id, team_id=team.id)
    queue.ping(redis)
    access.request_cancel(session, job=job)
    queue.request_cancel(redis, job_id=job.id)
    for dep in access.dependents(session, job_id=job.id):
        if dep.status == JobStatus.queued:
            access.finish_job(
                session, job_id=dep.id, status=JobStatus.canceled, error=f"pretrain job {job.id} was canceled"
            )
            queue.request_cancel(redis, job_id=dep.id)
    session.commit()
    return access.job_public(session, job_id=job.id, team_id=team.id, team=team.name)
