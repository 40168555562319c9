"""The whole experiment at the smoke preset on real NEU-CLS images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inco_core.config import load_spec, preset_config
from inco_core.errors import CheckpointError, ConfigError
from inco_core.experiment import Experiment, FolderBackboneStore
from inco_core.progress import RecordingReporter
from inco_core.splits import labelled_subsets


def _sha256(indices: torch.Tensor) -> str:
    """The documented recipe: SHA-256 of the sorted indices as little-endian int64."""
    return hashlib.sha256(np.sort(indices.numpy()).astype("<i8").tobytes()).hexdigest()


def _spec(neu_path: Path, **kw) -> object:
    return load_spec({"data": {"path": str(neu_path)}, "preset": "smoke", "resources": {"device": "cpu"}, **kw})


@pytest.mark.slow
def test_inco_smoke_experiment_and_backbone_reuse(neu_path: Path, tmp_path: Path) -> None:
    spec = _spec(neu_path, method="inco", ratios=["1:32", "1:8"], evals=["finetune", "linear"])
    reporter = RecordingReporter()
    store = FolderBackboneStore(tmp_path / "backbones")
    result = Experiment(
        spec, run_dir=tmp_path / "run1", cache_dir=tmp_path / "cache", backbones=store, reporter=reporter
    ).run()

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
    # the split and each labelled subset are recorded by hash: recomputed here for the same seeds
    ds, split = Experiment(spec, run_dir=tmp_path / "load", cache_dir=tmp_path / "cache").load()
    subsets = labelled_subsets(ds.labels, split.train, ds.classes, [32, 8], seed=0)
    assert on_disk["split"] == {
        "seed": 0,
        "train_fraction": 0.6,
        "train_sha256": _sha256(split.train),
        "test_sha256": _sha256(split.test),
        "n_train": 1080,
        "n_test": 720,
    }
    assert [r["labelled_sha256"] for r in on_disk["results"]] == [_sha256(subsets[32])] * 2 + [_sha256(subsets[8])] * 2
    assert on_disk["data"]["fingerprint"] and on_disk["code_version"]
    ckpt = torch.load(Path(result["pretraining"][0]["checkpoint"]), weights_only=True)
    assert ckpt["config"]["pretrain"]["epochs"] == 1 and ckpt["data_fingerprint"] == on_disk["data"]["fingerprint"]

    # same method, pretrain config, data and seed: the backbone is reused, not trained again
    again = _spec(neu_path, method="inco", ratios=["1:16"], evals=["linear"])
    reporter2 = RecordingReporter()
    second = Experiment(
        again, run_dir=tmp_path / "run2", cache_dir=tmp_path / "cache", backbones=store, reporter=reporter2
    ).run()
    assert second["pretraining"][0]["reused"] is True
    assert second["pretraining"][0]["key"] == result["pretraining"][0]["key"]
    assert "pretrain" not in [log.stage for log in reporter2.epochs]

    # another seed or another pretrain config is another backbone
    third = _spec(neu_path, method="inco", ratios=["1:16"], evals=["linear"], overrides={"pretrain.inco.a_f": 0})
    out = Experiment(third, run_dir=tmp_path / "run3", cache_dir=tmp_path / "cache", backbones=store).run()
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


@pytest.mark.slow
def test_pretrain_only_then_finetune_from_the_given_backbone(neu_path: Path, tmp_path: Path) -> None:
    spec = _spec(neu_path, method="simclr", ratios=["1:32"])
    first = Experiment(spec, run_dir=tmp_path / "pre").run(pretrain_only=True)
    assert first["results"] == [] and len(first["pretraining"]) == 1
    ckpt = Path(first["pretraining"][0]["checkpoint"])
    reporter = RecordingReporter()
    second = Experiment(spec, run_dir=tmp_path / "ft", pretrained={0: ckpt}, reporter=reporter).run()
    assert second["pretraining"][0]["reused"] is True and second["pretraining"][0]["checkpoint"] == str(ckpt)
    assert [log.stage for log in reporter.epochs] == ["finetune 1:32", "finetune 1:32"]
    with pytest.raises(ConfigError, match="seed"):
        Experiment(_spec(neu_path, method="simclr", seeds=[1]), run_dir=tmp_path / "x", pretrained={0: ckpt})
    with pytest.raises(CheckpointError, match="not a pretrained 'inco'"):
        Experiment(_spec(neu_path, method="inco"), run_dir=tmp_path / "y", pretrained={0: ckpt}).run()


class _StopAfter(RecordingReporter):
    """Raises after ``n`` pretraining epochs, like a worker that dies mid-run."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def step(self, stage: str, logs: dict[str, float]) -> None:
        if stage == "pretrain" and len(self.epochs) == self.n:  # in the middle of epoch n + 1
            raise KeyboardInterrupt


@pytest.mark.slow
def test_pretraining_resumes_from_its_last_epoch(neu_path: Path, tmp_path: Path) -> None:
    spec = _spec(neu_path, method="inco", overrides={"pretrain.epochs": 3, "pretrain.max_images": 64})
    with pytest.raises(KeyboardInterrupt):
        Experiment(spec, run_dir=tmp_path / "run", reporter=_StopAfter(2)).run(pretrain_only=True)
    assert list((tmp_path / "run" / "checkpoints").glob("*-last.pt"))
    reporter = RecordingReporter()
    out = Experiment(spec, run_dir=tmp_path / "run", reporter=reporter).run(pretrain_only=True)
    assert [log.epoch for log in reporter.epochs] == [3]  # epochs 1 and 2 were not trained again
    assert not list((tmp_path / "run" / "checkpoints").glob("*-last.pt"))
    resumed = torch.load(out["pretraining"][0]["checkpoint"], weights_only=True)
    assert resumed["meta"]["resumed_at_epoch"] == 2

    # the same run without the interruption ends with the same weights (same seed, CPU): the model,
    # optimiser, schedule, augmentation RNG and BID partition all come back from the checkpoint
    whole = Experiment(spec, run_dir=tmp_path / "whole").run(pretrain_only=True)
    straight = torch.load(whole["pretraining"][0]["checkpoint"], weights_only=True)
    for name, value in straight["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][name].float(), value.float(), atol=1e-5), name


def test_stage_names_carry_the_seed_when_there_are_several(neu_path: Path, tmp_path: Path) -> None:
    exp = Experiment(_spec(neu_path, seeds=[0, 1]), run_dir=tmp_path)
    assert exp._stage("pretrain", 1) == "pretrain seed 1"
    assert Experiment(_spec(neu_path), run_dir=tmp_path)._stage("pretrain", 0) == "pretrain"


def test_pretrain_key_changes_with_the_training_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from inco_core import experiment

    cfg, indices = preset_config("smoke"), torch.arange(20)
    key = experiment.pretrain_key("inco", cfg, "fingerprint", indices, 0)
    assert experiment.pretrain_key("inco", cfg, "fingerprint", indices, 0) == key  # stable
    monkeypatch.setattr(experiment, "pretrain_code_hash", lambda: "0" * 64, raising=False)
    assert experiment.pretrain_key("inco", cfg, "fingerprint", indices, 0) != key  # older code: another backbone


def test_the_code_hash_covers_every_loss_and_method_file() -> None:
    import inco_core
    from inco_core.experiment import pretrain_code_hash, pretrain_source_files

    root = Path(inco_core.__file__).resolve().parent
    covered = set(pretrain_source_files())
    for folder in ("losses", "methods"):
        files = sorted((root / folder).rglob("*.py"))
        assert files and not [f for f in files if f not in covered]
    assert {root / "train.py", root / "augment.py", root / "models.py"} <= covered
    assert root / "experiment.py" not in covered  # result files and the like keep the stored backbones
    assert len(pretrain_code_hash()) == 64 and pretrain_code_hash() == pretrain_code_hash()
