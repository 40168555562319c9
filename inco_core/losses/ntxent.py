"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., ICML 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from inco_core.distributed import all_gather_with_grad


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Symmetric 2N-way cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

    z1, z2: [B, D] projections of view 1 and view 2 of this rank's B images (row i of each is the
        same image). Both are L2-normalised here, then gathered from every rank with gradients, so
        the 2N candidates of each anchor are all views of the global batch (N = sum of B over ranks); this
        rank's rows sit after the rows of lower ranks inside each gathered view.
    temperature: tau > 0, divides the cosine similarities.
    Returns a scalar: the mean over this rank's 2B anchors of
        -log(exp(s(a, pos) / tau) / sum_{c != a} exp(s(a, c) / tau)).

    Raises:
        ValueError: z1 and z2 are not 2-D tensors of the same shape with B >= 1, or tau <= 0.
    """
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] == 0:
        raise ValueError(
            f"nt_xent expects z1 and z2 of the same shape [B, D] with B >= 1, "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"nt_xent needs a temperature > 0 (got {temperature})")
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    (g1, offset), (g2, _) = all_gather_with_grad(z1), all_gather_with_grad(z2)  # [N, D] each
    n = g1.shape[0]
    anchors = torch.cat([z1, z2])  # [2B, D]
    logits = anchors @ torch.cat([g1, g2]).T / temperature  # [2B, 2N]
    own = torch.arange(b, device=z1.device) + offset  # this rank's rows in a gathered view
    self_idx = torch.cat([own, own + n])
    pos_idx = torch.cat([own + n, own])  # view 1 -> its view 2 and back
    rows = torch.arange(2 * b, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)
