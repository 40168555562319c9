"""Hyper-parameter search settings, without Ray or torch: what a search may change and how.

The API validates ``tune`` jobs with this module alone; one trial's training is in
:mod:`inco_core.trial`, and the worker runs trials with Ray Tune (ASHA stops weak trials early,
Optuna proposes the next point; see ``worker/tuning.py``).

Search space (T1 and T2 as fractions of the pretraining epochs, so one point fits any preset):

======  ===========  ==============  ===============================================
param   sampled      range           run-spec field
======  ===========  ==============  ===============================================
t1      uniform      0 .. 0.45       ``pretrain.inco.t1`` = t1 x epochs
t2      uniform      0.5 .. 1        ``pretrain.inco.t2`` = t2 x epochs
a_f     log-uniform  0.05 .. 5       ``pretrain.inco.a_f``
views   integer      2 .. 8          ``pretrain.inco.views`` (K)
lr      log-uniform  0.005 .. 0.5    ``pretrain.optim.lr``
======  ===========  ==============  ===============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from inco_core.config import RunSpec, StrictModel
from inco_core.errors import ConfigError

Param = Literal["t1", "t2", "a_f", "views", "lr"]
PARAMS: tuple[str, ...] = ("t1", "t2", "a_f", "views", "lr")
INCO_ONLY = frozenset({"t1", "t2", "a_f", "views"})


@dataclass(frozen=True)
class ParamRange:
    kind: Literal["uniform", "loguniform", "int"]
    low: float
    high: float
    field: str
    help: str


SPACE: dict[str, ParamRange] = {
    "t1": ParamRange("uniform", 0.0, 0.45, "pretrain.inco.t1", "T1, the epoch where the DWV weight starts to rise"),
    "t2": ParamRange("uniform", 0.5, 1.0, "pretrain.inco.t2", "T2, the epoch where the DWV weight reaches a_f"),
    "a_f": ParamRange("loguniform", 0.05, 5.0, "pretrain.inco.a_f", "final DWV weight"),
    "views": ParamRange("int", 2, 8, "pretrain.inco.views", "K, augmented views per image"),
    "lr": ParamRange("loguniform", 0.005, 0.5, "pretrain.optim.lr", "pretraining learning rate"),
}


class TuneSettings(StrictModel):
    """How a ``tune`` job searches; the job's run spec gives method, data, ratio, preset and seed."""

    trials: int = Field(20, ge=1, le=500, description="points of the search space to try")
    max_concurrent: int | None = Field(
        None, ge=1, le=256, description="trials at once (default: as many as the cluster's CPUs or GPUs allow)"
    )
    params: list[Param] = Field(
        default_factory=lambda: list(PARAMS), min_length=1, description="what to search (t1, t2, a_f, views, lr)"
    )
    val_fraction: float = Field(
        0.5, ge=0.1, le=0.9, description="share of the labelled training images held out to score trials"
    )
    eval_every: int = Field(1, ge=1, le=10_000, description="score a trial every this many pretraining epochs")
    grace_epochs: int | None = Field(
        None, ge=1, le=10_000, description="ASHA: epochs a trial runs before it may be stopped (default: epochs/4)"
    )
    reduction_factor: int = Field(2, ge=2, le=8, description="ASHA: keep 1 / this of the trials at each rung")

    @field_validator("params")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"list has repeated entries: {v}")
        return v


def check_tune_spec(spec: RunSpec, settings: TuneSettings) -> None:
    """A tune job searches for one ratio and one seed, with a method that pretrains."""
    if len(spec.ratios) != 1:
        raise ConfigError(f"a tune job searches for one ratio (got {', '.join(spec.ratios)}): pick one, e.g. 1:16")
    if len(spec.seeds) != 1:
        raise ConfigError(f"a tune job uses one seed (got {spec.seeds}): pick one")
    if spec.method == "supervised":
        raise ConfigError(f"method {spec.method!r} has no pretraining to tune: use inco, simclr, mocov2 or simsiam")
    inco_params = sorted(INCO_ONLY & set(settings.params))
    if spec.method != "inco" and inco_params:
        raise ConfigError(
            f"{', '.join(inco_params)} are InCo's parameters; method {spec.method!r} can only tune lr "
            "(tune.params: ['lr'])"
        )
    cfg = spec.resolve()
    if settings.grace_epochs is not None and settings.grace_epochs > cfg.pretrain.epochs:
        raise ConfigError(
            f"tune.grace_epochs is {settings.grace_epochs} but the pretraining has {cfg.pretrain.epochs} epochs"
        )


def grace_epochs(settings: TuneSettings, epochs: int) -> int:
    return settings.grace_epochs or max(1, epochs // 4)


def overrides_for(point: dict[str, float], epochs: int) -> dict[str, Any]:
    """The run-spec overrides of one point of the search space (T1 and T2 turned into epochs)."""
    out: dict[str, Any] = {}
    for name, value in sorted(point.items()):
        rng = SPACE.get(name)
        if rng is None:
            raise ConfigError(f"unknown search parameter {name!r}: choose from {', '.join(PARAMS)}")
        if name in ("t1", "t2"):
            out[rng.field] = round(float(value) * epochs, 4)
        elif rng.kind == "int":
            out[rng.field] = int(value)
        else:
            out[rng.field] = float(value)
    return out


def trial_spec(spec: RunSpec, point: dict[str, float]) -> RunSpec:
    """The run spec of one trial: the tune job's spec with the point's overrides on top."""
    epochs = spec.resolve().pretrain.epochs
    overrides = {**spec.overrides, **overrides_for(point, epochs)}
    return RunSpec.model_validate({**spec.model_dump(mode="json"), "overrides": overrides})
