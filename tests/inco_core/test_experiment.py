"""The whole experiment at the smoke preset on real NEU-CLS images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inco_core.config import load_spec
from inco_core.experiment import Experiment
from inco_core.progress import RecordingReporter


def _spec(neu_path: Path, **kw) -> object:
    return load_spec({"data": {"path": str(neu_path)}, "preset": "smoke", "resources": {"device": "cpu"}, **kw})


@pytest.mark.slow
def test_inco_smoke_experiment_and_backbone_reuse(neu_path: Path, tmp_path: Path) -> None:
    spec = _spec(neu_path, method="inco", ratios=["1:32", "1:8"], evals=["finetune", "linear"])
    reporter = RecordingReporter()
    result = Experiment(spec, run_dir=tmp_path / "run1", cache_dir=tmp_path / "cache", reporter=reporter).run()

    rows = result["results"]
    assert [(r["ratio"], r["eval"]) for r in rows] == [
        ("1:32", "finetune"),
        ("1:32", "linear"),
        ("1:8", "finetune"),
        ("1:8", "linear"),
    ]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["test_images"] == 720 and row["variant"] == "InCo with DWV"
        assert sum(map(sum, row["confusion_matrix"])) == 720
        assert set(row["per_class_recall"]) == set(row["classes"])
    assert [r["labelled_images"] for r in rows[::2]] == [36, 132]
    assert (
        len(result["pretraining"]) == 1 and result["pretraining"][0]["reused"] is False
    )  # one pretraining, two ratios
    assert [log.stage for log in reporter.epochs].count("pretrain") == 1
    assert "knn" in reporter.epochs[0].metrics
    on_disk = json.loads((tmp_path / "run1" / "result.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(rows))
    assert on_disk["data"]["fingerprint"] and on_disk["code_version"]
    ckpt = torch.load(Path(result["pretraining"][0]["checkpoint"]), weights_only=True)
    assert ckpt["config"]["pretrain"]["epochs"] == 1 and ckpt["data_fingerprint"] == on_disk["data"]["fingerprint"]

    # same method, pretrain config, data and seed: the backbone is reused, not trained again
    again = _spec(neu_path, method="inco", ratios=["1:16"], evals=["linear"])
    reporter2 = RecordingReporter()
    second = Experiment(again, run_dir=tmp_path / "run2", cache_dir=tmp_path / "cache", reporter=reporter2).run()
    assert second["pretraining"][0]["reused"] is True
    assert second["pretraining"][0]["key"] == result["pretraining"][0]["key"]
    assert "pretrain" not in [log.stage for log in reporter2.epochs]

    # another seed or another pretrain config is another backbone
    third = _spec(neu_path, method="inco", ratios=["1:16"], evals=["linear"], overrides={"pretrain.inco.a_f": 0})
    out = Experiment(third, run_dir=tmp_path / "run3", cache_dir=tmp_path / "cache").run()
    assert out["pretraining"][0]["reused"] is False
    assert out["results"][0]["variant"] == "InCo without DWV"


def test_pretraining_never_sees_test_images(neu_path: Path, tmp_path: Path) -> None:
    for images in ("train", "labelled"):
        exp = Experiment(
            _spec(neu_path, overrides={"pretrain.images": images, "pretrain.max_images": None}), run_dir=tmp_path
        )
        _, split = exp.load()
        labelled = split.train[:36]
        chosen = exp._pretrain_indices(split, labelled, seed=0)
        assert not set(chosen.tolist()) & set(split.test.tolist())
        assert len(chosen) == (1080 if images == "train" else 36)


@pytest.mark.slow
def test_supervised_trains_from_scratch_without_pretraining(neu_path: Path, tmp_path: Path) -> None:
    spec = _spec(neu_path, method="supervised", ratios=["1:32"], evals=["finetune"])
    result = Experiment(spec, run_dir=tmp_path / "sup").run()
    assert result["pretraining"] == []
    assert result["results"][0]["variant"] == "Supervised" and 0 <= result["results"][0]["accuracy"] <= 1
