"""The one interface every method implements, so the training loop never asks which method runs.

A method is an ``nn.Module`` that owns the backbone and its own heads. The loop hands it the
augmented views of a batch and a :class:`StepContext`; it returns the loss to minimise and scalar
logs. Methods register themselves by name in :mod:`inco_core.methods`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from inco_core.config import PretrainConfig
from inco_core.models import Backbone


@dataclass(frozen=True)
class StepContext:
    """What a method may know about the current step.

    epoch:  fractional epoch t (epoch index + step / steps per epoch), for schedules like DWV's.
    labels: [B_local] int64, the BID instance labels of this rank's images: their global positions
            in the (fixed) global batch.
    batch_size: n, the global batch size the run was configured with.
    images: [B_local] int64, which images of the pretraining set these are (stable across epochs),
            or None when unknown; MoCo v2 keeps an image's own older keys out of its negatives.
    """

    epoch: float
    labels: Tensor
    batch_size: int
    images: Tensor | None = None


@dataclass
class StepOutput:
    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class PretrainMethod(nn.Module, ABC):
    """Backbone + heads + loss of one self-supervised method.

    Class attributes a subclass sets:
        name: registry name (``inco``, ``simclr``, ...).
        pretrains: False for methods without a pretraining stage (supervised from scratch).
        fixed_partition: True when the batch partition must stay fixed across epochs (BID).
    """

    name: ClassVar[str]
    pretrains: ClassVar[bool] = True
    fixed_partition: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, cfg: PretrainConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    @property
    @abstractmethod
    def num_views(self) -> int:
        """Augmented views per image that :meth:`step` expects."""

    @abstractmethod
    def step(self, views: Tensor, ctx: StepContext) -> StepOutput:
        """One training step's loss.

        views: [V * B, C, H, W] float, view v of image i at row v * B + i (V = num_views).
        """

    def after_optimizer_step(self) -> None:
        """Hook after ``optimizer.step()`` (MoCo's momentum update). Default: nothing."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
