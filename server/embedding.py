"""The 2-D map of a job's embedding, for the API's ``/v1/jobs/{id}/plots/embedding.{fmt}``.

A backbone of the job is applied to the job's test images (the split it trained and tested with:
:func:`inco_core.experiment.load_split` of its run spec, decoded images cached under the settings'
home as the worker caches them), and t-SNE (scikit-learn, ``init="pca"``, a fixed ``random_state``,
after a PCA to 50 dimensions) brings the 512-dimensional embeddings to 2-D.

Which backbone (:func:`find_source`), for the seed asked for:

1. the pretrained backbone the job made or used (its ``outputs.backbones``; the ``backbone``
   artifacts of the job; for a fine-tune job, those of its pretrain job);
2. otherwise (a supervised job, or a job whose backbone file is gone) the backbone inside one of its
   classifier files: the fine-tuned one with the most labels.

The 2-D points are cached as JSON under ``$INCO_HOME/cache/embeddings``, keyed by the file (path, size,
modification time) and the split (data folder, image size, train fraction, split seed): the second
request for a map reads it. At most :data:`SLOTS` maps are computed at once; a request beyond that is
refused with 429 (:class:`MapBusy`), as the predictor refuses predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session

from inco_core.config import RunSpec
from inco_core.errors import CheckpointError, DataError
from server.errors import Busy, Gone, NotFound
from server.store import access
from server.store.models import Artifact, Job

SLOTS = 1
"""Maps computed at once in one API process (each uses every core for a few seconds)."""
CACHE_VERSION = 1
TSNE_SEED = 0
MIN_IMAGES = 5


class MapBusy(Busy):
    """Every embedding slot is computing a map; retry in a few seconds."""

    retry_after_s = 5


@dataclass(frozen=True)
class Source:
    """The file whose backbone embeds the images, and what to call it in a title."""

    path: Path
    kind: str  # "backbone" (a pretrain checkpoint) or "classifier" (a classifier file)
    description: str


def job_seeds(job: Job) -> list[int]:
    return [int(s) for s in job.spec.get("seeds", [0])]


def _existing(art: Artifact | None) -> Path | None:
    return Path(art.path) if art is not None and Path(art.path).is_file() else None


def _backbone_of(session: Session, job: Job, seed: int) -> Source | None:
    """The pretrained backbone of ``seed`` that ``job`` made or used, when its file exists."""
    for made in job.outputs.get("backbones", []):
        if int(made.get("seed", -1)) != seed:
            continue
        path = _existing(access.find_artifact(session, team_id=job.team_id, kind="backbone", key=made["key"]))
        if path is not None:
            return Source(path, "backbone", f"pretrained backbone {made['key'][:8]}")
    for art in access.list_artifacts(session, team_id=job.team_id, job_id=job.id):
        if art.kind == "backbone" and art.seed == seed and _existing(art) is not None:
            return Source(Path(art.path), "backbone", f"pretrained backbone {art.key[:8]}")
    return None


def _ratio_n(ratio: str) -> int:
    try:
        return int(ratio.split(":")[1])
    except (IndexError, ValueError):
        return 1 << 30


def find_source(session: Session, job: Job, seed: int) -> Source:
    """The backbone that maps ``job``'s seed ``seed`` (see the module's docstring). Raises NotFound
    when the job has none yet, Gone when it had one whose file was deleted."""
    if seed not in job_seeds(job):
        raise NotFound(
            f"job {job.id} has no seed {seed}: its seeds are {', '.join(map(str, job_seeds(job)))} (?seed=N picks one)"
        )
    found = _backbone_of(session, job, seed)
    if found is None and job.pretrained_job:
        parent = session.get(Job, job.pretrained_job)
        if parent is not None and parent.team_id == job.team_id:
            found = _backbone_of(session, parent, seed)
    if found is not None:
        return found
    classifiers = [
        a
        for a in access.list_artifacts(session, team_id=job.team_id, job_id=job.id)
        if a.kind == "classifier" and a.seed == seed
    ]
    classifiers.sort(key=lambda a: (a.meta.get("eval") != "finetune", _ratio_n(str(a.meta.get("ratio", "")))))
    for art in classifiers:
        if _existing(art) is not None:
            what = f"{art.meta.get('ratio', '?')}, {art.meta.get('eval', '?')}"
            return Source(Path(art.path), "classifier", f"backbone of the classifier trained at {what}")
    if classifiers:
        raise Gone(
            f"the files of job {job.id}'s models for seed {seed} are no longer in the artifact store; "
            "run the job again for a map"
        )
    raise NotFound(
        f"job {job.id} ({job.status}) has no backbone for seed {seed} yet: the map appears once its "
        "pretraining (or, for a supervised job, its fine-tuning) has ended"
    )


def _cache_key(source: Source, spec: RunSpec, data_path: str, image_size: int) -> str:
    stat = source.path.stat()
    identity = {
        "version": CACHE_VERSION,
        "file": str(source.path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "data": data_path,
        "image_size": image_size,
        "train_fraction": spec.data.train_fraction,
        "split_seed": spec.data.split_seed,
        "on_corrupt": spec.data.on_corrupt,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _load_backbone(source: Source) -> Any:
    """The backbone (eval mode, CPU) of a pretrain checkpoint or a classifier file."""
    from inco_core.checkpoint import load_checkpoint
    from inco_core.classifier import load_classifier
    from inco_core.models import Backbone

    if source.kind == "classifier":
        predictor, _ = load_classifier(source.path)
        backbone = predictor.backbone
    else:
        blob = load_checkpoint(source.path)
        if blob.get("kind") != "pretrain":
            raise CheckpointError(f"{source.path} holds a {blob.get('kind')} checkpoint, not a pretrained backbone")
        backbone = Backbone()
        backbone.load_state_dict(blob["state_dict"])
    return backbone.eval()


def tsne_2d(features: Any) -> Any:
    """[N, D] float features -> [N, 2] t-SNE coordinates (PCA to 50 dimensions first, ``init="pca"``,
    fixed ``random_state``: the same features give the same map). Raises DataError below
    :data:`MIN_IMAGES` images."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n < MIN_IMAGES:
        raise DataError(f"a map needs at least {MIN_IMAGES} test images; the job's split has {n}")
    dims = min(50, n, x.shape[1])
    if x.shape[1] > dims:
        x = PCA(dims, random_state=TSNE_SEED).fit_transform(x)
    perplexity = min(30.0, (n - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=TSNE_SEED).fit_transform(x)


class EmbeddingMaps:
    """Computed and cached maps of one API process."""

    def __init__(self, cache_dir: Path, slots: int = SLOTS) -> None:
        self.cache_dir = Path(cache_dir)
        self.folder = self.cache_dir / "embeddings"
        self._slots = threading.BoundedSemaphore(slots)
        self.slots = slots

    def map(self, source: Source, spec: RunSpec, data_path: str) -> dict[str, Any]:
        """``points`` [[x, y], ...], ``labels`` (class index per test image), ``classes``, ``images``
        and ``cached`` (read from the cache) of the job's test images under ``source``'s backbone."""
        image_size = spec.resolve().image_size
        path = self.folder / f"{_cache_key(source, spec, data_path, image_size)}.json"
        if path.is_file():
            return {**json.loads(path.read_text()), "cached": True}
        if not self._slots.acquire(timeout=0.05):
            raise MapBusy(
                f"{self.slots} embedding map(s) are being computed; retry in {MapBusy.retry_after_s} s (Retry-After)"
            )
        try:
            if path.is_file():  # made by the request that held the slot
                return {**json.loads(path.read_text()), "cached": True}
            out = self._compute(source, spec, data_path)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps(out))
            os.replace(tmp, path)
            return {**out, "cached": False}
        finally:
            self._slots.release()

    def _compute(self, source: Source, spec: RunSpec, data_path: str) -> dict[str, Any]:
        import torch

        from inco_core.evaluate import features
        from inco_core.experiment import load_split

        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": data_path})})
        try:
            ds, split = load_split(spec, spec.resolve(), self.cache_dir)
        except DataError as exc:
            raise Gone(f"the job's images cannot be read any more: {exc}") from None
        backbone = _load_backbone(source)
        feats = features(backbone, ds.images[split.test], torch.device("cpu")).numpy()
        points = tsne_2d(feats)
        return {
            "points": [[round(float(x), 5), round(float(y), 5)] for x, y in points],
            "labels": ds.labels[split.test].tolist(),
            "classes": list(ds.classes),
            "images": len(split.test),
        }


def data_path(session: Session, job: Job, spec: RunSpec) -> str:
    """The folder of the job's images: its spec's, else its data set's."""
    if spec.data.path:
        return spec.data.path
    name = spec.data.dataset or "default"
    try:
        return access.get_dataset(session, team_id=job.team_id, name=name).path
    except NotFound:
        raise Gone(f"job {job.id}'s data set {name!r} is no longer registered; register it again for a map") from None
