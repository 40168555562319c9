"""Service settings: one pydantic-settings class, ``INCO_`` environment variables, read at the edge.

Entry points (the CLI, the API, the worker) build :class:`Settings` once and pass values down;
``inco_core`` never reads the environment.

=======================  ===================================  ==========================================
variable                 default                              what
=======================  ===================================  ==========================================
INCO_HOME                ~/.inco                              runs, caches, the SQLite store, stack state
INCO_DATA                (none)                               data set folder for ``inco run``/``inco up``
INCO_DATA_ROOT           $INCO_HOME/data                      folders ``POST /v1/datasets`` may register
INCO_DATABASE_URL        sqlite:///$INCO_HOME/inco.db         SQL store (``postgresql://...`` in production)
INCO_REDIS_URL           redis://127.0.0.1:6379/0             job queue
INCO_ARTIFACTS           $INCO_HOME/artifacts                 checkpoints (shared storage on a cluster)
INCO_API_URL             http://127.0.0.1:8000                where the CLI finds the API
INCO_TOKEN               (local stack's token)                the CLI's bearer token
INCO_QUEUE               inco                                 Redis queue name
INCO_MAX_ACTIVE_JOBS     20                                   a team's queued + running jobs at once
INCO_MAX_GPUS            8                                    GPUs of a team's queued + running jobs
INCO_MAX_BODY_BYTES      1 MiB                                largest JSON request body
INCO_MAX_UPLOAD_BYTES    2 GiB                                largest data set archive upload
INCO_MAX_UPLOAD_FILES    100000                               most files in one archive
INCO_CORS_ORIGINS        (none: CORS off)                     browser origins allowed to call the API
INCO_LOG_FORMAT          json                                 ``json`` (one object a line) or ``text``
INCO_LEASE_S             6                                    a running job's lease; its job is requeued
                                                              once it and the store heartbeat lapsed
INCO_PREDICT_SLOTS       2                                    predict requests the API runs at once (429)
INCO_MAX_PREDICT_IMAGES  256                                  images in one predict request
INCO_MAX_PREDICT_BYTES   64 MiB                               one predict request's files (or archive)
=======================  ===================================  ==========================================
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INCO_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".inco", description="runs, caches, the local store")
    data: Path | None = Field(None, description="default data set folder for jobs that name none")
    data_root: Path | None = Field(None, description="folders the API may register as data sets")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the store; default SQLite in home")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis of the job queue")
    artifacts: Path | None = Field(None, description="artifact store folder; default home/artifacts")
    api_url: str = Field("http://127.0.0.1:8000", description="the API, for the CLI")
    token: str | None = Field(None, description="bearer token for the CLI")
    queue: str = Field("inco", min_length=1, description="Redis queue name")
    job_retries: int = Field(2, ge=0, le=100, description="re-runs of a job whose worker died")
    cpus_per_worker: int = Field(1, ge=1, le=1024, description="CPUs each Ray Train worker asks for")
    train_restarts: int = Field(2, ge=0, le=100, description="restarts of a crashed Ray worker group per attempt")
    heartbeat_s: int = Field(10, ge=1, le=3600, description="RQ's worker heartbeat (its job monitoring interval)")
    maintenance_s: int = Field(30, ge=1, le=3600, description="how often a worker looks for abandoned jobs")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU priority (nice) of `inco worker`, its training and the local Ray it starts: training "
        "yields the CPU to an API on the same host; 0 keeps the priority it was started with",
    )
    ray_dashboard: bool = Field(
        False,
        description="run the Ray dashboard with the local Ray head `inco worker` and `inco up` start (on "
        "127.0.0.1, the port in the log)",
    )
    job_timeout_s: int = Field(7 * 24 * 3600, ge=10, description="longest a job may run")
    lease_s: int = Field(
        6,
        ge=2,
        le=3600,
        description="a running job's lease: renewed every third of it; a job whose lease and store heartbeat are "
        "both older than this is queued again (its process died)",
    )
    max_active_jobs: int = Field(20, ge=1, le=100_000, description="a team's queued + running jobs at once")
    max_gpus: int = Field(8, ge=0, le=100_000, description="GPUs of a team's queued + running jobs at once")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body (bytes)")
    max_upload_bytes: int = Field(2 << 30, ge=1024, description="largest data set archive upload (bytes)")
    max_upload_files: int = Field(100_000, ge=1, description="most files in one data set archive")
    predict_slots: int = Field(2, ge=1, le=256, description="predict requests the API runs at once; more get 429")
    max_predict_images: int = Field(256, ge=1, le=100_000, description="images in one predict request")
    max_predict_bytes: int = Field(64 << 20, ge=1024, description="one predict request's files or archive (bytes)")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed; empty: CORS off")
    log_format: str = Field("json", pattern="^(json|text)$", description="worker and API log lines")

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'inco.db'}"

    @property
    def artifact_dir(self) -> Path:
        return self.artifacts or self.home / "artifacts"

    @property
    def data_root_dir(self) -> Path:
        return self.data_root or self.home / "data"

    @property
    def stack_file(self) -> Path:
        """What ``inco up`` started (pids, ports, the local token)."""
        return self.home / "stack.json"
