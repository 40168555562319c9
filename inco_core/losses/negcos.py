"""Negative cosine similarity with a stop-gradient, the loss of SimSiam (Chen & He, CVPR 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """D(p, stopgrad(z)) = -mean_i cos(p_i, z_i) (SimSiam, Chen & He 2021, eqs. 1 and 2).

    p: [B, D] predictor outputs, z: [B, D] projector outputs of the other view. z is detached
        here, so no gradient ever reaches the target branch.
    Returns a scalar in [-1, 1]; -1 when every p_i points along z_i.

    Raises:
        ValueError: p and z are not [B, D] of the same shape with B >= 1.
    """
    if p.dim() != 2 or p.shape != z.shape or p.shape[0] == 0:
        raise ValueError(
            f"negative_cosine expects p and z of the same shape [B, D] with B >= 1, "
            f"got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()
