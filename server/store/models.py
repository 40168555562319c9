"""Every SQL table of the store, and the API models built on them, in one module.

Tables: teams, api_tokens, datasets, jobs, metrics (one row per epoch of a stage), results (one row
per ratio x evaluation x seed), tune_trials (one row per trial of a tune job), artifacts (checkpoints
in the artifact store) and job_logs. Naming
follows the role: ``JobBase`` (shared fields), ``JobCreate`` (request body), ``Job`` (table),
``JobPublic`` (response). Times are UTC.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic import Field as PydField
from sqlalchemy import JSON, Column, Index, String, UniqueConstraint
from sqlmodel import Field, SQLModel

from inco_core.config import RunSpec
from inco_core.errors import ConfigError
from inco_core.search import TuneSettings, check_tune_spec


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class JobKind(StrEnum):
    experiment = "experiment"  # pretrain (or reuse a backbone), then evaluate at every ratio
    pretrain = "pretrain"  # pretrain only; its backbones become artifacts
    finetune = "finetune"  # evaluate a pretrain job's backbones, or train a supervised model from scratch
    tune = "tune"  # Ray Tune search of T1, T2, a_f, K and the learning rate, scored on a validation split


# -- teams and tokens ---------------------------------------------------------------------------
class Team(SQLModel, table=True):
    __tablename__ = "teams"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    max_active_jobs: int | None = Field(
        default=None, description="queued + running jobs at once; None: the server's INCO_MAX_ACTIVE_JOBS"
    )
    max_gpus: int | None = Field(
        default=None, description="GPUs of queued + running jobs at once; None: the server's INCO_MAX_GPUS"
    )
    review_level: float | None = Field(
        default=None, description="coverage of the team's conformal prediction sets; None: 0.9"
    )


class Scope(StrEnum):
    """What a token may do: ``read`` the team's things, ``submit`` (and cancel) jobs and register data
    sets, ``admin``: manage the team's tokens and limits, ``predict``: run the team's models on images
    (a line station's token needs nothing else)."""

    read = "read"
    submit = "submit"
    admin = "admin"
    predict = "predict"


DEFAULT_SCOPES = [Scope.read.value, Scope.submit.value]


class ApiToken(SQLModel, table=True):
    """A bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    id: int | None = Field(default=None, primary_key=True)
    team_id: int = Field(foreign_key="teams.id", index=True)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    prefix: str = Field(max_length=12, description="first characters, to tell tokens apart")
    name: str = Field(default="", max_length=128)
    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCOPES), sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


# -- data sets ----------------------------------------------------------------------------------
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class DatasetBase(SQLModel):
    name: str = Field(max_length=64)


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = PydField(pattern=NAME_PATTERN, description="letters, digits, '_', '.', '-'; up to 64")
    path: str = PydField(min_length=1, max_length=4096, description="folder under the server's data root")


class Dataset(DatasetBase, table=True):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("team_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    team_id: int = Field(foreign_key="teams.id", index=True)
    path: str = Field(max_length=4096)
    images: int = 0
    classes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class DatasetPublic(DatasetBase):
    path: str
    images: int
    classes: list[str]
    created_at: datetime


# -- jobs ---------------------------------------------------------------------------------------
class JobBase(SQLModel):
    kind: JobKind = Field(default=JobKind.experiment, sa_type=String(16))
    pretrained_job: str | None = Field(
        default=None, max_length=32, description="finetune: the pretrain job whose backbones to evaluate"
    )


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``: the run spec of ``inco_core`` plus what the service adds."""

    model_config = ConfigDict(extra="forbid")
    kind: JobKind = JobKind.experiment
    spec: RunSpec = PydField(description="method, data set (by name), ratios, evaluations, preset, seeds")
    pretrained_job: str | None = PydField(
        None, max_length=32, description="finetune jobs: id of a pretrain job of the same team"
    )
    tune: TuneSettings | None = PydField(None, description="tune jobs: how to search (trials, parameters, ...)")
    from_tune: str | None = PydField(
        None,
        max_length=32,
        description="experiment jobs: id of a finished tune job whose best trial's settings to use; method, "
        "preset, data set and optimiser default to the tune job's, and spec.overrides win over the trial's",
    )

    @model_validator(mode="after")
    def _kind_fits(self) -> JobCreate:
        if self.kind == JobKind.tune:
            if self.tune is None:
                self.tune = TuneSettings()
            try:
                check_tune_spec(self.spec, self.tune)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        elif self.tune is not None:
            raise ValueError("tune settings are only for kind 'tune'")
        if self.from_tune and self.kind != JobKind.experiment:
            raise ValueError("from_tune is only for kind 'experiment'")
        if self.spec.data.path is not None:
            raise ValueError(
                "spec.data.path is not accepted by the API: register the folder with POST /v1/datasets "
                "and name it in spec.data.dataset"
            )
        if self.pretrained_job and self.kind != JobKind.finetune:
            raise ValueError("pretrained_job is only for kind 'finetune'")
        if self.kind == JobKind.finetune and not self.pretrained_job and self.spec.method != "supervised":
            raise ValueError(
                "a finetune job needs pretrained_job (the id of a pretrain job), "
                "or method 'supervised' to train from scratch"
            )
        if self.kind == JobKind.pretrain and self.spec.method == "supervised":
            raise ValueError("method 'supervised' has no pretraining: use kind 'experiment' or 'finetune'")
        return self


class Job(JobBase, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_team_id_idempotency_key", "team_id", "idempotency_key", unique=True),
        # a team's newest jobs (GET /v1/jobs) and its active ones (the submit limits) without a scan
        Index("ix_jobs_team_id_created_at", "team_id", "created_at"),
        Index("ix_jobs_team_id_status", "team_id", "status"),
    )
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    team_id: int = Field(foreign_key="teams.id", index=True)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: JobStatus = Field(default=JobStatus.queued, index=True, sa_type=String(16))
    stage: str | None = Field(default=None, max_length=64, description="stage now running")
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    error: str | None = None
    attempts: int = 0
    worker: str | None = Field(default=None, max_length=128)
    cancel_requested: bool = False
    outputs: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False), description="e.g. the backbones it made or used"
    )
    tune: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    idempotency_key: str | None = Field(default=None, max_length=128, description="its Idempotency-Key header")
    request_hash: str | None = Field(default=None, max_length=64, description="SHA-256 of the request it came from")
    gpus: int = Field(default=0, description="GPUs it holds while queued or running (workers x GPUs per worker)")


class JobPublic(BaseModel):
    """A job as the API shows it. A plain pydantic model, not an SQLModel: it is built for every job of
    every page read, and SQLModel's validation cost several times as much (bench/load.py)."""

    kind: JobKind = JobKind.experiment
    pretrained_job: str | None = PydField(
        default=None, max_length=32, description="finetune: the pretrain job whose backbones to evaluate"
    )
    id: str
    team: str
    spec: dict[str, Any]
    status: JobStatus
    stage: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    attempts: int
    worker: str | None
    cancel_requested: bool
    outputs: dict[str, Any]
    tune: dict[str, Any] | None = None
    results: int = 0


# -- metrics, logs, results, artifacts ----------------------------------------------------------
class Metric(SQLModel, table=True):
    """One finished epoch of one stage of a job (``pretrain``, ``finetune 1:16``, ...)."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "stage", "epoch"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    stage: str = Field(max_length=64)
    epoch: int
    epochs: int
    values: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class MetricPublic(SQLModel):
    stage: str
    epoch: int
    epochs: int
    values: dict[str, float]
    created_at: datetime


class JobLog(SQLModel, table=True):
    __tablename__ = "job_logs"
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    created_at: datetime = Field(default_factory=utcnow)
    level: str = Field(default="info", max_length=8)
    message: str


class JobLogPublic(SQLModel):
    created_at: datetime
    level: str
    message: str


class Result(SQLModel, table=True):
    """One cell of Table 1 for one seed: a method evaluated at a ratio."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "ratio", "eval", "seed"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    team_id: int = Field(foreign_key="teams.id", index=True)
    dataset: str = Field(max_length=64)
    preset: str = Field(max_length=16)
    setup: str = Field(default="", max_length=1024, description="how the run departs from its preset ('' = none)")
    method: str = Field(max_length=32, index=True)
    variant: str = Field(max_length=64)
    ratio: str = Field(max_length=8)
    eval: str = Field(max_length=16)
    seed: int
    accuracy: float
    per_class_recall: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    confusion_matrix: list[list[int]] = Field(sa_column=Column(JSON, nullable=False))
    classes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    labelled_images: int
    test_images: int
    wall_time_s: float
    hardware: str = Field(max_length=256)
    code_version: str = Field(max_length=64)
    data_fingerprint: str = Field(max_length=64)
    pretrain_key: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow)


class ResultPublic(SQLModel):
    job_id: str
    dataset: str
    preset: str
    setup: str
    method: str
    variant: str
    ratio: str
    eval: str
    seed: int
    accuracy: float
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]]
    classes: list[str]
    labelled_images: int
    test_images: int
    wall_time_s: float
    hardware: str
    code_version: str
    data_fingerprint: str
    created_at: datetime


class LeaderboardRow(BaseModel):
    """Mean and (sample) standard deviation of accuracy over seeds for one cell of Table 1."""

    dataset: str
    preset: str
    setup: str = PydField(description="overrides of the preset, e.g. 'pretrain.epochs=50'; '' for none")
    method: str
    variant: str
    ratio: str
    eval: str
    mean: float
    std: float
    count: int
    seeds: list[int]


class TrialStatus(StrEnum):
    running = "running"
    completed = "completed"  # ran every epoch
    stopped = "stopped"  # stopped early by ASHA: its score was below the rung's cutoff
    failed = "failed"


class TuneTrial(SQLModel, table=True):
    """One trial of a tune job: the point it tried, its latest validation score and how it ended."""

    __tablename__ = "tune_trials"
    __table_args__ = (UniqueConstraint("job_id", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    number: int = Field(description="1, 2, ... in the order the search proposed them")
    trial_id: str = Field(max_length=64)
    params: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False), description="the run-spec overrides tried")
    status: TrialStatus = Field(default=TrialStatus.running, sa_type=String(16))
    score: float | None = Field(default=None, description="validation accuracy (0..1) at the last scored epoch")
    epoch: int = Field(default=0, description="last scored pretraining epoch")
    epochs: int = Field(description="pretraining epochs a full trial runs")
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class TrialPublic(SQLModel):
    number: int
    params: dict[str, Any]
    status: TrialStatus
    score: float | None
    epoch: int
    epochs: int
    error: str | None
    created_at: datetime
    updated_at: datetime


class Artifact(SQLModel, table=True):
    """A file in the artifact store: a pretrained backbone (keyed for reuse) or a fine-tuned model."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("team_id", "kind", "key"),)
    id: int | None = Field(default=None, primary_key=True)
    team_id: int = Field(foreign_key="teams.id", index=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    kind: str = Field(max_length=16)  # backbone | finetuned
    key: str = Field(max_length=128, description="pretrain key of a backbone; stage and seed of a model")
    method: str = Field(max_length=32)
    seed: int
    path: str = Field(max_length=4096)
    size_bytes: int
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class ArtifactPublic(SQLModel):
    id: int
    job_id: str
    kind: str
    key: str
    method: str
    seed: int
    size_bytes: int
    created_at: datetime


class Model(SQLModel, table=True):
    """A trained classifier of a team: one per (job, ratio, evaluation, seed). Its weights are a
    classifier file in the artifact store (``artifact_id``); this row describes it."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("job_id", "ratio", "eval", "seed"),)
    id: int | None = Field(default=None, primary_key=True)
    team_id: int = Field(foreign_key="teams.id", index=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    artifact_id: int = Field(foreign_key="artifacts.id")
    dataset: str = Field(max_length=64)
    preset: str = Field(max_length=16)
    method: str = Field(max_length=32)
    variant: str = Field(max_length=64)
    ratio: str = Field(max_length=8)
    eval: str = Field(max_length=16)
    seed: int
    classes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    image_size: int
    normalisation: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    accuracy: float
    per_class_recall: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    calibration_images: int = Field(default=0, description="labelled images its conformal sets are calibrated on")
    code_version: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class ModelPublic(SQLModel):
    id: int
    job_id: str
    dataset: str
    preset: str
    method: str
    variant: str
    ratio: str
    eval: str
    seed: int
    classes: list[str]
    image_size: int
    normalisation: dict[str, Any]
    accuracy: float
    per_class_recall: dict[str, float]
    calibration_images: int
    code_version: str
    created_at: datetime
