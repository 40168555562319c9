"""Every method on real NEU-CLS images: the loss falls, every trainable parameter learns, and a
checkpoint round-trip reproduces the outputs exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inco_core.augment import to_input
from inco_core.checkpoint import load_checkpoint, save_checkpoint
from inco_core.config import AugmentConfig, OptimConfig, PretrainConfig
from inco_core.data import ImageSet
from inco_core.errors import CheckpointError
from inco_core.methods import REGISTRY, build_method
from inco_core.methods.base import StepContext, StepOutput
from inco_core.methods.inco import InCo
from inco_core.models import Backbone
from inco_core.train import TrainingDiverged, pretrain

PRETRAINING = [name for name, cls in REGISTRY.items() if cls.pretrains]
MILD = AugmentConfig(crop_scale=(0.8, 1.0), brightness=0.1, contrast=0.1)


def _cfg(**kw) -> PretrainConfig:
    defaults = {
        "epochs": 6,
        "batch_size": 16,
        "optim": OptimConfig(lr=0.05, schedule="constant"),
        "augment": MILD,
        "inco": {"views": 3},
        "mocov2": {"queue_size": 32},
    }
    return PretrainConfig(**{**defaults, **kw})


def _few(neu32: ImageSet, n: int = 32) -> torch.Tensor:
    per_class = n // 6 + 1
    idx = torch.cat([(neu32.labels == c).nonzero().flatten()[:per_class] for c in range(6)])[:n]
    return neu32.images[idx]


@pytest.mark.parametrize("name", PRETRAINING)
def test_loss_falls_on_real_images(name: str, neu32: ImageSet) -> None:
    torch.manual_seed(0)
    method = build_method(name, _cfg(epochs=8))
    run = pretrain(method, _few(neu32), method.cfg, seed=0, device=torch.device("cpu"))
    losses = [log.metrics["loss"] for log in run.history]
    assert len(losses) == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    # from epoch 2 on, MoCo's queue holds real keys instead of its random start
    assert losses[-1] < losses[1], losses


@pytest.mark.parametrize("name", PRETRAINING)
def test_every_trainable_parameter_gets_a_gradient(name: str, neu32: ImageSet) -> None:
    method = build_method(name, _cfg())
    images = _few(neu32, 16)
    views = to_input(images).repeat(method.num_views, 1, 1, 1)
    views = views + 0.05 * torch.randn_like(views)
    out = method.step(views, StepContext(5.0, torch.arange(16), 16))
    out.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in method.trainable_parameters())


@pytest.mark.parametrize("name", PRETRAINING)
def test_checkpoint_round_trip_gives_identical_outputs(name: str, neu32: ImageSet, tmp_path: Path) -> None:
    method = build_method(name, _cfg())
    pretrain(method, _few(neu32, 16), _cfg(epochs=1), seed=0, device=torch.device("cpu"))
    path = save_checkpoint(
        tmp_path / "m.pt",
        kind="pretrain",
        method=name,
        state_dict=method.state_dict(),
        config={"pretrain": method.cfg.model_dump(mode="json")},
        data_fingerprint=neu32.fingerprint,
        meta={"seed": 0},
    )
    blob = load_checkpoint(path)
    assert blob["method"] == name and blob["data_fingerprint"] == neu32.fingerprint
    assert blob["code_version"].startswith("0.")
    clone = build_method(name, PretrainConfig.model_validate(blob["config"]["pretrain"]))
    clone.load_state_dict(blob["state_dict"])
    x = to_input(neu32.images[:8])
    method.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(method.backbone(x), clone.backbone(x))


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an InCo checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_pretraining_is_repeatable_on_cpu(neu32: ImageSet) -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        method = build_method("inco", _cfg(epochs=2))
        runs.append(pretrain(method, _few(neu32, 16), method.cfg, seed=7, device=torch.device("cpu")))
    assert [h.metrics["loss"] for h in runs[0].history] == [h.metrics["loss"] for h in runs[1].history]


class _BlowsUpInEpoch2(InCo):
    """InCo whose loss turns infinite from epoch 2 on: drives the loop's divergence guard."""

    def step(self, views: torch.Tensor, ctx: StepContext) -> StepOutput:
        out = super().step(views, ctx)
        return StepOutput(out.loss * (float("inf") if ctx.epoch >= 1 else 1.0), out.logs)


def test_diverging_loss_stops_with_a_clear_error(neu32: ImageSet) -> None:
    method = _BlowsUpInEpoch2(Backbone(), _cfg(epochs=3))
    with pytest.raises(TrainingDiverged, match=r"pretrain diverged at epoch 2 .*lower pretrain\.optim\.lr"):
        pretrain(method, _few(neu32, 16), method.cfg, seed=0, device=torch.device("cpu"))
