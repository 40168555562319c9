"""Service settings: one pydantic-settings class, ``INCO_`` environment variables, read at the edge.

Entry points (the CLI, later the API and the worker) build :class:`Settings` once and pass values
down; ``inco_core`` never reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INCO_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".inco", description="runs, caches, the local store")
    data: Path | None = Field(None, description="default data set folder for jobs that name none")

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"
