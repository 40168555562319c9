"""Trained classifiers as files a plant applies: the same predictions as the run's test, ONNX and
TorchScript exports equal to the PyTorch model on the 720 real test images, split-conformal sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inco_core.classifier import (
    check_export,
    conformal_scores,
    conformal_threshold,
    export_onnx,
    export_torchscript,
    load_classifier,
    prediction_sets,
    probabilities,
    save_classifier,
)
from inco_core.errors import CheckpointError
from inco_core.evaluate import classification_metrics


@pytest.fixture
def run(smoke_classifiers: dict) -> dict:
    return smoke_classifiers


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_a_classifier_file_predicts_what_the_run_measured(run: dict, mode: str) -> None:
    row = next(r for r in run["result"]["results"] if r["eval"] == mode)
    model, info = load_classifier(Path(row["checkpoint"]))
    assert info["eval"] == mode and info["classes"] == row["classes"] and info["image_size"] == 32
    assert info["ratio"] == "1:16" and info["method"] == "inco" and info["meta"]["accuracy"] == row["accuracy"]
    probs = probabilities(model, run["test_images"])
    assert probs.shape == (720, 6) and torch.allclose(probs.sum(1), torch.ones(720), atol=1e-5)
    metrics = classification_metrics(probs.argmax(1), run["test_labels"], row["classes"])
    assert metrics.accuracy == row["accuracy"] and metrics.confusion_matrix == row["confusion_matrix"]
    # calibrated on the 1,080 - 66 labelled training images it was not fitted on
    assert info["conformal"]["images"] == 1014 and len(info["conformal"]["scores"]) == 1014


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_compute_what_the_pytorch_model_computes(run: dict, fmt: str) -> None:
    row = next(r for r in run["result"]["results"] if r["eval"] == "linear")
    model, _ = load_classifier(Path(row["checkpoint"]))
    data = export_onnx(model, 32) if fmt == "onnx" else export_torchscript(model, 32)
    report = check_export(fmt, data, model, run["test_images"])
    assert report["images"] == 720 and report["max_abs_diff"] < 1e-4 and report["argmax_agreement"] == 1.0


def test_conformal_sets_cover_at_the_level_on_exchangeable_data() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 6, generator=gen) * 2
    probs = logits.softmax(1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # true classes drawn from the model
    scores = conformal_scores(probs[:2000], labels[:2000])
    for level in (0.8, 0.9, 0.95):
        q = conformal_threshold(scores, level)
        sets = prediction_sets(probs[2000:], q)
        covered = sum(int(y) in s for s, y in zip(sets, labels[2000:].tolist(), strict=True)) / 2000
        assert level - 0.03 <= covered <= level + 0.04, (level, covered)
        assert all(s and s[0] == int(p.argmax()) for s, p in zip(sets, probs[2000:], strict=True))


def test_conformal_threshold_edges() -> None:
    assert conformal_threshold(torch.tensor([0.1, 0.2]), 0.9) == 1.0  # too few images: every class
    assert conformal_threshold(torch.zeros(0), 0.9) == 1.0
    assert conformal_threshold(torch.arange(1, 11).float() / 10, 0.5) == pytest.approx(0.6)  # ceil(11 * .5) = 6th
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_threshold(torch.tensor([0.1]), 1.0)
    assert prediction_sets(torch.tensor([[0.5, 0.3, 0.2]]), 0.0) == [[0]]  # never empty


def test_a_file_that_is_not_a_classifier_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_classifier(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an InCo classifier file"):
        load_classifier(tmp_path / "other.pt")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    from inco_core.classifier import build_predictor

    torch.manual_seed(0)
    model = build_predictor(3)
    path = save_classifier(
        tmp_path / "m.pt",
        model,
        eval_mode="finetune",
        method="inco",
        seed=1,
        ratio="1:8",
        classes=["a", "b", "c"],
        image_size=16,
        conformal_scores=torch.tensor([0.1, 0.4]),
    )
    again, info = load_classifier(path)
    x = torch.randint(0, 256, (4, 16, 16), dtype=torch.uint8)
    assert torch.equal(probabilities(again, x), probabilities(model, x))
    assert info["classes"] == ["a", "b", "c"] and info["conformal"]["images"] == 2
