"""SimCLR: two views, an MLP projector and NT-Xent (Chen et al., ICML 2020)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from inco_core.config import PretrainConfig
from inco_core.losses.ntxent import nt_xent
from inco_core.methods.base import PretrainMethod, StepContext, StepOutput
from inco_core.models import Backbone, mlp


class SimCLR(PretrainMethod):
    """Projector g (512 -> hidden_dim -> out_dim) on the backbone; NT-Xent pulls the two views of
    an image together and pushes away every other view of the (all-ranks) batch."""

    name: ClassVar[str] = "simclr"

    def __init__(self, backbone: Backbone, cfg: PretrainConfig) -> None:
        super().__init__(backbone, cfg)
        self.params = cfg.simclr
        self.projector = mlp(backbone.embed_dim, self.params.hidden_dim, self.params.out_dim, layers=2)

    @property
    def num_views(self) -> int:
        return 2

    def step(self, views: Tensor, ctx: StepContext) -> StepOutput:
        """views: [2B, C, H, W], view v of image i at row v * B + i.

        Raises:
            ValueError: views is not a 4-D batch with an even, non-zero number of rows.
        """
        if views.dim() != 4 or views.shape[0] == 0 or views.shape[0] % 2:
            raise ValueError(f"simclr expects views [2 * B, C, H, W], got {tuple(views.shape)}")
        b = views.shape[0] // 2
        z = self.projector(self.backbone(views))  # [2B, out_dim]
        loss = nt_xent(z[:b], z[b:], self.params.temperature)
        return StepOutput(loss, {"loss": loss.item()})
