"""Registered models as files and as predictions, for the API.

* Exports (ONNX, TorchScript) are made on demand from the model's classifier file, checked against the
  PyTorch model, and cached beside it (``<file>.onnx``, ``<file>.torchscript``); a download of any
  format carries the model card (:func:`model_card`) inside it: ONNX metadata ``inco_model_card``,
  TorchScript extra file ``model_card.json``, the PyTorch file's ``card`` entry.
* Predictions run on onnxruntime (the CUDA provider when present), one loaded session per model kept
  in a small LRU cache; at most ``predict_slots`` requests run at once and one more is refused with
  429 (:class:`~server.errors.Busy`), so predict traffic cannot take over the API's threads.
* Uploaded images are decoded exactly as training decodes its files
  (:func:`inco_core.data.decode_bytes`); an archive is unpacked with the data set upload's rules.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inco_core.errors import CheckpointError, ConfigError, ImageDecodeError
from server.errors import Busy, Gone
from server.store.models import Artifact, Model

SESSIONS_KEPT = 8
DEFAULT_LEVEL = 0.9
CARD_KEY = "inco_model_card"


def model_card(model: Model, info: dict[str, Any]) -> dict[str, Any]:
    """What a plant needs to apply the model, as JSON: classes, preprocessing, metrics, how it was made."""
    meta = info.get("meta", {})
    return {
        "model": model.id,
        "job": model.job_id,
        "dataset": model.dataset,
        "method": model.method,
        "variant": model.variant,
        "ratio": model.ratio,
        "eval": model.eval,
        "seed": model.seed,
        "classes": model.classes,
        "image_size": model.image_size,
        "preprocessing": model.normalisation,
        "metrics": {"test_accuracy": model.accuracy, "per_class_recall": model.per_class_recall},
        "conformal": {
            "method": "split conformal prediction, score 1 - p(true class)",
            "calibration_images": model.calibration_images,
            "default_level": DEFAULT_LEVEL,
        },
        "spec": meta.get("spec"),
        "code_version": model.code_version,
        "created_at": model.created_at.isoformat(),
    }


@dataclass
class Loaded:
    """A model ready to predict: its onnxruntime session, classes and conformal scores."""

    session: Any
    classes: list[str]
    image_size: int
    scores: Any  # torch.Tensor of calibration nonconformity scores (may be empty)
    stamp: float


class ModelFiles:
    """Exports and loaded sessions of the registered models (one per API process)."""

    def __init__(self, slots: int) -> None:
        self._sessions: OrderedDict[int, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._export_locks: dict[tuple[str, str], threading.Lock] = {}
        self._slots = threading.BoundedSemaphore(slots)
        self.slots = slots

    # -- files ------------------------------------------------------------------------------------
    @staticmethod
    def classifier_path(model: Model, artifact: Artifact | None) -> Path:
        if artifact is None or not Path(artifact.path).is_file():
            raise Gone(
                f"model {model.id}'s file is no longer in the artifact store (deleted or moved); "
                f"run its job again (`inco submit ...`) or pick another model with `inco models`"
            )
        return Path(artifact.path)

    def load(self, model: Model, artifact: Artifact | None) -> tuple[Any, dict[str, Any]]:
        """The PyTorch model and its file's fields."""
        from inco_core.classifier import load_classifier

        path = self.classifier_path(model, artifact)
        try:
            return load_classifier(path)
        except CheckpointError as exc:
            raise Gone(f"model {model.id}'s file cannot be used: {exc}") from None

    def file(self, model: Model, artifact: Artifact | None, fmt: str) -> Path:
        """The model in ``fmt`` (onnx, torchscript, pytorch) with its card inside, made once and cached."""
        from inco_core.classifier import EXPORT_FORMATS

        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
        source = self.classifier_path(model, artifact)
        target = source.with_name(f"{source.name}.{fmt}")
        with self._lock:
            lock = self._export_locks.setdefault((str(source), fmt), threading.Lock())
        with lock:
            if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
                return target
            predictor, info = self.load(model, artifact)
            card = model_card(model, info)
            data = export(fmt, predictor, info, card)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return target

    # -- prediction -------------------------------------------------------------------------------
    def session(self, model: Model, artifact: Artifact | None) -> Loaded:
        source = self.classifier_path(model, artifact)
        stamp = source.stat().st_mtime
        with self._lock:
            hit = self._sessions.get(model.id)  # type: ignore[arg-type]
            if hit is not None and hit.stamp == stamp:
                self._sessions.move_to_end(model.id)  # type: ignore[arg-type]
                return hit
        onnx_file = self.file(model, artifact, "onnx")
        _, info = self.load(model, artifact)
        import onnxruntime as ort
        import torch

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1  # one request uses every core, as a bare session does
        session = ort.InferenceSession(str(onnx_file), sess_options=options, providers=providers)
        scores = info.get("conformal", {}).get("scores", torch.zeros(0))
        loaded = Loaded(session, list(info["classes"]), int(info["image_size"]), scores, stamp)
        with self._lock:
            self._sessions[model.id] = loaded  # type: ignore[index]
            self._sessions.move_to_end(model.id)  # type: ignore[arg-type]
            while len(self._sessions) > SESSIONS_KEPT:
                self._sessions.popitem(last=False)
        return loaded

    def predict(
        self,
        model: Model,
        artifact: Artifact | None,
        images: list[tuple[str, bytes]],
        *,
        level: float,
        top_k: int,
    ) -> dict[str, Any]:
        """Per image: the top class, every class's probability, the top k, the conformal prediction
        set at ``level`` and whether a person should look (the set holds more than one class)."""
        from inco_core.classifier import conformal_threshold, image_answers
        from inco_core.data import decode_bytes

        if not self._slots.acquire(timeout=0.05):
            raise Busy(f"all {self.slots} prediction slots are busy; retry in a second (Retry-After)")
        try:
            t0 = time.perf_counter()
            loaded = self.session(model, artifact)
            pixels = np.stack([decode_bytes(data, name, loaded.image_size) for name, data in images])
            batch = pixels[:, None].astype(np.float32)
            probs = np.concatenate(
                [loaded.session.run(None, {"image": batch[i : i + 256]})[0] for i in range(0, len(batch), 256)]
            )
            import torch

            threshold = conformal_threshold(loaded.scores, level)
            names = [name for name, _ in images]
            out = image_answers(names, torch.from_numpy(probs), loaded.classes, threshold, top_k)
            return {
                "model": model.id,
                "level": level,
                "calibration_images": len(loaded.scores),
                "images": out,
                "took_ms": (time.perf_counter() - t0) * 1000,
            }
        finally:
            self._slots.release()


def export(fmt: str, predictor: Any, info: dict[str, Any], card: dict[str, Any]) -> bytes:
    """The bytes of a download: the export (checked against the PyTorch model) with the card inside."""
    import torch

    from inco_core.classifier import check_export, export_onnx, export_torchscript

    size = int(info["image_size"])
    text = json.dumps(card, indent=2)
    if fmt == "pytorch":
        buf = io.BytesIO()
        blob = {**info, "state_dict": predictor.state_dict(), "card": text}
        torch.save(blob, buf)
        return buf.getvalue()
    probe = (torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(0)) * 255).round()
    if fmt == "onnx":
        import onnx

        model = onnx.load_from_string(export_onnx(predictor, size))
        entry = model.metadata_props.add()
        entry.key, entry.value = CARD_KEY, text
        data = model.SerializeToString()
    else:
        data = export_torchscript(predictor, size, extra_files={"model_card.json": text})
    check_export(fmt, data, predictor, probe)
    return data


def read_images(
    files: list[tuple[str, str | None, bytes]], *, max_images: int, max_bytes: int
) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images of a predict request: uploaded files, or the images of uploaded
    archives (zip, tar, tar.gz; unpacked with the data set upload's safety rules)."""
    from server.archives import archive_kind, extract, remove

    images: list[tuple[str, bytes]] = []
    for name, content_type, data in files:
        kind = archive_kind(content_type) or _archive_by_name(name)
        if kind is None:
            images.append((name, data))
            continue
        with tempfile.TemporaryDirectory(prefix="inco-predict-") as tmp:
            archive = Path(tmp) / "upload"
            archive.write_bytes(data)
            dest = Path(tmp) / "images"
            try:
                extract(archive, kind, dest, max_files=max_images, max_bytes=max_bytes * 4)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            for path in sorted(p for p in dest.rglob("*") if p.is_file()):
                images.append((f"{name}/{path.relative_to(dest).as_posix()}", path.read_bytes()))
            remove(dest)
        if len(images) > max_images:
            break
    if not images:
        raise ConfigError("no image in the request: send one or more files (multipart field `files`) or an archive")
    if len(images) > max_images:
        raise ConfigError(
            f"{len(images)}+ images is more than the {max_images} one request takes (INCO_MAX_PREDICT_IMAGES); "
            "send them in several requests"
        )
    return images


def _archive_by_name(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    return None


__all__ = ["DEFAULT_LEVEL", "ImageDecodeError", "ModelFiles", "model_card", "read_images"]
