"""Errors cross process boundaries (Ray workers, RQ): each must survive pickling with its message."""

from __future__ import annotations

import pickle
from pathlib import Path

from inco_core.errors import CheckpointError, ConfigError, DataError, ImageDecodeError
from inco_core.train import TrainingDiverged
from server.errors import Canceled, Conflict, NotFound, QueueUnavailable, StoreUnavailable


def test_every_error_pickles_with_its_message() -> None:
    errors = [
        ConfigError("c"),
        DataError("d"),
        CheckpointError("k"),
        TrainingDiverged("t"),
        Canceled("x"),
        NotFound("n"),
        Conflict("o"),
        QueueUnavailable("q"),
        StoreUnavailable("s"),
        ImageDecodeError(Path("/a/bad.jpg"), "truncated"),
    ]
    for exc in errors:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert pickle.loads(pickle.dumps(errors[-1])).path == Path("/a/bad.jpg")
