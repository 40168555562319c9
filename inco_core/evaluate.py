"""Evaluation on the labelled subset: fine-tuning, linear evaluation, kNN monitor, metrics."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inco_core.augment import augment_views, to_input
from inco_core.config import FinetuneConfig, LinearConfig, PretrainConfig
from inco_core.device import autocast, prepare_input, prepare_model
from inco_core.models import Backbone, Classifier
from inco_core.progress import EpochLog, NullReporter, Reporter
from inco_core.train import build_optimizer, build_schedule

KNN_TIE_ORDERS = 8  # seeded random orders that break ties between equally near neighbours


@dataclass(frozen=True)
class Metrics:
    """Top-1 accuracy (0..1), recall per class (0..1) and the confusion matrix [true][pred]."""

    accuracy: float
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]]


@dataclass(frozen=True)
class LinearProbe:
    """What linear evaluation trained on a frozen backbone: the standardisation of its features
    (mean, std of the labelled training features) and the linear head on top."""

    head: nn.Linear
    feature_mean: Tensor
    feature_std: Tensor


@dataclass(frozen=True)
class EvalData:
    """Labelled training images and the test images, uint8 [N, C, S, S] with int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]


def classification_metrics(pred: Tensor, target: Tensor, classes: list[str]) -> Metrics:
    """Metrics of predicted vs true class indices ([N] int64 each)."""
    k = len(classes)
    cm = torch.bincount(target * k + pred, minlength=k * k).view(k, k)
    support = cm.sum(dim=1).clamp(min=1)
    recall = (cm.diagonal() / support).tolist()
    return Metrics(
        accuracy=float((pred == target).float().mean()),
        per_class_recall={c: float(r) for c, r in zip(classes, recall, strict=True)},
        confusion_matrix=cm.tolist(),
    )


@torch.no_grad()
def features(backbone: nn.Module, images: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    """Eval-mode embeddings of uint8 images [N, C, S, S] -> float [N, 512] on ``device``."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for chunk in images.split(batch_size):
        with autocast(device):
            out.append(backbone(prepare_input(to_input(chunk.to(device)), device)).float())
    backbone.train(was_training)
    return torch.cat(out)


def knn_accuracy(feats: Tensor, labels: Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out weighted kNN accuracy (cosine similarity, weights exp(sim / T)).

    feats: [N, D]; labels: [N] int64. Each image is classified by its k nearest other images.
    Equally near neighbours are taken in a random order of the images, not by index, and the accuracy
    is averaged over :data:`KNN_TIE_ORDERS` seeded orders (the same inputs give the same number).
    Without ties every order gives the same neighbours. On a collapsed embedding (all similarities
    equal) the index order gave every image the same first neighbours: 0.0 on class-sorted images
    with 6 per class and k = 20; now the reading is near chance (leave-one-out keeps it a little
    below 1 / classes when the classes are small).
    """
    n = len(feats)
    if n < 2:
        return float("nan")
    z = F.normalize(feats.float(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, n - 1)
    gen = torch.Generator().manual_seed(0)
    correct = 0.0
    for _ in range(KNN_TIE_ORDERS):
        perm = torch.randperm(n, generator=gen).to(sim.device)
        top_sim, top_pos = sim[:, perm].topk(k, dim=1)  # [N, k], positions in the shuffled columns
        votes = torch.zeros(n, int(labels.max()) + 1, device=feats.device)
        votes.scatter_add_(1, labels[perm[top_pos]], torch.exp(top_sim / temperature))
        correct += float((votes.argmax(dim=1) == labels).float().mean())
    return correct / KNN_TIE_ORDERS


class KnnMonitor:
    """Per-epoch kNN accuracy of the embedding on labelled *training* images (never test images)."""

    def __init__(self, images: Tensor, labels: Tensor, cfg: PretrainConfig, device: torch.device) -> None:
        self.images, self.labels, self.k, self.device = images, labels.to(device), cfg.knn_k, device

    def __call__(self, backbone: nn.Module) -> float:
        return knn_accuracy(features(backbone, self.images, self.device), self.labels, self.k)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    model.eval()
    preds = []
    for chunk in images.split(batch_size):
        with autocast(device):
            preds.append(model(prepare_input(to_input(chunk.to(device)), device)).argmax(dim=1))
    return torch.cat(preds).cpu()


def _minibatches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    """A shuffled cut of range(n); a trailing batch of one joins the previous (batch norm)."""
    batches = list(torch.randperm(n, generator=gen).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def finetune(
    backbone: Backbone,
    data: EvalData,
    cfg: FinetuneConfig,
    *,
    seed: int,
    device: torch.device,
    backbone_lr_scale: float | None = None,
    reporter: Reporter | None = None,
    stage: str = "finetune",
) -> tuple[Metrics, Classifier]:
    """Backbone (copied, never changed in place) + new linear softmax head, all trained on the
    labelled images; returns the test metrics and the trained classifier."""
    reporter = reporter or NullReporter()
    torch.manual_seed(seed)
    model = prepare_model(Classifier(copy.deepcopy(backbone), len(data.classes)), device)
    scale = cfg.backbone_lr_scale if backbone_lr_scale is None else backbone_lr_scale
    groups = [
        {"params": model.head.parameters(), "lr": cfg.optim.lr},
        {"params": model.backbone.parameters(), "lr": cfg.optim.lr * scale},
    ]
    opt = build_optimizer(groups, cfg.optim)
    n = len(data.train_images)
    steps_per_epoch = len(_minibatches(n, cfg.batch_size, torch.Generator()))
    sched = build_schedule(opt, cfg.optim, cfg.epochs * steps_per_epoch, steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    model.train()
    reporter.stage_start(stage, cfg.epochs * steps_per_epoch)
    for epoch in range(cfg.epochs):
        t0, total, seen = time.perf_counter(), 0.0, 0
        for idx in _minibatches(n, cfg.batch_size, gen):
            idx = idx.to(device)
            x = (
                augment_views(train_x[idx], 1, cfg.augment, aug_gen)
                if cfg.augment is not None
                else to_input(train_x[idx])
            )
            with autocast(device):
                loss = F.cross_entropy(model(prepare_input(x, device)).float(), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            reporter.step(stage, {"loss": loss.item()})
        reporter.epoch_end(
            EpochLog(
                stage, epoch + 1, cfg.epochs, {"loss": total / seen, "img_per_s": seen / (time.perf_counter() - t0)}
            )
        )
    reporter.stage_end(stage)
    metrics = classification_metrics(predict(model, data.test_images, device), data.test_labels, data.classes)
    return metrics, model


def linear_eval(
    backbone: Backbone,
    data: EvalData,
    cfg: LinearConfig,
    *,
    seed: int,
    device: torch.device,
    reporter: Reporter | None = None,
    stage: str = "linear",
) -> tuple[Metrics, LinearProbe]:
    """Frozen backbone (batch-norm statistics too): embeddings are computed once, then only a
    linear softmax classifier is trained on them. The features are standardised with the mean and
    std of the labelled training features (a fixed affine map, so the classifier stays linear)."""
    reporter = reporter or NullReporter()
    torch.manual_seed(seed)
    train_f = features(backbone, data.train_images, device)
    test_f = features(backbone, data.test_images, device)
    mean, std = train_f.mean(dim=0), train_f.std(dim=0, unbiased=False) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    train_y = data.train_labels.to(device)
    head = nn.Linear(train_f.shape[1], len(data.classes)).to(device)
    opt = build_optimizer(head.parameters(), cfg.optim)
    n = len(train_f)
    batches_per_epoch = math.ceil(n / cfg.batch_size)
    sched = build_schedule(opt, cfg.optim, cfg.epochs * batches_per_epoch, batches_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    reporter.stage_start(stage, cfg.epochs)
    for epoch in range(cfg.epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        reporter.step(stage, {"loss": total / n})
        reporter.epoch_end(EpochLog(stage, epoch + 1, cfg.epochs, {"loss": total / n}))
    reporter.stage_end(stage)
    with torch.no_grad():
        pred = head(test_f).argmax(dim=1).cpu()
    probe = LinearProbe(head.cpu().eval(), mean.float().cpu(), std.float().cpu())
    return classification_metrics(pred, data.test_labels, data.classes), probe
