"""Data access: small keyword-only functions over a session. Every query is scoped to a team
where the caller is a team (the API); the worker, acting for the service, passes ``team_id=None``."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_
from sqlalchemy import select as core_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from inco_core.errors import ConfigError
from inco_core.progress import EpochLog
from server.errors import Conflict, NotFound
from server.store.models import (
    DEFAULT_SCOPES,
    ApiToken,
    Artifact,
    Dataset,
    Job,
    JobCreate,
    JobLog,
    JobPublic,
    JobStatus,
    LeaderboardRow,
    Metric,
    Model,
    Result,
    Scope,
    Team,
    TrialStatus,
    TuneTrial,
    utcnow,
)

TOKEN_PREFIX = "inco_"


# -- teams and tokens ---------------------------------------------------------------------------
def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_team(session: Session, *, name: str) -> Team:
    team = session.exec(select(Team).where(Team.name == name)).first()
    if team is None:
        team = Team(name=name)
        session.add(team)
        session.flush()
    return team


def check_scopes(scopes: list[str] | None) -> list[str]:
    """``scopes`` as stored: known names, each once, in the order read, submit, admin, predict; None gives the
    default (read and submit). Raises ConfigError naming the unknown ones."""
    if scopes is None:
        return list(DEFAULT_SCOPES)
    known = [s.value for s in Scope]
    unknown = sorted({s for s in scopes if s not in known})
    if unknown:
        raise ConfigError(f"scopes: unknown scope(s) {unknown}; choose from {', '.join(known)}")
    if not scopes:
        raise ConfigError(f"scopes: a token needs at least one scope ({', '.join(known)})")
    return [s for s in known if s in scopes]


def create_token(session: Session, *, team: Team, name: str = "", scopes: list[str] | None = None) -> str:
    """A new bearer token for ``team`` with ``scopes`` (default read and submit); the plain token is
    returned once and only its SHA-256 is stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            team_id=team.id,
            token_hash=hash_token(token),
            prefix=token[:12],
            name=name,
            scopes=check_scopes(scopes),
        )
    )
    session.flush()
    return token


def authenticate(session: Session, *, token: str) -> tuple[Team, ApiToken] | None:
    """The team and token row of a valid, unrevoked token (hashes compared in constant time), else None."""
    digest = hash_token(token)
    found = session.exec(
        select(ApiToken, Team).join(Team, col(Team.id) == col(ApiToken.team_id)).where(ApiToken.token_hash == digest)
    ).first()
    if found is None:
        return None
    row, team = found
    if row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return team, row


def team_for_token(session: Session, *, token: str) -> Team | None:
    """The team of a valid, unrevoked token (hashes compared in constant time), else None."""
    found = authenticate(session, token=token)
    return found[0] if found is not None else None


def find_team(session: Session, *, name: str) -> Team | None:
    return session.exec(select(Team).where(Team.name == name)).first()


def list_tokens(session: Session, *, team_id: int) -> list[ApiToken]:
    """The team's tokens, revoked ones included, oldest first."""
    query = select(ApiToken).where(ApiToken.team_id == team_id).order_by(col(ApiToken.created_at), col(ApiToken.id))
    return list(session.exec(query).all())


def revoke_token(session: Session, *, prefix: str, team_id: int | None = None) -> int:
    """Revoke the active tokens starting with ``prefix`` (of ``team_id`` only, when given); how many."""
    query = select(ApiToken).where(ApiToken.prefix == prefix, col(ApiToken.revoked_at).is_(None))
    if team_id is not None:
        query = query.where(ApiToken.team_id == team_id)
    rows = session.exec(query).all()
    for row in rows:
        row.revoked_at = utcnow()
        session.add(row)
    return len(rows)


# -- data sets ----------------------------------------------------------------------------------
def add_dataset(
    session: Session, *, team_id: int, name: str, path: str, images: int, classes: list[str], replace: bool = False
) -> Dataset:
    existing = session.exec(select(Dataset).where(Dataset.team_id == team_id, Dataset.name == name)).first()
    if existing is not None:
        if not replace:
            raise Conflict(f"data set {name!r} exists already: pick another name")
        existing.path, existing.images, existing.classes = path, images, classes
        session.add(existing)
        return existing
    ds = Dataset(team_id=team_id, name=name, path=path, images=images, classes=classes)
    session.add(ds)
    session.flush()
    return ds


def get_dataset(session: Session, *, team_id: int, name: str) -> Dataset:
    ds = session.exec(select(Dataset).where(Dataset.team_id == team_id, Dataset.name == name)).first()
    if ds is None:
        known = [d.name for d in list_datasets(session, team_id=team_id)]
        hint = f"registered: {', '.join(known)}" if known else "none is registered yet"
        raise NotFound(f"no data set named {name!r} ({hint}); register one with POST /v1/datasets")
    return ds


def list_datasets(session: Session, *, team_id: int) -> list[Dataset]:
    return list(session.exec(select(Dataset).where(Dataset.team_id == team_id).order_by(col(Dataset.name))).all())


# -- jobs ---------------------------------------------------------------------------------------
def create_job(
    session: Session,
    *,
    team_id: int,
    request: JobCreate,
    spec: dict[str, Any],
    gpus: int = 0,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Job:
    job = Job(
        team_id=team_id,
        kind=request.kind,
        spec=spec,
        pretrained_job=request.pretrained_job,
        tune=request.tune.model_dump(mode="json") if request.tune is not None else None,
        gpus=gpus,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    session.flush()
    add_log(session, job_id=job.id, message=f"queued: {request.kind} of {request.spec.method}")
    return job


def job_for_key(session: Session, *, team_id: int, key: str) -> Job | None:
    """The team's job submitted with this ``Idempotency-Key``, if any."""
    return session.exec(select(Job).where(Job.team_id == team_id, Job.idempotency_key == key)).first()


def active_usage(session: Session, *, team_id: int) -> tuple[int, int]:
    """How many of the team's jobs are queued or running, and the GPUs they hold."""
    active = (JobStatus.queued, JobStatus.running)
    count, gpus = session.exec(
        select(func.count(), func.coalesce(func.sum(Job.gpus), 0)).where(
            Job.team_id == team_id, col(Job.status).in_(active)
        )
    ).one()
    return int(count), int(gpus)


JOB_ID = re.compile(r"[0-9a-f]{32}")


def get_job(session: Session, *, job_id: str, team_id: int | None) -> Job:
    # an id that cannot exist is not sent to the database (PostgreSQL refuses NUL bytes with an error)
    job = session.get(Job, job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None or (team_id is not None and job.team_id != team_id):
        raise _no_job(job_id)
    return job


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r}: list your jobs with GET /v1/jobs (inco jobs)")


# the columns a job shows through the API, and how many results it has, read as plain rows: loading
# ORM objects for a page of jobs cost most of a request's CPU (bench/load.py, bench/results/load-cpu.md)
_JOB_PUBLIC_FIELDS = tuple(f for f in JobPublic.model_fields if f not in ("team", "results"))


def _public_columns() -> list[Any]:
    jobs = Job.__table__.c  # type: ignore[attr-defined]
    counts = (
        core_select(func.count())
        .select_from(Result)
        .where(col(Result.job_id) == jobs.id)
        .scalar_subquery()
        .label("results")
    )
    return [*(jobs[name] for name in _JOB_PUBLIC_FIELDS), counts]


def job_public(session: Session, *, job_id: str, team_id: int, team: str) -> JobPublic:
    """Job ``job_id`` of the team as the API shows it (``team``: its team's name), read as a plain row
    with its result count (NotFound when the team has no such job)."""
    row = None
    if JOB_ID.fullmatch(job_id):
        query = core_select(*_public_columns()).where(Job.id == job_id, Job.team_id == team_id)
        row = session.connection().execute(query).mappings().first()
    if row is None:
        raise _no_job(job_id)
    return JobPublic.model_validate({**row, "team": team})


def list_jobs_public(
    session: Session, *, team_id: int, team: str, status: JobStatus | None = None, limit: int = 50, offset: int = 0
) -> list[JobPublic]:
    """A page of the team's jobs, newest first, as the API shows them: one query, no ORM objects."""
    query = core_select(*_public_columns()).where(Job.team_id == team_id)
    if status is not None:
        query = query.where(Job.status == status)
    query = query.order_by(col(Job.created_at).desc(), col(Job.id)).offset(offset).limit(limit)
    rows = session.connection().execute(query)
    names = (*rows.keys(), "team")  # once: a row's own _asdict() builds its key view again (1 ms a page)
    return [JobPublic.model_validate(dict(zip(names, (*row, team), strict=True))) for row in rows]


def delete_job(session: Session, *, job_id: str) -> None:
    """Remove a job that was never queued (its enqueue failed), with its log lines."""
    for row in list_logs(session, job_id=job_id):
        session.delete(row)
    job = session.get(Job, job_id)
    if job is not None:
        session.delete(job)


def dependents(session: Session, *, job_id: str) -> list[Job]:
    return list(session.exec(select(Job).where(Job.pretrained_job == job_id)).all())


def start_attempt(session: Session, *, job_id: str, worker: str) -> Job | None:
    """Mark a job running for a new attempt; None when it finished meanwhile (canceled, done)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or JobStatus(job.status).finished:
        return None
    now = utcnow()
    job.status = JobStatus.running
    job.attempts += 1
    job.worker = worker
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    session.add(job)
    add_log(session, job_id=job_id, message=f"running: attempt {job.attempts} on {worker}")
    return job


def set_stage(session: Session, *, job_id: str, stage: str | None) -> None:
    job = session.get(Job, job_id)
    if job is not None:
        job.stage, job.heartbeat_at = stage, utcnow()
        session.add(job)


def finish_job(session: Session, *, job_id: str, status: JobStatus, error: str | None = None) -> Job | None:
    """End a job. A job that already ended keeps its first ending (a late worker cannot undo a cancel)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or JobStatus(job.status).finished:
        return None
    job.status, job.error, job.finished_at, job.stage = status, error, utcnow(), None
    session.add(job)
    add_log(
        session,
        job_id=job_id,
        level="error" if status == JobStatus.failed else "info",
        message=f"{status}" + (f": {error}" if error else ""),
    )
    return job


def request_cancel(session: Session, *, job: Job) -> Job:
    if JobStatus(job.status).finished:
        raise Conflict(f"job {job.id} already ended {job.status}; nothing to cancel")
    if job.status == JobStatus.queued:
        finish_job(session, job_id=job.id, status=JobStatus.canceled, error="canceled before it started")
    else:
        job.cancel_requested = True
        session.add(job)
        add_log(session, job_id=job.id, message="cancel requested")
    return job


# -- metrics and logs ---------------------------------------------------------------------------
def add_metric(session: Session, *, job_id: str, log: EpochLog) -> None:
    """Record one epoch; a resumed run re-reporting an epoch replaces it rather than duplicating it."""
    values = {k: float(v) for k, v in log.metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
    row = session.exec(
        select(Metric).where(Metric.job_id == job_id, Metric.stage == log.stage, Metric.epoch == log.epoch)
    ).first()
    if row is None:
        row = Metric(job_id=job_id, stage=log.stage, epoch=log.epoch, epochs=log.epochs, values=values)
    else:
        row.values, row.epochs, row.created_at = values, log.epochs, utcnow()
    session.add(row)
    job = session.get(Job, job_id)
    if job is not None:
        job.heartbeat_at = utcnow()
        session.add(job)


def count_jobs_by_status(session: Session) -> dict[str, int]:
    """How many jobs (of every team) are in each status; statuses with none are left out."""
    return dict(session.exec(select(Job.status, func.count()).group_by(Job.status)).all())


def latest_metrics_of_running_jobs(session: Session) -> list[tuple[Metric, str]]:
    """The newest epoch row of every running job (of every team), with its team's name (``/metrics``)."""
    latest = (
        select(func.max(Metric.id))
        .join(Job, col(Job.id) == col(Metric.job_id))
        .where(Job.status == JobStatus.running)
        .group_by(col(Metric.job_id))
    )
    rows = session.exec(
        select(Metric, Team.name)
        .join(Job, col(Job.id) == col(Metric.job_id))
        .join(Team, col(Team.id) == col(Job.team_id))
        .where(col(Metric.id).in_(latest))
    ).all()
    return [(metric, team) for metric, team in rows]


def list_metrics(session: Session, *, job_id: str, stage: str | None = None) -> list[Metric]:
    query = select(Metric).where(Metric.job_id == job_id)
    if stage is not None:
        query = query.where(Metric.stage == stage)
    return list(session.exec(query.order_by(col(Metric.id))).all())


def add_log(session: Session, *, job_id: str, message: str, level: str = "info") -> None:
    session.add(JobLog(job_id=job_id, message=message[:10_000], level=level))


def list_logs(session: Session, *, job_id: str, after: int = 0) -> list[JobLog]:
    query = select(JobLog).where(JobLog.job_id == job_id, col(JobLog.id) > after).order_by(col(JobLog.id))
    return list(session.exec(query).all())


# -- results ------------------------------------------------------------------------------------
def add_results(session: Session, *, job: Job, result: dict[str, Any], dataset: str) -> int:
    """Store the rows of an experiment's ``result.json``; rows already stored are kept as they are,
    so a job that is re-run after its worker died never duplicates a result."""
    have = {(r.ratio, r.eval, r.seed) for r in session.exec(select(Result).where(Result.job_id == job.id)).all()}
    added = 0
    for row in result["results"]:
        if (row["ratio"], row["eval"], row["seed"]) in have:
            continue
        session.add(
            Result(
                job_id=job.id,
                team_id=job.team_id,
                dataset=dataset,
                preset=result["spec"]["preset"],
                setup=describe_setup(result["spec"]),
                hardware=result["hardware"],
                code_version=result["code_version"],
                data_fingerprint=result["data"]["fingerprint"],
                **{k: row[k] for k in _RESULT_FIELDS},
            )
        )
        added += 1
    return added


def describe_setup(spec: dict[str, Any]) -> str:
    """How a run departs from its preset, as sorted ``key=value`` pairs: results are only compared
    (and averaged over seeds) with results of the same setup. ``a_f`` is left out because it names
    the variant ('InCo without DWV')."""
    from inco_core.config import _expand_dotted

    def flat(node: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for key, value in node.items():
            if isinstance(value, dict) and value:
                out.extend(flat(value, f"{prefix}{key}."))
            else:
                out.append((f"{prefix}{key}", value))
        return out

    pairs = [(k, v) for k, v in flat(_expand_dotted(spec.get("overrides") or {})) if k != "pretrain.inco.a_f"]
    if spec.get("optimizer", "default") != "default":
        pairs.append(("optimizer", spec["optimizer"]))
    text = ", ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in sorted(pairs)
    )
    return text[:1024]


_RESULT_FIELDS = (
    "method",
    "variant",
    "ratio",
    "eval",
    "seed",
    "accuracy",
    "per_class_recall",
    "confusion_matrix",
    "classes",
    "labelled_images",
    "test_images",
    "wall_time_s",
    "pretrain_key",
)


def _result_filters(team_id: int, **filters: str | None) -> list[Any]:
    """WHERE clauses of a team's results matching the filters that are given (column name -> value)."""
    table = Result.__table__.c  # type: ignore[attr-defined]
    return [table.team_id == team_id, *(table[name] == value for name, value in filters.items() if value is not None)]


def list_results(
    session: Session,
    *,
    team_id: int,
    method: str | None = None,
    ratio: str | None = None,
    eval: str | None = None,
    preset: str | None = None,
    dataset: str | None = None,
    job_id: str | None = None,
) -> list[Result]:
    where = _result_filters(
        team_id, method=method, ratio=ratio, eval=eval, preset=preset, dataset=dataset, job_id=job_id
    )
    return list(session.exec(select(Result).where(*where).order_by(col(Result.id))).all())


_BOARD_COLUMNS = ("dataset", "preset", "setup", "method", "variant", "ratio", "eval", "seed", "accuracy")


def board_rows(session: Session, *, team_id: int, **filters: str | None) -> list[Any]:
    """The columns :func:`leaderboard` groups, of the team's results matching ``filters`` (as in
    :func:`list_results`: method, ratio, eval, preset, dataset), oldest first, as plain rows (no ORM
    objects: the leaderboard is read often and results pile up)."""
    table = Result.__table__.c  # type: ignore[attr-defined]
    query = (
        core_select(*(table[name] for name in _BOARD_COLUMNS))
        .where(*_result_filters(team_id, **filters))
        .order_by(table.id)
    )
    return list(session.connection().execute(query).all())


def leaderboard(rows: list[Any]) -> list[LeaderboardRow]:
    """Group ``rows`` (results, or :func:`board_rows`, oldest first) by (data set, preset, setup,
    variant, ratio, evaluation): mean and sample std over seeds. A seed evaluated by several jobs
    counts once (its latest result)."""
    cells: dict[tuple[str, ...], dict[int, Any]] = defaultdict(dict)
    for r in rows:
        cells[(r.dataset, r.preset, r.setup, r.method, r.variant, r.ratio, r.eval)][r.seed] = r
    out = []
    for (dataset, preset, setup, method, variant, ratio, ev), by_seed in cells.items():
        accs = [r.accuracy for r in by_seed.values()]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        out.append(
            LeaderboardRow(
                dataset=dataset,
                preset=preset,
                setup=setup,
                method=method,
                variant=variant,
                ratio=ratio,
                eval=ev,
                mean=mean,
                std=std,
                count=len(accs),
                seeds=sorted(by_seed),
            )
        )
    out.sort(key=lambda r: (r.dataset, r.preset, r.setup, r.eval, r.variant, int(r.ratio.split(":")[1])))
    return out


# -- tune trials --------------------------------------------------------------------------------
_TRIAL_ORDER = {TrialStatus.completed: 0, TrialStatus.stopped: 1, TrialStatus.running: 2, TrialStatus.failed: 3}


def save_trial(
    session: Session,
    *,
    job_id: str,
    number: int,
    trial_id: str,
    params: dict[str, Any],
    epochs: int,
    status: TrialStatus | None = None,
    score: float | None = None,
    epoch: int | None = None,
    error: str | None = None,
) -> TuneTrial:
    """Create or update trial ``number`` of a tune job (the search reports a trial many times)."""
    row = session.exec(select(TuneTrial).where(TuneTrial.job_id == job_id, TuneTrial.number == number)).first()
    if row is None:
        row = TuneTrial(job_id=job_id, number=number, trial_id=trial_id, params=params, epochs=epochs)
    row.trial_id, row.params, row.epochs, row.updated_at = trial_id, params, epochs, utcnow()
    if status is not None:
        row.status = status
    if score is not None and math.isfinite(score):
        row.score = float(score)
    if epoch is not None:
        row.epoch = epoch
    if error is not None:
        row.error = error[:10_000]
    session.add(row)
    job = session.get(Job, job_id)
    if job is not None:
        job.heartbeat_at = utcnow()
        session.add(job)
    return row


def rank_trials(trials: list[TuneTrial]) -> list[TuneTrial]:
    """Best first: trials that ran every epoch by score, then those ASHA stopped, running, failed."""
    return sorted(
        trials,
        key=lambda t: (
            _TRIAL_ORDER[TrialStatus(t.status)],
            -(t.score if t.score is not None else -1.0),
            t.number,
        ),
    )


def list_trials(session: Session, *, job_id: str) -> list[TuneTrial]:
    return rank_trials(list(session.exec(select(TuneTrial).where(TuneTrial.job_id == job_id)).all()))


def best_trial(session: Session, *, job_id: str) -> TuneTrial | None:
    """The completed trial with the highest validation score, or None."""
    ranked = list_trials(session, job_id=job_id)
    return ranked[0] if ranked and ranked[0].status == TrialStatus.completed else None


def end_running_trials(session: Session, *, job_id: str, note: str) -> int:
    """Mark the trials still ``running`` when a search ends (canceled, or stopped as a whole) as
    ``stopped``, with ``note`` as their error."""
    rows = session.exec(
        select(TuneTrial).where(TuneTrial.job_id == job_id, TuneTrial.status == TrialStatus.running)
    ).all()
    for row in rows:
        row.status, row.error, row.updated_at = TrialStatus.stopped, note, utcnow()
        session.add(row)
    return len(rows)


def clear_trials(session: Session, *, job_id: str) -> int:
    """Forget a tune job's trials (a re-run after its worker died searches again)."""
    rows = session.exec(select(TuneTrial).where(TuneTrial.job_id == job_id)).all()
    for row in rows:
        session.delete(row)
    return len(rows)


# -- artifacts ----------------------------------------------------------------------------------
def find_artifact(session: Session, *, team_id: int, kind: str, key: str) -> Artifact | None:
    return session.exec(
        select(Artifact).where(Artifact.team_id == team_id, Artifact.kind == kind, Artifact.key == key)
    ).first()


def add_artifact(session: Session, *, artifact: Artifact) -> Artifact:
    """Record a file; a second record of the same (team, kind, key) keeps the first."""
    existing = find_artifact(session, team_id=artifact.team_id, kind=artifact.kind, key=artifact.key)
    if existing is not None:
        return existing
    try:
        with session.begin_nested():
            session.add(artifact)
    except IntegrityError:
        found = find_artifact(session, team_id=artifact.team_id, kind=artifact.kind, key=artifact.key)
        if found is None:
            raise
        return found
    return artifact


def list_artifacts(session: Session, *, team_id: int, job_id: str | None = None) -> list[Artifact]:
    query = select(Artifact).where(Artifact.team_id == team_id)
    if job_id is not None:
        query = query.where(Artifact.job_id == job_id)
    return list(session.exec(query.order_by(col(Artifact.id))).all())


def set_error(session: Session, *, job_id: str, error: str) -> None:
    """Keep the error of a failed attempt on a job that will be retried."""
    job = session.get(Job, job_id)
    if job is not None:
        job.error = error
        session.add(job)


def touch_job(session: Session, *, job_id: str) -> int | None:
    """Stamp a running job's heartbeat; returns the job's attempt count (None when there is no such job),
    so a process running an older attempt can tell that a newer one started."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status == JobStatus.running:
        job.heartbeat_at = utcnow()
        session.add(job)
    return job.attempts


def jobs_with_status(session: Session, *, status: JobStatus, before: datetime) -> list[Job]:
    """Jobs in ``status`` created before ``before`` (all teams; for the worker's recovery pass)."""
    query = select(Job).where(Job.status == status, col(Job.created_at) < before)
    return list(session.exec(query.order_by(col(Job.created_at))))


def stale_running_jobs(session: Session, *, before: datetime) -> list[Job]:
    """Running jobs whose last heartbeat is older than ``before`` (their worker probably died)."""
    stale = or_(col(Job.heartbeat_at) < before, col(Job.heartbeat_at).is_(None))
    return list(session.exec(select(Job).where(Job.status == JobStatus.running, stale)).all())


# -- models -------------------------------------------------------------------------------------------
def add_model(session: Session, *, model: Model) -> Model:
    """Register a classifier; a second registration of the same (job, ratio, eval, seed) keeps the first
    (a job re-run after its worker died)."""
    existing = session.exec(
        select(Model).where(
            Model.job_id == model.job_id, Model.ratio == model.ratio, Model.eval == model.eval, Model.seed == model.seed
        )
    ).first()
    if existing is not None:
        return existing
    session.add(model)
    session.flush()
    return model


def list_models(
    session: Session,
    *,
    team_id: int,
    method: str | None = None,
    ratio: str | None = None,
    eval_mode: str | None = None,
    dataset: str | None = None,
    job_id: str | None = None,
    best: bool = False,
) -> list[Model]:
    """The team's models, newest first; ``best`` keeps the most accurate of each (data set, ratio)
    (the newest among equals), best ratio first in label order 1:1, 1:2, ..."""
    query = select(Model).where(Model.team_id == team_id)
    for column, value in (
        (Model.method, method),
        (Model.ratio, ratio),
        (Model.eval, eval_mode),
        (Model.dataset, dataset),
        (Model.job_id, job_id),
    ):
        if value is not None:
            query = query.where(column == value)
    rows = list(session.exec(query.order_by(col(Model.created_at).desc(), col(Model.id).desc())).all())
    if not best:
        return rows
    top: dict[tuple[str, str], Model] = {}
    for m in rows:
        key = (m.dataset, m.ratio)
        if key not in top or m.accuracy > top[key].accuracy:
            top[key] = m
    return sorted(top.values(), key=lambda m: (m.dataset, int(m.ratio.split(":")[1])))


def get_model(session: Session, *, team_id: int, model_id: int) -> Model:
    """The team's model ``model_id``; another team's model is not found either."""
    model = session.get(Model, model_id)
    if model is None or model.team_id != team_id:
        raise NotFound(f"the team has no model {model_id}; list them with `inco models` (GET /v1/models)")
    return model
