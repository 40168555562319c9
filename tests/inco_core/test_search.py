"""Search settings, the search space's mapping to run-spec overrides, the validation split, and one
trial on the real images (it never touches a test image)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from inco_core.config import RunSpec
from inco_core.errors import ConfigError, DataError
from inco_core.search import SPACE, TuneSettings, check_tune_spec, overrides_for, trial_spec
from inco_core.splits import Split, labelled_subsets
from inco_core.trial import run_trial, trial_data, validation_split


@pytest.mark.parametrize(
    ("spec", "settings", "message"),
    [
        ({"ratios": ["1:16", "1:8"]}, {}, "one ratio"),
        ({"seeds": [0, 1]}, {}, "one seed"),
        ({"method": "supervised"}, {}, "no pretraining to tune"),
        ({"method": "mocov2"}, {"params": ["lr", "views"]}, "views are InCo's parameters"),
        ({"preset": "smoke"}, {"grace_epochs": 2}, "grace_epochs is 2 but the pretraining has 1 epochs"),
    ],
)
def test_tune_specs_that_cannot_be_searched(spec: dict, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_tune_spec(RunSpec.model_validate(spec), TuneSettings.model_validate(settings))


def test_other_methods_tune_the_learning_rate() -> None:
    check_tune_spec(RunSpec(method="simclr"), TuneSettings(params=["lr"]))


def test_a_point_becomes_overrides_with_t1_and_t2_in_epochs() -> None:
    point = {"t1": 0.2, "t2": 0.9, "a_f": 0.3, "views": 4.0, "lr": 0.01}
    assert overrides_for(point, 30) == {
        "pretrain.inco.t1": 6.0,
        "pretrain.inco.t2": 27.0,
        "pretrain.inco.a_f": 0.3,
        "pretrain.inco.views": 4,
        "pretrain.optim.lr": 0.01,
    }
    with pytest.raises(ConfigError, match="unknown search parameter 'tau'"):
        overrides_for({"tau": 1.0}, 30)
    # every corner of the space gives a valid run spec (t1 < t2 always holds)
    base = RunSpec(preset="cpu", overrides={"pretrain.epochs": 10})
    for corner in ("low", "high"):
        point = {name: getattr(rng, corner) for name, rng in SPACE.items()}
        cfg = trial_spec(base, point).resolve()
        assert cfg.pretrain.epochs == 10 and cfg.pretrain.inco.t1 < cfg.pretrain.inco.t2 <= 10


def test_the_validation_split_is_stratified_and_disjoint() -> None:
    labels = torch.arange(6).repeat_interleave(30)
    labelled = torch.arange(0, 180, 3)  # 10 per class
    fit, val = validation_split(labels, labelled, [f"c{i}" for i in range(6)], fraction=0.3, seed=1)
    assert not set(fit.tolist()) & set(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == labelled.tolist()
    assert torch.bincount(labels[val], minlength=6).tolist() == [3] * 6
    again = validation_split(labels, labelled, [f"c{i}" for i in range(6)], fraction=0.3, seed=1)
    assert torch.equal(again[1], val)
    with pytest.raises(DataError, match="class c0 has 1 labelled image"):
        validation_split(labels, torch.tensor([0, 30, 31]), ["c0", "c1"], fraction=0.5, seed=0)


def test_trial_data_never_holds_a_test_image() -> None:
    labels = torch.arange(6).repeat_interleave(50)
    train = torch.cat([torch.arange(c * 50, c * 50 + 30) for c in range(6)])
    test = torch.cat([torch.arange(c * 50 + 30, c * 50 + 50) for c in range(6)])
    ds = SimpleNamespace(labels=labels, classes=[f"c{i}" for i in range(6)])
    spec = RunSpec(ratios=["1:4"], overrides={"pretrain.max_images": 100})
    data = trial_data(ds, Split(train, test), spec, TuneSettings())  # type: ignore[arg-type]
    for part in (data.pretrain, data.fit, data.val):
        assert not set(part.tolist()) & set(test.tolist())
    assert len(data.pretrain) == 100
    labelled = labelled_subsets(labels, train, ds.classes, [4], seed=0)[4]
    assert sorted(data.fit.tolist() + data.val.tolist()) == labelled.tolist()
    # a split that (by a bug) put a test image among the labelled ones is caught
    with pytest.raises(DataError, match="test image"):
        trial_data(ds, Split(train, torch.cat([test, train[:1]])), spec, TuneSettings())  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_trial_scores_on_validation_images_at_its_eval_epochs(neu_path: Path, tmp_path: Path) -> None:
    spec = RunSpec.model_validate(
        {
            "data": {"path": str(neu_path)},
            "preset": "smoke",
            "ratios": ["1:16"],
            "overrides": {"pretrain.epochs": 3, "pretrain.max_images": 64},
            "resources": {"device": "cpu"},
        }
    )
    reports: list[dict] = []
    last = run_trial(
        spec, TuneSettings(eval_every=2), run_dir=tmp_path / "t", cache_dir=tmp_path / "cache", report=reports.append
    )
    assert [r["epoch"] for r in reports] == [2, 3]  # every 2 epochs, and the last
    assert all(0 <= r["score"] <= 1 for r in reports) and last == reports[-1]
    used = json.loads((tmp_path / "t" / "indices.json").read_text())
    assert used["test_images"] == 720 and len(used["pretrain"]) == 64
    assert len(used["fit"]) + len(used["val"]) == 66
