"""Supervised baseline: ResNet18 trained from scratch on the labelled subset only.

It has no pretraining stage; the experiment fine-tunes a randomly initialised backbone, with every
layer at the head's learning rate (the paper's "other CNN methods", Figure 4).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from inco_core.errors import ConfigError
from inco_core.methods.base import PretrainMethod, StepContext, StepOutput


class Supervised(PretrainMethod):
    name: ClassVar[str] = "supervised"
    pretrains: ClassVar[bool] = False

    @property
    def num_views(self) -> int:
        return 1

    def step(self, views: Tensor, ctx: StepContext) -> StepOutput:
        raise ConfigError("supervised has no pretraining stage; it is trained by fine-tuning only")
