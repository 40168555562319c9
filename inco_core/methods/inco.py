"""InCo: BID (repel) + DWV (attract) on K views of every image (Electronics Letters 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from inco_core.config import PretrainConfig
from inco_core.losses.bid import bid_loss
from inco_core.losses.dwv import dwv_loss, dwv_weight
from inco_core.methods.base import PretrainMethod, StepContext, StepOutput
from inco_core.models import Backbone


class InCo(PretrainMethod):
    """FC (512 -> n) classifies each view by its image's position in the fixed global batch; DWV
    pulls the K views of an image together with a weight that ramps from T1 to T2."""

    name: ClassVar[str] = "inco"
    fixed_partition: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, cfg: PretrainConfig) -> None:
        super().__init__(backbone, cfg)
        self.params = cfg.inco
        self.fc = nn.Linear(backbone.embed_dim, cfg.batch_size)
        self.t1, self.t2 = cfg.inco.ramp(cfg.epochs)

    @property
    def num_views(self) -> int:
        return self.params.views

    def weight(self, epoch: float) -> float:
        return dwv_weight(epoch, self.params.a_f, self.t1, self.t2)

    def step(self, views: Tensor, ctx: StepContext) -> StepOutput:
        k = self.num_views
        z = self.backbone(views)  # [K * B, 512], bf16 under CUDA autocast
        labels = ctx.labels.repeat(k)  # view v of image j -> label of image j
        # both losses in float32 from the embedding on: the BID logits too (autocast would run FC in
        # bf16), and DWV, whose view deviations near collapse are below bf16's resolution
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            l_ce = bid_loss(self.fc(z), labels, self.params.temperature)
            l_dwv = dwv_loss(z.view(k, -1, z.shape[-1]), self.params.dwv_reduction)
        w = self.weight(ctx.epoch)
        loss = l_ce + w * l_dwv
        return StepOutput(
            loss,
            {"loss": loss.item(), "bid": l_ce.item(), "dwv": l_dwv.item(), "dwv_weight": w},
        )
