from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inco_core.data import ImageSet, load_images

pytest_plugins = ["tests.service_fixtures", "tests.stack_fixtures"]

REPO = Path(__file__).resolve().parents[1]

# The test processes (scripts/test.sh: two on two cores) train with one torch thread each instead of
# one per core: no oversubscribed cores (11% less CPU for the same in-process training, measured)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
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


# Units of work for pytest-xdist (the scheduler below), longest first: the fault tests alone, then
# the worker tests followed by the tune tests in one unit, so that the two long halves run side by side.
# (A search that stalled for 600 s with several Ray heads on the machine was Ray Train's placement-group
# cleaner asking the newest head instead of its own; start_local_ray gives every head's processes their
# RAY_ADDRESS since.) The other service files follow, each a unit; the files that share the local stack
# are one unit, and so are the files that read the session's smoke classifiers, so that one process
# starts the stack, or trains the classifiers, once.
LANES = {
    "tests/worker/test_faults.py": "tests/worker/test_faults.py",
    "tests/worker/test_worker.py": "worker-then-tune",
    "tests/worker/test_tune.py": "worker-then-tune",
    # the two files that share one `inco up` stack (tests/stack_fixtures.py), the CLI's first
    "tests/cli/test_stack_e2e.py": "local-stack",
    "tests/web/test_browser.py": "local-stack",
    "tests/worker/test_cluster.py": "tests/worker/test_cluster.py",
    # one process trains the smoke classifiers these files read (the session fixture smoke_classifiers)
    "tests/inco_core/test_classifier.py": "classifiers",
    "tests/server/test_models.py": "classifiers",
    "tests/cli/test_models_cli.py": "classifiers",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's file scheduling with the lanes: a lane's files are one unit of work, run in one
    process in order; every other file is a unit of its own. (xdist's ``--dist loadgroup`` marks do
    not reach its scheduler under pytest 9, whose node ids no longer take xdist's group suffix.)"""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return LANES.get(path, path)

    return LaneScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LANES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def smoke_classifiers(neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke experiment on the real images (1:16, fine-tuned and linear): its ``result`` (rows
    with their classifier files), the 720 test images and labels, and their files."""
    from inco_core.config import load_spec
    from inco_core.experiment import Experiment
    from inco_core.splits import stratified_split

    folder = tmp_path_factory.mktemp("smoke-classifiers")
    spec = load_spec(
        {
            "data": {"path": str(neu_path)},
            "preset": "smoke",
            "resources": {"device": "cpu"},
            "ratios": ["1:16"],
            "evals": ["finetune", "linear"],
        }
    )
    result = Experiment(spec, run_dir=folder / "run", cache_dir=folder / "cache").run()
    ds = load_images(neu_path, 32, cache_dir=folder / "cache" / "images")
    split = stratified_split(ds.labels, ds.file_hashes, ds.classes, train_fraction=0.6, seed=0)
    return {
        "spec": spec,
        "result": result,
        "test_images": ds.images[split.test],
        "test_labels": ds.labels[split.test],
        "test_files": [ds.root / ds.files[i] for i in split.test.tolist()],
    }


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
