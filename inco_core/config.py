"""The run spec: one definition of a job, shared by ``inco run``, the API, the worker and Ray.

A :class:`RunSpec` names *what* to run (method, data, ratios, evaluations, seeds, resources) and a
preset plus overrides for *how*. :meth:`RunSpec.resolve` turns preset + overrides into the full
:class:`TrainingConfig`, which is what checkpoints and results record.

Presets (see ``docs/protocol.md`` of the project):

========  =====  ===============  ================  ==========================================
preset    input  pretrain epochs  fine-tune epochs  use
========  =====  ===============  ================  ==========================================
paper     200    200              200               the real experiment, on GPUs
cpu       64     30               50                a reduced run on 2 CPU cores
smoke     32     1                2                 tests: 256 pretraining images, seconds
========  =====  ===============  ================  ==========================================
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from inco_core.errors import ConfigError

MethodName = Literal["inco", "simclr", "mocov2", "simsiam", "supervised"]
METHODS: tuple[str, ...] = ("inco", "simclr", "mocov2", "simsiam", "supervised")
EvalMode = Literal["finetune", "linear"]
PresetName = Literal["paper", "cpu", "smoke"]
PRESETS: tuple[str, ...] = ("paper", "cpu", "smoke")
MAX_RATIO = 256
MAX_EPOCHS = 10_000
MAX_OVERRIDES = 64  # keys of ``overrides``
MAX_OVERRIDE_DEPTH = 8  # nesting of ``overrides`` (a TrainingConfig path is at most 4 deep)
MAX_KEY_LENGTH = 200
MAX_ERRORS_SHOWN = 10

_RATIO_RE = re.compile(r"^\s*1\s*:\s*(\d+)\s*$")


def parse_ratio(text: str) -> int:
    """Return N for a label ratio written ``1:N``.

    Raises:
        ConfigError: the text is not ``1:N`` with 1 <= N <= 256.
    """
    match = _RATIO_RE.match(str(text)) if len(str(text)) <= 32 else None
    if match is None:
        raise ConfigError(f"ratio must look like 1:16 (got {str(text)[:40]!r})")
    n = int(match.group(1))
    if not 1 <= n <= MAX_RATIO:
        raise ConfigError(f"ratio 1:N needs N between 1 and {MAX_RATIO} (got {str(text)!r})")
    return n


def _normalise_ratio(text: str) -> str:
    try:
        return f"1:{parse_ratio(text)}"
    except ConfigError as exc:  # pydantic turns ValueError into a field error
        raise ValueError(str(exc)) from None


Ratio = Annotated[str, AfterValidator(_normalise_ratio)]


class StrictModel(BaseModel):
    """Unknown fields are errors, so a typo in an override never passes silently; NaN and
    infinity are refused in every float field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule of one training stage."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=1000)

    @classmethod
    def paper_literal(cls) -> OptimConfig:
        """The paper's stated setting: Adam, learning rate 0.3, no schedule."""
        return cls(name="adam", lr=0.3, momentum=0.9, weight_decay=0.0, schedule="constant")


OPTIMISERS = ("default", "paper-literal")


class AugmentConfig(StrictModel):
    """The paper's augmentations, identical for every method."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = Field(0.4, ge=0, le=1)
    contrast: float = Field(0.4, ge=0, le=1)
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        lo, hi = v
        top = 1.0 if info.field_name == "crop_scale" else 10.0
        if not 0 < lo <= hi <= top:
            raise ValueError(f"needs 0 < low <= high <= {top:g} (got {lo}, {hi})")
        return v


class InCoConfig(StrictModel):
    """BID + DWV (InCo, Electronics Letters 2021, eqs. 1-3)."""

    views: int = Field(5, ge=2, le=64, description="K, augmented views per image")
    temperature: float = Field(1.0, gt=0, le=100, description="T of the BID softmax")
    t1: float | None = Field(None, ge=0, le=MAX_EPOCHS, description="epoch where weight(t) starts to rise")
    t2: float | None = Field(None, gt=0, le=MAX_EPOCHS, description="epoch where weight(t) reaches a_f")
    a_f: float = Field(1.0, ge=0, le=1000, description="final DWV weight; 0 = InCo without DWV")
    dwv_reduction: Literal["mean", "sum"] = Field(
        "mean", description="square of eq. 2 averaged (default) or summed over embedding dims"
    )

    @model_validator(mode="after")
    def _t1_before_t2(self) -> InCoConfig:
        if self.t1 is not None and self.t2 is not None and self.t2 <= self.t1:
            raise ValueError(f"t2 must be greater than t1 (got t1={self.t1}, t2={self.t2})")
        return self

    def ramp(self, epochs: int) -> tuple[float, float]:
        """(T1, T2) in epochs: explicit, or 0.15 and 0.75 of the run (30 and 150 of 200)."""
        t1 = self.t1 if self.t1 is not None else 0.15 * epochs
        t2 = self.t2 if self.t2 is not None else 0.75 * epochs
        if t2 <= t1:
            raise ConfigError(f"inco.t2 must be greater than inco.t1 (got {t1} and {t2})")
        return t1, t2


class SimCLRConfig(StrictModel):
    temperature: float = Field(0.5, gt=0, le=100)
    hidden_dim: int = Field(512, ge=8, le=8192)
    out_dim: int = Field(128, ge=8, le=8192)


class MoCoConfig(StrictModel):
    temperature: float = Field(0.2, gt=0, le=100)
    momentum: float = Field(0.99, ge=0, lt=1)
    queue_size: int = Field(512, ge=8, le=65536, description="below the 1,080 training images")
    hidden_dim: int = Field(512, ge=8, le=8192)
    out_dim: int = Field(128, ge=8, le=8192)


class SimSiamConfig(StrictModel):
    proj_dim: int = Field(512, ge=8, le=8192)
    pred_hidden_dim: int = Field(128, ge=8, le=8192)


class PretrainConfig(StrictModel):
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=2, le=8192, description="global batch (n of BID)")
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    images: Literal["train", "labelled"] = Field(
        "train", description="pretrain on all training images, or on the labelled subset only"
    )
    max_images: int | None = Field(
        None, ge=2, le=10_000_000, description="pretrain on a seeded sample of this many images (smoke runs)"
    )
    knn_every: int = Field(1, ge=0, le=10_000, description="kNN monitor period; 0 turns it off")
    knn_k: int = Field(20, ge=1, le=1000)
    inco: InCoConfig = InCoConfig()
    simclr: SimCLRConfig = SimCLRConfig()
    mocov2: MoCoConfig = MoCoConfig()
    simsiam: SimSiamConfig = SimSiamConfig()


class _EvalBase(StrictModel):
    """What every evaluation on the labelled subset trains with."""

    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=2, le=8192)
    optim: OptimConfig = OptimConfig(lr=0.03, weight_decay=5e-4)


class FinetuneConfig(_EvalBase):
    """Fine-tuning: the whole network (backbone + new linear head) trained on the labelled subset."""

    backbone_lr_scale: float = Field(0.1, ge=0, le=10, description="backbone lr = head lr x this")
    augment: AugmentConfig | None = Field(
        AugmentConfig(crop_scale=(0.5, 1.0)),
        description="fine-tune on augmented views of the labelled images; null for none",
    )


# fine-tuning's fields that linear evaluation refuses, and why
FINETUNE_ONLY = {
    "augment": "no image is augmented",
    "backbone_lr_scale": "the backbone has no learning rate",
}


class LinearConfig(_EvalBase):
    """Linear evaluation: a linear classifier trained on the frozen backbone's features, computed
    once. Fine-tuning's ``augment`` and ``backbone_lr_scale`` do not apply and are refused, so an
    override of them never passes silently."""

    @model_validator(mode="before")
    @classmethod
    def _no_finetune_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in FINETUNE_ONLY.items():
                if name in data:
                    raise ValueError(
                        f"linear.{name} does not apply: linear evaluation trains only a linear classifier, on "
                        f"features of the frozen backbone computed once, so {why}; set finetune.{name} for "
                        "fine-tuning"
                    )
        return data


class TrainingConfig(StrictModel):
    """Everything a preset fixes; any field can be overridden per job."""

    image_size: int = Field(ge=16, le=1024)
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    linear: LinearConfig


def preset_config(name: str) -> TrainingConfig:
    """The defaults of preset ``name`` (``paper``, ``cpu`` or ``smoke``)."""
    if name == "paper":
        return TrainingConfig(
            image_size=200,
            pretrain=PretrainConfig(epochs=200),
            finetune=FinetuneConfig(epochs=200),
            linear=LinearConfig(epochs=200),
        )
    if name == "cpu":
        return TrainingConfig(
            image_size=64,
            pretrain=PretrainConfig(epochs=30),
            finetune=FinetuneConfig(epochs=50),
            linear=LinearConfig(epochs=100),
        )
    if name == "smoke":
        return TrainingConfig(
            image_size=32,
            pretrain=PretrainConfig(epochs=1, max_images=256, knn_every=1),
            finetune=FinetuneConfig(epochs=2),
            linear=LinearConfig(epochs=2),
        )
    raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")


def _expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """{'pretrain.epochs': 3} -> {'pretrain': {'epochs': 3}}; nested dicts pass through."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {part!r}")
            node = child
        if isinstance(value, dict):
            value = _expand_dotted(value)
            existing = node.get(parts[-1])
            if isinstance(existing, dict):
                value = _deep_merge(existing, value)
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """``loc: message; ...`` for the first :data:`MAX_ERRORS_SHOWN` errors, then how many more."""
    parts = []
    errors = exc.errors()
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against the run spec's fields"
        parts.append(f"{prefix}{loc}: {msg}" if loc else msg)
    if len(errors) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more errors")
    return "; ".join(parts)


class DataSpec(StrictModel):
    """Where the images are and how the train/test split is drawn."""

    path: str | None = Field(
        None, min_length=1, description="folder of class sub-folders, or NEU-style files (local runs)"
    )
    dataset: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="name of a data set registered with the service; the service fills in its path",
    )
    split_seed: int = Field(0, ge=0, le=2**31 - 1)
    train_fraction: float = Field(0.6, gt=0, lt=1)
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail",
        description="an image that cannot be decoded fails the job, naming the file ('fail'), "
        "or is left out with a warning that lists it ('skip')",
    )


class Resources(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=256)
    gpus_per_worker: float = Field(0, ge=0, le=16)

    @property
    def gpus_each(self) -> float:
        """GPUs each worker holds: ``gpus_per_worker``, or one when the device is ``cuda``."""
        return self.gpus_per_worker or (1 if self.device == "cuda" else 0)

    @property
    def gpus(self) -> float:
        """GPUs the whole job holds."""
        return self.workers * self.gpus_each


class RunSpec(StrictModel):
    """One job: a method, pretrained once per seed, evaluated at each ratio and evaluation."""

    method: MethodName = "inco"
    data: DataSpec = DataSpec()
    ratios: list[Ratio] = Field(default_factory=lambda: ["1:16"], min_length=1, max_length=16)
    evals: list[EvalMode] = Field(default_factory=lambda: ["finetune"], min_length=1, max_length=2)
    preset: PresetName = "cpu"
    optimizer: Literal["default", "paper-literal"] = Field(
        "default", description="pretraining optimiser: ours, or the paper's Adam at lr 0.3"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_OVERRIDES,
        description="fields of the preset to change, nested or dotted",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=32)
    resources: Resources = Resources()

    @field_validator("ratios", "evals", "seeds")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"list has repeated entries: {v}")
        return v

    @field_validator("overrides")
    @classmethod
    def _small_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        # bounded before anything recurses into it: a deep dict would exhaust the stack
        stack: list[tuple[dict[str, Any], int]] = [(v, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_OVERRIDE_DEPTH:
                raise ValueError(
                    f"nested more than {MAX_OVERRIDE_DEPTH} levels deep; name fields like 'pretrain.epochs'"
                )
            if len(node) > MAX_OVERRIDES:
                raise ValueError(f"a level has {len(node)} keys, more than {MAX_OVERRIDES}; change fewer fields")
            for key, value in node.items():
                if len(str(key)) > MAX_KEY_LENGTH:
                    raise ValueError(f"key {str(key)[:40]!r}... is longer than {MAX_KEY_LENGTH} characters")
                if isinstance(value, dict):
                    stack.append((value, depth + 1))
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 0 <= s < 2**31:
                raise ValueError(f"seeds must be between 0 and 2**31-1 (got {s})")
        return v

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if self.method == "supervised" and "linear" in self.evals:
            raise ValueError(
                "supervised trains from scratch on the labelled images and has no pretrained "
                "backbone to evaluate linearly; use evals ['finetune']"
            )
        try:
            self.resolve()  # overrides must produce a valid config
        except ConfigError as exc:  # a field error of the spec, so a caller's model names where it is
            raise ValueError(str(exc)) from None
        finetune = _expand_dotted(self.overrides).get("finetune")
        if self.method == "supervised" and isinstance(finetune, dict) and "backbone_lr_scale" in finetune:
            raise ValueError(
                "finetune.backbone_lr_scale does not apply to supervised: it trains from scratch, with no "
                "pretrained backbone to slow down, so the backbone learns at the head's rate; drop the override"
            )
        return self

    def resolve(self) -> TrainingConfig:
        """Preset defaults, then the optimiser choice, then the overrides, validated."""
        base = preset_config(self.preset).model_dump()
        if self.optimizer == "paper-literal":
            base["pretrain"]["optim"] = OptimConfig.paper_literal().model_dump()
        merged = _deep_merge(base, _expand_dotted(self.overrides))
        try:
            return TrainingConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, prefix="overrides.")) from None

    @property
    def ratio_values(self) -> list[int]:
        return [parse_ratio(r) for r in self.ratios]


def load_spec(data: dict[str, Any]) -> RunSpec:
    """Validate a run spec from plain data, turning pydantic's error into a :class:`ConfigError`."""
    try:
        return RunSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def config_hash(payload: Any) -> str:
    """A stable short hash of JSON-able data (used to key pretrained backbones)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
