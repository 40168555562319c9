"""SimSiam: projector, predictor and a stop-gradient, no negatives (Chen & He, CVPR 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from inco_core.config import PretrainConfig
from inco_core.losses.negcos import negative_cosine
from inco_core.methods.base import PretrainMethod, StepContext, StepOutput
from inco_core.models import Backbone, mlp


class SimSiam(PretrainMethod):
    """Projector f (3 layers, BN on the output) and predictor h (2 layers, bottleneck
    pred_hidden_dim); loss 0.5 * D(p1, stopgrad(z2)) + 0.5 * D(p2, stopgrad(z1))."""

    name: ClassVar[str] = "simsiam"

    def __init__(self, backbone: Backbone, cfg: PretrainConfig) -> None:
        super().__init__(backbone, cfg)
        self.params = cfg.simsiam
        dim = self.params.proj_dim
        self.projector = mlp(backbone.embed_dim, dim, dim, layers=3, last_bn=True)
        self.predictor = mlp(dim, self.params.pred_hidden_dim, dim, layers=2)

    @property
    def num_views(self) -> int:
        return 2

    def step(self, views: Tensor, ctx: StepContext) -> StepOutput:
        """views: [2B, C, H, W], view v of image i at row v * B + i.

        Logs ``z_std``: the per-dimension std of the normalised projections times sqrt(dim),
        about 1 for well spread outputs and 0 when SimSiam collapses (the paper's Figure 2).

        Raises:
            ValueError: views is not a 4-D batch with an even, non-zero number of rows.
        """
        if views.dim() != 4 or views.shape[0] == 0 or views.shape[0] % 2:
            raise ValueError(f"simsiam expects views [2 * B, C, H, W], got {tuple(views.shape)}")
        b = views.shape[0] // 2
        z = self.projector(self.backbone(views))  # [2B, proj_dim]
        p = self.predictor(z)  # [2B, proj_dim]
        loss = 0.5 * negative_cosine(p[:b], z[b:]) + 0.5 * negative_cosine(p[b:], z[:b])
        with torch.no_grad():
            z_std = F.normalize(z[:b].float(), dim=1).std(dim=0, correction=0).mean() * z.shape[1] ** 0.5
        return StepOutput(loss, {"loss": loss.item(), "z_std": z_std.item()})
