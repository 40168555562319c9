"""A local Ray head shared by the worker tests (starting one costs seconds here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.main import ray_env, start_local_ray, stop_local_ray

REPO = Path(__file__).resolve().parents[2]
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke", "resources": {"device": "cpu"}}}


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One local Ray head for the session (a Ray start costs seconds here)."""
    home = tmp_path_factory.mktemp("ray-home")
    proc, address = start_local_ray(home)
    yield {**ray_env(home), "RAY_ADDRESS": address}
    stop_local_ray(proc)
