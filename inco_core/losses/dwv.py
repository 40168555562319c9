"""Dynamic Weighted Variance loss (InCo, Electronics Letters 2021, eqs. 2 and 3)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor


def dwv_weight(t: float, a_f: float, t1: float, t2: float) -> float:
    """weight(t) = max(a_f * min((t - T1) / (T2 - T1), 1), 0), eq. 3; t in (fractional) epochs."""
    if t2 <= t1:
        raise ValueError(f"T2 must be greater than T1 (got T1={t1}, T2={t2})")
    return max(a_f * min((t - t1) / (t2 - t1), 1.0), 0.0)


def dwv_loss(z: Tensor, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Unweighted variance of each image's K view embeddings around their mean, eq. 2.

    z: [K, B, D], z[k, i] the embedding of view k of image i.
    reduction: how the square (z_i^k - mu_i)^2 treats the D dims: ``sum`` (squared norm) or
        ``mean`` (squared norm / D). Either way the result is then averaged over the n K terms.
    Returns a float32 scalar; 0 when every image's views are identical.

    The loss is computed in float32 whatever z's dtype: near collapse the deviations from the mean
    are far below bf16's resolution (autocast on CUDA), and a bf16 mean and square would be mostly
    rounding error.
    """
    if z.dim() != 3:
        raise ValueError(f"dwv_loss expects [K, B, D], got shape {tuple(z.shape)}")
    z = z.float()
    sq = (z - z.mean(dim=0, keepdim=True)).pow(2)  # [K, B, D]
    per_term = sq.sum(dim=-1) if reduction == "sum" else sq.mean(dim=-1)  # [K, B]
    return per_term.mean()
