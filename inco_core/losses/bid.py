"""Batch Instance Discrimination loss (InCo, Electronics Letters 2021, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bid_labels(batch_len: int, views: int, *, offset: int = 0, device: torch.device | None = None) -> Tensor:
    """Instance labels of a batch's K views: image j of this rank gets ``offset + j`` in every view.

    Returns: [views * batch_len] int64, row v * batch_len + j holding offset + j.
    """
    return torch.arange(offset, offset + batch_len, device=device).repeat(views)


def bid_loss(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of instance logits divided by the temperature T.

    logits: [V * B, n] from FC(512 -> n); labels: [V * B] int64 in [0, n). Returns a float32
    scalar, computed in float32 whatever the logits' dtype.
    """
    return F.cross_entropy(logits.float() / temperature, labels)
