"""InfoNCE against a queue of negatives, as in MoCo v2 (He et al. CVPR 2020; Chen et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float, *, exclude: Tensor | None = None) -> Tensor:
    """(1 + Q)-way cross-entropy with the positive key at index 0 (MoCo, He et al. 2020, eq. 1).

    q: [B, D] queries, k: [B, D] their positive keys, queue: [Q, D] negative keys; every row
        L2-normalised by the caller (this function does not renormalise). k and queue should carry
        no gradient (MoCo's key encoder runs under no_grad).
    temperature: tau > 0.
    exclude: [B, Q] bool or None; True leaves queue key j out of query i's negatives (an older key
        of the query's own image is no negative).
    Returns a scalar: the mean over the B queries of the cross-entropy of the logits
        [q.k, q.queue_1, ..., q.queue_Q] / tau with target 0.

    Raises:
        ValueError: q and k are not [B, D] of the same shape, queue is not [Q, D] with the same D
            and Q >= 1, exclude is not [B, Q], or tau <= 0.
    """
    if q.dim() != 2 or q.shape != k.shape or q.shape[0] == 0:
        raise ValueError(
            f"info_nce expects q and k of the same shape [B, D] with B >= 1, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if queue.dim() != 2 or queue.shape[1] != q.shape[1] or queue.shape[0] == 0:
        raise ValueError(f"info_nce expects a queue [Q, {q.shape[1]}] with Q >= 1, got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce needs a temperature > 0 (got {temperature})")
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
    l_neg = q @ queue.T  # [B, Q]
    if exclude is not None:
        if exclude.shape != l_neg.shape:
            raise ValueError(f"info_nce expects exclude [B, Q] = {tuple(l_neg.shape)}, got {tuple(exclude.shape)}")
        l_neg = l_neg.masked_fill(exclude, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [B, 1 + Q]
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)
