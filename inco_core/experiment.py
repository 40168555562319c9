"""One experiment end to end: load, split, pretrain once per seed (or reuse), evaluate per ratio.

This is what ``inco run`` calls in-process and what the worker calls inside Ray (issue 3).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from inco_core.checkpoint import code_version, load_checkpoint, save_checkpoint
from inco_core.config import METHODS, RunSpec, TrainingConfig, config_hash
from inco_core.data import ImageSet, load_images
from inco_core.device import hardware, prepare_model, select_device
from inco_core.evaluate import EvalData, KnnMonitor, Metrics, finetune, linear_eval
from inco_core.methods import build_method, method_class
from inco_core.models import Backbone
from inco_core.progress import Reporter
from inco_core.splits import Split, labelled_subsets, stratified_split
from inco_core.train import pretrain

DISPLAY_NAMES = {
    "inco": "InCo",
    "simclr": "SimCLR",
    "mocov2": "MoCo v2",
    "simsiam": "SimSiam",
    "supervised": "Supervised",
}


def variant_name(method: str, cfg: TrainingConfig) -> str:
    """Row label of Table 1: 'InCo with DWV' / 'InCo without DWV' (a_f = 0), else the method."""
    if method == "inco":
        return "InCo without DWV" if cfg.pretrain.inco.a_f == 0 else "InCo with DWV"
    return DISPLAY_NAMES[method]


@dataclass
class ResultRow:
    method: str
    variant: str
    ratio: str
    eval: str
    seed: int
    accuracy: float
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]]
    classes: list[str]
    labelled_images: int
    test_images: int
    wall_time_s: float
    pretrain_key: str | None = None
    checkpoint: str | None = None


@dataclass
class PretrainInfo:
    seed: int
    key: str
    checkpoint: str
    reused: bool
    images: int
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


def pretrain_key(method: str, cfg: TrainingConfig, fingerprint: str, indices: Tensor, seed: int) -> str:
    """Identity of a pretrained backbone: method, the pretrain config that shapes the weights,
    input size, data fingerprint, the images it saw and the seed."""
    relevant = cfg.pretrain.model_dump()
    for other in METHODS:
        if other != method:
            relevant.pop(other, None)
    for monitor_only in ("knn_every", "knn_k"):
        relevant.pop(monitor_only)
    return config_hash(
        {
            "method": method,
            "pretrain": relevant,
            "image_size": cfg.image_size,
            "data": fingerprint,
            "images": config_hash(indices.tolist()),
            "seed": seed,
        }
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Experiment:
    """Runs a :class:`RunSpec`. ``cache_dir`` holds decoded images and pretrained backbones for
    reuse across runs; ``run_dir`` receives checkpoints and ``result.json``."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        run_dir: Path,
        cache_dir: Path | None = None,
        reuse_backbones: bool = True,
        reporter: Reporter | None = None,
    ) -> None:
        self.spec = spec
        self.reuse_backbones = reuse_backbones
        self.cfg = spec.resolve()
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.reporter = reporter
        self.device = select_device(spec.resources.device)
        self.method_cls = method_class(spec.method)
        self._backbones: dict[str, tuple[Backbone, PretrainInfo]] = {}  # by pretrain key

    # -- data -------------------------------------------------------------------------------
    def load(self) -> tuple[ImageSet, Split]:
        ds = load_images(
            self.spec.data.path,
            self.cfg.image_size,
            cache_dir=self.cache_dir / "images" if self.cache_dir else None,
        )
        split = stratified_split(
            ds.labels,
            ds.file_hashes,
            ds.classes,
            train_fraction=self.spec.data.train_fraction,
            seed=self.spec.data.split_seed,
        )
        return ds, split

    def _pretrain_indices(self, split: Split, labelled: Tensor, seed: int) -> Tensor:
        pool = labelled if self.cfg.pretrain.images == "labelled" else split.train
        cap = self.cfg.pretrain.max_images
        if cap is not None and cap < len(pool):
            pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:cap]
            pool = torch.sort(pool[pick]).values
        return pool

    # -- pretraining ------------------------------------------------------------------------
    def backbone_for(
        self, ds: ImageSet, indices: Tensor, monitor_idx: Tensor, seed: int
    ) -> tuple[Backbone, PretrainInfo]:
        """A pretrained backbone: from the cache when the same one was trained before."""
        key = pretrain_key(self.spec.method, self.cfg, ds.fingerprint, indices, seed)
        run_ckpt = self.run_dir / "checkpoints" / f"pretrain-{self.spec.method}-seed{seed}-{key[:8]}.pt"
        cached = (
            self.cache_dir / "backbones" / f"{self.spec.method}-{key}.pt"
            if self.cache_dir and self.reuse_backbones
            else None
        )
        if key in self._backbones:
            return self._backbones[key]
        if cached is not None and cached.exists():
            blob = load_checkpoint(cached)
            _link_or_copy(cached, run_ckpt)
            info = PretrainInfo(seed, key, str(run_ckpt), True, len(indices), 0.0, blob["meta"].get("history", []))
            backbone = prepare_model(Backbone(), self.device)
            backbone.load_state_dict(blob["state_dict"])
            self._backbones[key] = (backbone, info)
            return self._backbones[key]

        torch.manual_seed(seed)
        method = prepare_model(build_method(self.spec.method, self.cfg.pretrain), self.device)
        monitor = KnnMonitor(
            ds.images[monitor_idx].to(self.device), ds.labels[monitor_idx], self.cfg.pretrain, self.device
        )
        t0 = time.perf_counter()
        run = pretrain(
            method,
            ds.images[indices].to(self.device),
            self.cfg.pretrain,
            seed=seed,
            device=self.device,
            reporter=self.reporter,
            monitor=monitor,
        )
        wall = time.perf_counter() - t0
        history = [asdict(log) for log in run.history]
        save_checkpoint(
            run_ckpt,
            kind="pretrain",
            method=self.spec.method,
            state_dict=method.backbone.state_dict(),
            config=self.cfg.model_dump(mode="json"),
            data_fingerprint=ds.fingerprint,
            meta={"seed": seed, "key": key, "images": len(indices), "history": history, "wall_time_s": wall},
        )
        if cached is not None:
            _link_or_copy(run_ckpt, cached)
        self._backbones[key] = (
            method.backbone,
            PretrainInfo(seed, key, str(run_ckpt), False, len(indices), wall, history),
        )
        return self._backbones[key]

    # -- evaluation -------------------------------------------------------------------------
    def _evaluate(
        self,
        mode: str,
        backbone: Backbone,
        data: EvalData,
        *,
        seed: int,
        stage: str,
        pretrained: bool,
        fingerprint: str,
    ) -> tuple[Metrics, str | None]:
        if mode == "linear":
            return linear_eval(
                backbone, data, self.cfg.linear, seed=seed, device=self.device, reporter=self.reporter, stage=stage
            ), None
        metrics, model = finetune(
            backbone,
            data,
            self.cfg.finetune,
            seed=seed,
            device=self.device,
            backbone_lr_scale=None if pretrained else 1.0,
            reporter=self.reporter,
            stage=stage,
        )
        ckpt = self.run_dir / "checkpoints" / f"{stage.replace(' ', '-').replace(':', 'r')}-seed{seed}.pt"
        save_checkpoint(
            ckpt,
            kind="finetune",
            method=self.spec.method,
            state_dict=model.state_dict(),
            config=self.cfg.model_dump(mode="json"),
            data_fingerprint=fingerprint,
            meta={"seed": seed, "classes": data.classes, "accuracy": metrics.accuracy},
        )
        return metrics, str(ckpt)

    def run(self) -> dict[str, Any]:
        """Run everything; write and return the ``result.json`` content."""
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ds, split = self.load()
        ratios = self.spec.ratio_values
        rows: list[ResultRow] = []
        variant = variant_name(self.spec.method, self.cfg)
        for seed in self.spec.seeds:
            subsets = labelled_subsets(ds.labels, split.train, ds.classes, ratios, seed=seed)
            monitor_idx = subsets[min(ratios)]
            for ratio in ratios:
                info = None
                if self.method_cls.pretrains:
                    indices = self._pretrain_indices(split, subsets[ratio], seed)
                    backbone, info = self.backbone_for(ds, indices, monitor_idx, seed)
                else:
                    torch.manual_seed(seed)
                    backbone = prepare_model(Backbone(), self.device)
                data = EvalData(
                    ds.images[subsets[ratio]],
                    ds.labels[subsets[ratio]],
                    ds.images[split.test],
                    ds.labels[split.test],
                    ds.classes,
                )
                for mode in self.spec.evals:
                    t0 = time.perf_counter()
                    stage = f"{mode} 1:{ratio}"
                    metrics, ckpt = self._evaluate(
                        mode,
                        backbone,
                        data,
                        seed=seed,
                        stage=stage,
                        pretrained=info is not None,
                        fingerprint=ds.fingerprint,
                    )
                    rows.append(
                        ResultRow(
                            method=self.spec.method,
                            variant=variant,
                            ratio=f"1:{ratio}",
                            eval=mode,
                            seed=seed,
                            accuracy=metrics.accuracy,
                            per_class_recall=metrics.per_class_recall,
                            confusion_matrix=metrics.confusion_matrix,
                            classes=ds.classes,
                            labelled_images=len(subsets[ratio]),
                            test_images=len(split.test),
                            wall_time_s=time.perf_counter() - t0,
                            pretrain_key=info.key if info else None,
                            checkpoint=ckpt,
                        )
                    )
        result = {
            "results": [asdict(r) for r in rows],
            "pretraining": [asdict(info) for _, info in self._backbones.values()],
            "spec": self.spec.model_dump(mode="json"),
            "config": self.cfg.model_dump(mode="json"),
            "data": {
                "path": str(ds.root),
                "fingerprint": ds.fingerprint,
                "images": len(ds),
                "classes": ds.classes,
                "train_images": len(split.train),
                "test_images": len(split.test),
            },
            "code_version": code_version(),
            "hardware": hardware(self.device),
            "device": self.device.type,
            "run_dir": str(self.run_dir),
            "wall_time_s": time.perf_counter() - t_start,
        }
        tmp = self.run_dir / ".result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, self.run_dir / "result.json")
        return result
