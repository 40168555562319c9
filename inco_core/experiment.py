"""One experiment end to end: load, split, pretrain once per seed (or reuse), evaluate per ratio.

This is what ``inco run`` calls in-process and what the worker calls inside Ray (issue 3).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from inco_core.checkpoint import code_version, load_checkpoint, save_checkpoint
from inco_core.classifier import Predictor, conformal_scores, save_classifier
from inco_core.config import METHODS, RunSpec, TrainingConfig, config_hash
from inco_core.data import ImageSet, load_images
from inco_core.device import hardware, prepare_model, select_device
from inco_core.distributed import world
from inco_core.errors import CheckpointError, ConfigError
from inco_core.evaluate import EvalData, KnnMonitor, Metrics, finetune, linear_eval
from inco_core.methods import build_method, method_class
from inco_core.models import Backbone
from inco_core.progress import Reporter
from inco_core.splits import Split, indices_sha256, labelled_subsets, split_record, stratified_split
from inco_core.train import pretrain

MAX_CALIBRATION = 2000  # labelled images held out from fine-tuning that calibrate a classifier's sets
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
    labelled_sha256: str | None = None  # of the labelled images' indices (inco_core.splits.indices_sha256)


@dataclass
class PretrainInfo:
    seed: int
    key: str
    checkpoint: str
    reused: bool
    images: int
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


# The inco_core sources that shape a pretrained backbone's weights, relative to the package (a
# folder stands for every .py file under it). A change to any of them is a new backbone; a change
# elsewhere (docs, the service, evaluation, result files) keeps the stored backbones.
#   losses/, methods/   the losses, heads and steps of every method
#   train.py            loop, batch partition, optimiser and schedule
#   augment.py          the views every method trains on
#   models.py           the backbone and heads
#   distributed.py      gradient averaging and gathers of data-parallel runs
#   device.py           bf16 autocast and memory layout on CUDA
#   config.py           defaults computed in code, not in the stored config (e.g. the T1, T2 ramp)
#   data.py             decoding and resizing: the pixels (the fingerprint covers the files only)
# Left out: experiment.py and splits.py choose the images and the seed, which the key holds itself.
PRETRAIN_SOURCES: tuple[str, ...] = (
    "losses",
    "methods",
    "train.py",
    "augment.py",
    "models.py",
    "distributed.py",
    "device.py",
    "config.py",
    "data.py",
)


def pretrain_source_files() -> list[Path]:
    """The files of :data:`PRETRAIN_SOURCES`, sorted by their path in the package."""
    root = Path(__file__).resolve().parent
    files: list[Path] = []
    for name in PRETRAIN_SOURCES:
        path = root / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.cache
def pretrain_code_hash() -> str:
    """SHA-256 over the path and contents of every :func:`pretrain_source_files` file: the version
    of the code that trains a backbone, independent of git and of changes elsewhere."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in pretrain_source_files():
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def pretrain_key(method: str, cfg: TrainingConfig, fingerprint: str, indices: Tensor, seed: int) -> str:
    """Identity of a pretrained backbone: method, the pretrain config that shapes the weights,
    input size, data fingerprint, the images it saw, the seed and the version of the code that
    trains it (:func:`pretrain_code_hash`)."""
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
            "code": pretrain_code_hash(),
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


class BackboneStore(Protocol):
    """Where pretrained backbones are kept for reuse, keyed by :func:`pretrain_key`.

    ``inco run`` uses :class:`FolderBackboneStore`; the service keeps them in its artifact store and
    records each one in its SQL store.
    """

    def find(self, method: str, key: str) -> Path | None:
        """A checkpoint of the backbone with this key, or None."""
        ...

    def add(self, method: str, key: str, checkpoint: Path, info: PretrainInfo) -> None:
        """Keep a freshly trained backbone (``checkpoint`` may be moved or linked, not changed)."""
        ...


class FolderBackboneStore:
    """Backbones as ``{method}-{key}.pt`` files in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def find(self, method: str, key: str) -> Path | None:
        path = self.folder / f"{method}-{key}.pt"
        return path if path.exists() else None

    def add(self, method: str, key: str, checkpoint: Path, info: PretrainInfo) -> None:
        _link_or_copy(checkpoint, self.folder / f"{method}-{key}.pt")


def load_split(spec: RunSpec, cfg: TrainingConfig, cache_dir: Path | None) -> tuple[ImageSet, Split]:
    """The spec's images (decoded once into ``cache_dir/images``) and its train/test split."""
    if not spec.data.path:
        raise ConfigError("the run spec names no image folder: set data.path (inco run --data PATH)")
    ds = load_images(
        spec.data.path,
        cfg.image_size,
        cache_dir=cache_dir / "images" if cache_dir else None,
        on_corrupt=spec.data.on_corrupt,
    )
    split = stratified_split(
        ds.labels, ds.file_hashes, ds.classes, train_fraction=spec.data.train_fraction, seed=spec.data.split_seed
    )
    return ds, split


def pretrain_pool(train: Tensor, labelled: Tensor, cfg: TrainingConfig, seed: int) -> Tensor:
    """The images a pretraining sees: every training image (or only the labelled ones), sampled down
    to ``pretrain.max_images`` with ``seed``. Never a test image."""
    pool = labelled if cfg.pretrain.images == "labelled" else train
    cap = cfg.pretrain.max_images
    if cap is not None and cap < len(pool):
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:cap]
        pool = torch.sort(pool[pick]).values
    return pool


class Experiment:
    """Runs a :class:`RunSpec`. ``cache_dir`` holds decoded images and pretrained backbones for
    reuse across runs; ``run_dir`` receives checkpoints and ``result.json``."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        run_dir: Path,
        cache_dir: Path | None = None,
        backbones: BackboneStore | None = None,
        pretrained: dict[int, Path] | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        """
        cache_dir: decoded images, reused across runs (None: decode every time).
        backbones: where pretrained backbones are looked up and kept (None: always pretrain).
        pretrained: a backbone checkpoint per seed to evaluate instead of pretraining (a
            fine-tune job that follows a pretrain job).
        """
        self.spec = spec
        self.cfg = spec.resolve()
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.backbones = backbones
        self.pretrained = pretrained or {}
        self.reporter = reporter
        self.device = select_device(spec.resources.device)
        self.method_cls = method_class(spec.method)
        if self.pretrained and not self.method_cls.pretrains:
            raise ConfigError(f"method {spec.method!r} trains from scratch and takes no pretrained backbone")
        missing = [s for s in spec.seeds if self.pretrained and s not in self.pretrained]
        if missing:
            raise ConfigError(f"no pretrained backbone given for seed(s) {missing}: pretrain them first")
        self._backbones: dict[str, tuple[Backbone, PretrainInfo]] = {}  # by pretrain key
        self.rank, self.world_size = world()  # data-parallel pretraining when a process group is up

    def _stage(self, name: str, seed: int) -> str:
        """Stage names are unique within a run: the seed is added when there are several."""
        return name if len(self.spec.seeds) == 1 else f"{name} seed {seed}"

    # -- data -------------------------------------------------------------------------------
    def load(self) -> tuple[ImageSet, Split]:
        return load_split(self.spec, self.cfg, self.cache_dir)

    def _pretrain_indices(self, split: Split, labelled: Tensor, seed: int) -> Tensor:
        return pretrain_pool(split.train, labelled, self.cfg, seed)

    # -- pretraining ------------------------------------------------------------------------
    def backbone_for(
        self, ds: ImageSet, indices: Tensor, monitor_idx: Tensor, seed: int
    ) -> tuple[Backbone, PretrainInfo]:
        """A pretrained backbone: given, found in the backbone store, or trained (resuming from
        this run's last epoch checkpoint when there is one)."""
        key = pretrain_key(self.spec.method, self.cfg, ds.fingerprint, indices, seed)
        if key in self._backbones:
            return self._backbones[key]
        found = self.pretrained.get(seed) or (self.backbones.find(self.spec.method, key) if self.backbones else None)
        if found is not None:
            blob = load_checkpoint(found)
            if blob.get("kind") != "pretrain" or blob.get("method") != self.spec.method:
                raise CheckpointError(
                    f"{found} holds a {blob.get('kind')} checkpoint of {blob.get('method')!r}, "
                    f"not a pretrained {self.spec.method!r} backbone"
                )
            meta = blob["meta"]
            info = PretrainInfo(
                seed,
                meta.get("key", key),
                str(found),
                True,
                int(meta.get("images", len(indices))),
                0.0,
                meta.get("history", []),
            )
            backbone = prepare_model(Backbone(), self.device)
            backbone.load_state_dict(blob["state_dict"])
            self._backbones[key] = (backbone, info)
            return self._backbones[key]

        run_ckpt = self.run_dir / "checkpoints" / f"pretrain-{self.spec.method}-seed{seed}-{key[:8]}.pt"
        resume_ckpt = run_ckpt.with_name(run_ckpt.stem + "-last.pt")
        torch.manual_seed(seed)
        method = prepare_model(build_method(self.spec.method, self.cfg.pretrain), self.device)
        lead = self.rank == 0
        monitor = (
            KnnMonitor(ds.images[monitor_idx].to(self.device), ds.labels[monitor_idx], self.cfg.pretrain, self.device)
            if lead
            else None
        )
        resume_ckpt.parent.mkdir(parents=True, exist_ok=True)
        resume = None
        if resume_ckpt.exists():
            resume = torch.load(resume_ckpt, map_location="cpu", weights_only=True)

        def keep_last(epoch: int, make_state: Any) -> None:
            if lead and epoch < self.cfg.pretrain.epochs:
                tmp = resume_ckpt.with_name(f".{resume_ckpt.name}.tmp{os.getpid()}")
                torch.save(make_state(), tmp)
                os.replace(tmp, resume_ckpt)

        t0 = time.perf_counter()
        run = pretrain(
            method,
            ds.images[indices].to(self.device),
            self.cfg.pretrain,
            seed=seed,
            device=self.device,
            reporter=self.reporter,
            monitor=monitor,
            resume=resume,
            on_epoch_end=keep_last,
            stage=self._stage("pretrain", seed),
            rank=self.rank,
            world_size=self.world_size,
        )
        wall = time.perf_counter() - t0
        history = [asdict(log) for log in run.history]
        info = PretrainInfo(seed, key, str(run_ckpt), False, len(indices), wall, history)
        self._backbones[key] = (method.backbone, info)
        if not lead:
            return self._backbones[key]
        save_checkpoint(
            run_ckpt,
            kind="pretrain",
            method=self.spec.method,
            state_dict=method.backbone.state_dict(),
            config=self.cfg.model_dump(mode="json"),
            data_fingerprint=ds.fingerprint,
            meta={
                "seed": seed,
                "key": key,
                "images": len(indices),
                "history": history,
                "wall_time_s": wall,
                "resumed_at_epoch": int(resume["epoch"]) if resume else None,
            },
        )
        resume_ckpt.unlink(missing_ok=True)
        if self.backbones is not None:
            self.backbones.add(self.spec.method, key, run_ckpt, info)
        return self._backbones[key]

    # -- evaluation -------------------------------------------------------------------------
    def _evaluate(
        self,
        mode: str,
        backbone: Backbone,
        data: EvalData,
        *,
        seed: int,
        ratio: str,
        stage: str,
        pretrained: bool,
        fingerprint: str,
        calibration: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[Metrics, str]:
        """Train and test one classifier; write it as a classifier file (with its split-conformal
        calibration scores) and return its metrics and the file."""
        if mode == "linear":
            metrics, probe = linear_eval(
                backbone, data, self.cfg.linear, seed=seed, device=self.device, reporter=self.reporter, stage=stage
            )
            model = Predictor(
                copy.deepcopy(backbone), probe.head, feature_mean=probe.feature_mean, feature_std=probe.feature_std
            )
        else:
            metrics, trained = finetune(
                backbone,
                data,
                self.cfg.finetune,
                seed=seed,
                device=self.device,
                backbone_lr_scale=None if pretrained else 1.0,
                reporter=self.reporter,
                stage=stage,
            )
            model = Predictor(trained.backbone, trained.head)
        model = model.to(self.device).eval()
        images, labels = calibration
        with torch.no_grad():
            probs = torch.cat([model(c.to(self.device).float()).float().cpu() for c in images.split(256)])
        scores = conformal_scores(probs, labels) if len(labels) else torch.zeros(0)
        ckpt = self.run_dir / "checkpoints" / f"{stage.replace(' ', '-').replace(':', 'r')}-seed{seed}.pt"
        save_classifier(
            ckpt,
            model.cpu(),
            eval_mode=mode,
            method=self.spec.method,
            seed=seed,
            ratio=ratio,
            classes=data.classes,
            image_size=int(data.test_images.shape[-1]),
            conformal_scores=scores,
            meta={
                "accuracy": metrics.accuracy,
                "per_class_recall": metrics.per_class_recall,
                "data_fingerprint": fingerprint,
                "code_version": code_version(),
                "config": self.cfg.model_dump(mode="json"),
                "spec": self.spec.model_dump(mode="json"),
                "calibration": "labelled training images outside the fine-tuning subset",
            },
        )
        return metrics, str(ckpt)

    def run(self, *, pretrain_only: bool = False) -> dict[str, Any]:
        """Run everything (or only the pretraining); write and return the ``result.json`` content."""
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ds, split = self.load()
        ratios = self.spec.ratio_values
        rows: list[ResultRow] = []
        variant = variant_name(self.spec.method, self.cfg)
        if pretrain_only and not self.method_cls.pretrains:
            raise ConfigError(f"method {self.spec.method!r} has no pretraining stage")
        subsets_by_seed = {
            seed: labelled_subsets(ds.labels, split.train, ds.classes, ratios, seed=seed) for seed in self.spec.seeds
        }
        # phase 1, on every data-parallel rank: every pretraining the run needs (pretraining on the
        # labelled images depends on the ratio; on all training images it is done once per seed)
        if self.method_cls.pretrains:
            for seed, subsets in subsets_by_seed.items():
                for ratio in sorted(ratios):
                    indices = self._pretrain_indices(split, subsets[ratio], seed)
                    self.backbone_for(ds, indices, subsets[min(ratios)], seed)
        if self.rank != 0:
            return {}  # phase 2 (evaluation, results) runs on rank 0 only: each test image once
        for seed, subsets in subsets_by_seed.items():
            if pretrain_only:
                continue
            monitor_idx = subsets[min(ratios)]
            for ratio in ratios:
                info = None
                if self.method_cls.pretrains:
                    indices = self._pretrain_indices(split, subsets[ratio], seed)
                    backbone, info = self.backbone_for(ds, indices, monitor_idx, seed)
                else:
                    torch.manual_seed(seed)
                    backbone = prepare_model(Backbone(), self.device)
                held_out = ~torch.isin(torch.as_tensor(split.train), torch.as_tensor(subsets[ratio]))
                calib_idx = torch.as_tensor(split.train)[held_out][:MAX_CALIBRATION]
                calibration = (ds.images[calib_idx], ds.labels[calib_idx])
                data = EvalData(
                    ds.images[subsets[ratio]],
                    ds.labels[subsets[ratio]],
                    ds.images[split.test],
                    ds.labels[split.test],
                    ds.classes,
                )
                for mode in self.spec.evals:
                    t0 = time.perf_counter()
                    stage = self._stage(f"{mode} 1:{ratio}", seed)
                    metrics, ckpt = self._evaluate(
                        mode,
                        backbone,
                        data,
                        seed=seed,
                        ratio=f"1:{ratio}",
                        stage=stage,
                        pretrained=info is not None,
                        fingerprint=ds.fingerprint,
                        calibration=calibration,
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
                            labelled_sha256=indices_sha256(subsets[ratio]),
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
            "split": {
                "seed": self.spec.data.split_seed,
                "train_fraction": self.spec.data.train_fraction,
                **split_record(split),
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
