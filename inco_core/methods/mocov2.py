"""MoCo v2: momentum key encoder, a queue of negative keys and InfoNCE (He et al. CVPR 2020;
Chen et al. 2020, "Improved baselines with momentum contrastive learning")."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inco_core.config import PretrainConfig
from inco_core.distributed import all_gather_no_grad
from inco_core.losses.infonce import info_nce
from inco_core.methods.base import PretrainMethod, StepContext, StepOutput
from inco_core.models import Backbone, mlp

BN_SPLITS = 4  # batch-norm groups of the single-process shuffle-BN emulation


def _split_forward(encoder: nn.Module, x: Tensor, splits: int) -> Tensor:
    """Run ``encoder`` on ``splits`` near-equal chunks of x [N, ...] (>= 2 rows each), so batch
    norm sees one group per chunk as it would see one per GPU. Returns [N, D]."""
    splits = max(1, min(splits, x.shape[0] // 2))
    return torch.cat([encoder(chunk) for chunk in torch.tensor_split(x, splits)])


class MoCoV2(PretrainMethod):
    """Query encoder = backbone + projector (512 -> hidden_dim -> out_dim); the key encoder is a
    copy updated only by momentum (:meth:`after_optimizer_step`).

    Loss: symmetric, 0.5 * (InfoNCE(q1, k2) + InfoNCE(q2, k1)) against the queue as it was before
    the step. Then the keys of view 2 (one per image, gathered from all ranks) are enqueued, so the
    queue holds the keys of the last ``queue_size`` images. The queue also keeps each key's image
    (``queue_images``, -1 when unknown): an older key of a query's own image is left out of its
    negatives, which otherwise happens whenever the queue is long against the pretraining set
    (about 12 % of queries at 1,080 images and a queue of 512, almost all at 270 images or fewer).

    Shuffle-BN (MoCo, section 3.3): batch norm in one group would let a query find its key through
    shared batch statistics. Permuting rows alone changes nothing for BN, so both encoders run on
    ``BN_SPLITS`` chunks (one BN group each, as one GPU each in the paper): queries in order, keys
    after a random permutation that is undone afterwards; a query's key then sits in a BN group of
    other images. This is a single-process emulation: in DDP, keys are shuffled within each rank.
    """

    name: ClassVar[str] = "mocov2"

    def __init__(self, backbone: Backbone, cfg: PretrainConfig) -> None:
        super().__init__(backbone, cfg)
        self.params = p = cfg.mocov2
        self.projector = mlp(backbone.embed_dim, p.hidden_dim, p.out_dim, layers=2)
        self.backbone_k = copy.deepcopy(backbone)
        self.projector_k = copy.deepcopy(self.projector)
        for param in self._key_modules().parameters():
            param.requires_grad_(False)
        self.queue: Tensor
        self.queue_ptr: Tensor
        self.register_buffer("queue", F.normalize(torch.randn(p.queue_size, p.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.queue_images: Tensor
        self.register_buffer("queue_images", torch.full((p.queue_size,), -1, dtype=torch.long))

    @property
    def num_views(self) -> int:
        return 2

    def _query_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.backbone, self.projector])

    def _key_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.backbone_k, self.projector_k])

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def _key(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector_k(self.backbone_k(x)), dim=1)

    @torch.no_grad()
    def keys(self, views: Tensor) -> Tensor:
        """Key encoder on shuffled BN groups, rows restored: views [N, C, H, W] -> [N, out_dim]."""
        perm = torch.randperm(views.shape[0], device=views.device)
        k = _split_forward(self._key, views[perm], BN_SPLITS)
        return k[torch.argsort(perm)]

    def step(self, views: Tensor, ctx: StepContext) -> StepOutput:
        """views: [2B, C, H, W], view v of image i at row v * B + i.

        Raises:
            ValueError: views is not a 4-D batch with an even, non-zero number of rows.
        """
        if views.dim() != 4 or views.shape[0] == 0 or views.shape[0] % 2:
            raise ValueError(f"mocov2 expects views [2 * B, C, H, W], got {tuple(views.shape)}")
        b = views.shape[0] // 2
        q = _split_forward(self._query, views, BN_SPLITS)  # [2B, out_dim]
        k = self.keys(views)  # [2B, out_dim], no grad
        queue = self.queue.clone()  # the loss must not see the in-place enqueue below
        own = None  # [B, Q]: queue keys of each query's own image, no negatives
        if ctx.images is not None:
            own = ctx.images.view(-1, 1).to(self.queue_images.device) == self.queue_images.view(1, -1)
        t = self.params.temperature
        loss = 0.5 * (info_nce(q[:b], k[b:], queue, t, exclude=own) + info_nce(q[b:], k[:b], queue, t, exclude=own))
        images = ctx.images if ctx.images is not None else torch.full((b,), -1, device=views.device)
        self.enqueue(all_gather_no_grad(k[b:]), all_gather_no_grad(images.to(views.device)))
        return StepOutput(loss, {"loss": loss.item()})

    @torch.no_grad()
    def enqueue(self, keys: Tensor, images: Tensor | None = None) -> None:
        """Write keys [n, out_dim] and their images [n] int64 (None: unknown, -1) at the queue
        pointer, wrapping around the end of the queue; when n > queue_size only the last
        queue_size keys are kept. The pointer advances by n mod Q.

        Raises:
            ValueError: keys is not [n, out_dim], or images is not [n].
        """
        size, dim = self.queue.shape
        if keys.dim() != 2 or keys.shape[1] != dim:
            raise ValueError(f"enqueue expects keys [n, {dim}], got {tuple(keys.shape)}")
        n = keys.shape[0]
        if images is None:
            images = torch.full((n,), -1, dtype=torch.long, device=keys.device)
        if images.shape != (n,):
            raise ValueError(f"enqueue expects images [{n}], got {tuple(images.shape)}")
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx[-size:]] = keys[-size:].to(self.queue.dtype)
        self.queue_images[idx[-size:]] = images[-size:].to(self.queue_images.device, torch.long)
        self.queue_ptr.fill_((ptr + n) % size)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Momentum update of the key encoder, param_k <- m * param_k + (1 - m) * param_q; batch
        norm buffers (running statistics) are copied from the query encoder."""
        m = self.params.momentum
        query, key = self._query_modules(), self._key_modules()
        for p_q, p_k in zip(query.parameters(), key.parameters(), strict=True):
            p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)
        for b_q, b_k in zip(query.buffers(), key.buffers(), strict=True):
            b_k.copy_(b_q)
