"""A local Ray head for the worker tests' services (starting one costs seconds here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from worker.main import ray_env, start_local_ray, stop_local_ray

REPO = Path(__file__).resolve().parents[2]
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke", "resources": {"device": "cpu"}}}


@contextmanager
def ray_head(home: Path) -> Iterator[dict[str, str]]:
    """A local Ray head while the block runs: the environment that reaches it."""
    proc, address = start_local_ray(home)
    try:
        yield {**ray_env(home), "RAY_ADDRESS": address}
    finally:
        stop_local_ray(proc)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One local Ray head for a test file's service (a Ray start costs seconds here), stopped once the
    file is done: an idle head still takes about 2 CPU-seconds a minute."""
    with ray_head(tmp_path_factory.mktemp("ray-home")) as env:
        yield env
