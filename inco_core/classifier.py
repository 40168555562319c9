"""A trained classifier as a plant applies it: one module from decoded pixels to class probabilities,
its file, its ONNX and TorchScript exports, and split-conformal calibration.

:class:`Predictor` takes what :func:`~inco_core.data.decode_image` gives for a file (one channel,
``image_size`` x ``image_size``, values 0-255) as float32 ``[B, 1, S, S]`` and returns softmax
probabilities ``[B, K]``: the pixel normalisation of training, the backbone, for linear evaluation the
standardisation of its features, and the linear head, all inside the module, so that an export needs
nothing but the decoded image.

A classifier file is a ``torch.save`` dict loadable with ``weights_only=True``:

    format          "inco-classifier"
    version         CLASSIFIER_VERSION
    eval            "finetune" | "linear"
    method, seed, ratio
    classes         class names in label order
    image_size      S
    state_dict      the Predictor's weights
    conformal       {"scores": calibration nonconformity scores, "images": n} or absent
    meta            free JSON data (accuracy, config, data fingerprint, code version)
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inco_core.augment import PIXEL_MEAN, PIXEL_STD
from inco_core.errors import CheckpointError, InCoError
from inco_core.models import Backbone

CLASSIFIER_FORMAT = "inco-classifier"
CLASSIFIER_VERSION = 1
EXPORT_FORMATS = ("onnx", "torchscript", "pytorch")
ONNX_OPSET = 18


class ExportError(InCoError):
    """An export could not be made, or does not compute what the PyTorch model computes."""


class Predictor(nn.Module):
    """Decoded pixels [B, 1, S, S] (float, 0-255) -> class probabilities [B, K]."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Linear,
        *,
        feature_mean: Tensor | None = None,
        feature_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        dim = head.in_features
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN * 255.0))
        self.register_buffer("pixel_scale", torch.tensor(1.0 / (PIXEL_STD * 255.0)))
        mean = torch.zeros(dim) if feature_mean is None else feature_mean.detach().float().cpu()
        std = torch.ones(dim) if feature_std is None else feature_std.detach().float().cpu()
        self.register_buffer("feature_mean", mean.clone())
        self.register_buffer("feature_scale", 1.0 / std.clone())

    def logits(self, x: Tensor) -> Tensor:
        z = self.backbone((x - self.pixel_mean) * self.pixel_scale)
        return self.head((z - self.feature_mean) * self.feature_scale)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.logits(x), dim=1)


def build_predictor(num_classes: int, state_dict: dict[str, Tensor] | None = None) -> Predictor:
    model = Predictor(Backbone(), nn.Linear(Backbone.embed_dim, num_classes))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def save_classifier(
    path: Path,
    model: Predictor,
    *,
    eval_mode: str,
    method: str,
    seed: int,
    ratio: str,
    classes: list[str],
    image_size: int,
    conformal_scores: Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "eval": eval_mode,
        "method": method,
        "seed": int(seed),
        "ratio": ratio,
        "classes": list(classes),
        "image_size": int(image_size),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    if conformal_scores is not None:
        blob["conformal"] = {"scores": conformal_scores.detach().float().cpu(), "images": len(conformal_scores)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(path: Path) -> tuple[Predictor, dict[str, Any]]:
    """The model (eval mode, CPU) and the file's other fields. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"classifier file {path} cannot be read ({exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not an InCo classifier file (format {CLASSIFIER_FORMAT!r})")
    if blob.get("version") != CLASSIFIER_VERSION:
        raise CheckpointError(
            f"{path} is a classifier file of version {blob.get('version')}; this InCo reads {CLASSIFIER_VERSION}"
        )
    try:
        model = build_predictor(len(blob["classes"]), blob["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} holds weights that do not fit a ResNet18 classifier ({exc})") from None
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, info


# -- inference ------------------------------------------------------------------------------------
def as_batch(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [S, S], [B, S, S] or [B, 1, S, S] -> float32 [B, 1, S, S] (the Predictor's input)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 3:
        x = x[:, None]
    return x.float()


@torch.no_grad()
def probabilities(model: Predictor, images: np.ndarray | Tensor, batch_size: int = 256) -> Tensor:
    """Class probabilities [B, K] of decoded images (uint8), in fp32 on the CPU."""
    model.eval()
    x = as_batch(images)
    if not len(x):
        return torch.zeros(0, model.head.out_features)
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


# -- split conformal prediction -------------------------------------------------------------------
def conformal_scores(probs: Tensor, labels: Tensor) -> Tensor:
    """Nonconformity of labelled calibration images: 1 - the probability given to the true class."""
    return 1.0 - probs[torch.arange(len(labels)), labels]


def conformal_threshold(scores: Tensor, level: float) -> float:
    """The split-conformal quantile: sets {k : 1 - p_k <= q} cover a new image's true class with
    probability >= ``level`` (exchangeability). With too few calibration images for the level
    (ceil((n + 1) level) > n) the threshold is 1: every class is in the set."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (got {level})")
    n = len(scores)
    rank = math.ceil((n + 1) * level)
    if n == 0 or rank > n:
        return 1.0
    return float(torch.sort(scores.float()).values[rank - 1])


def prediction_sets(probs: Tensor, threshold: float) -> list[list[int]]:
    """Per image, the classes whose nonconformity is within the threshold, most probable first; never
    empty (the top class is always in it)."""
    out = []
    for row in probs:
        order = torch.argsort(row, descending=True).tolist()
        keep = [k for k in order if 1.0 - float(row[k]) <= threshold + 1e-12]
        out.append(keep or order[:1])
    return out


def image_answers(
    names: list[str], probs: Tensor, classes: list[str], threshold: float, top_k: int
) -> list[dict[str, Any]]:
    """What predict says of each image: the top class, every class's probability, the ``top_k``
    most probable, the conformal prediction set at ``threshold`` and ``needs_review`` (the set holds
    several classes). The API and ``inco predict --model`` both answer with this."""
    out = []
    for name, p, members in zip(names, probs, prediction_sets(probs, threshold), strict=True):
        order = torch.argsort(p, descending=True, stable=True).tolist()
        out.append(
            {
                "file": name,
                "predicted": classes[order[0]],
                "probabilities": {c: float(p[k]) for k, c in enumerate(classes)},
                "top_k": [{"class": classes[k], "probability": float(p[k])} for k in order[:top_k]],
                "prediction_set": [classes[k] for k in members],
                "needs_review": len(members) > 1,
            }
        )
    return out


# -- export ---------------------------------------------------------------------------------------
def export_onnx(model: Predictor, image_size: int) -> bytes:
    """ONNX (torch.export-based exporter, opset 18): input ``image`` float32 [batch, 1, S, S] with a
    dynamic batch axis, output ``probabilities`` [batch, K]."""
    model = model.eval()
    example = torch.rand(2, 1, image_size, image_size) * 255
    batch = torch.export.Dim("batch", min=1, max=65536)
    buf = io.BytesIO()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_shapes={"x": {0: batch}},
            opset_version=ONNX_OPSET,
            verbose=False,
        )
        program.save(buf)
    except Exception as exc:  # the exporter raises many kinds
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
    return buf.getvalue()


def export_torchscript(model: Predictor, image_size: int, extra_files: dict[str, str] | None = None) -> bytes:
    """TorchScript (traced): ``torch.jit.load(f)(x)`` with x float32 [B, 1, S, S] gives probabilities;
    ``extra_files`` travel inside the archive (``torch.jit.load(f, _extra_files=...)`` reads them)."""
    model = model.eval()
    example = torch.rand(2, 1, image_size, image_size) * 255
    with torch.no_grad(), warnings.catch_warnings():
        # torch deprecates TorchScript for torch.export, but C++ and older runtimes in plants still load it
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files=extra_files or {})
    return buf.getvalue()


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def check_export(fmt: str, data: bytes, model: Predictor, images: np.ndarray | Tensor, tol: float = 1e-4) -> dict:
    """Run an export on decoded images and compare with the PyTorch model: the largest absolute
    probability difference and the share of images with the same top class. Raises ExportError when
    the difference reaches ``tol`` or a top class differs."""
    x = as_batch(images)
    want = probabilities(model, x)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = torch.cat([torch.from_numpy(session.run(None, {"image": c.numpy()})[0]) for c in x.split(256)])
    elif fmt == "torchscript":
        module = load_torchscript(data)
        with torch.no_grad():
            got = torch.cat([module(c) for c in x.split(256)])
    else:
        raise ExportError(f"no check for format {fmt!r}")
    diff = float((got - want).abs().max()) if len(x) else 0.0
    agree = float((got.argmax(1) == want.argmax(1)).float().mean()) if len(x) else 1.0
    if not diff < tol or agree < 1.0:
        raise ExportError(
            f"the {fmt} export differs from the PyTorch model: max |p diff| {diff:.2e}, top class agrees on {agree:.1%}"
        )
    return {"format": fmt, "images": len(x), "max_abs_diff": diff, "argmax_agreement": agree}
