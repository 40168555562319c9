from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inco_core.data import ImageSet, load_images

pytest_plugins = ["tests.service_fixtures"]

REPO = Path(__file__).resolve().parents[1]
NEU_CLS = Path(os.environ.get("INCO_TEST_DATA", REPO.parent / "shared" / "datasets" / "neu-cls")).resolve()


@pytest.fixture(scope="session")
def neu_path() -> Path:
    if not (NEU_CLS / "crazing").is_dir():
        pytest.fail(f"NEU-CLS images not found at {NEU_CLS}; set INCO_TEST_DATA to their folder")
    return NEU_CLS


@pytest.fixture(scope="session")
def neu32(neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    """All 1,800 real NEU-CLS images at 32 px, decoded once per test session."""
    return load_images(neu_path, 32, cache_dir=tmp_path_factory.mktemp("image-cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
