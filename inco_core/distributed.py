"""torch.distributed helpers that fall back to the identity in a single process.

Ray Train (issue 4) initialises the process group; ``inco_core`` only reads it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device | None = None) -> list[int]:
    """The first-dimension size of a tensor on every rank ([n] outside a process group)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [n]
    sizes = torch.zeros(dist.get_world_size(), dtype=torch.long, device=device)
    sizes[dist.get_rank()] = n
    dist.all_reduce(sizes)
    return sizes.tolist()


def _padded_gather(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """all_gather of tensors whose first dimension differs per rank (padded to the largest)."""
    top = max(sizes)
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return [t[:n] for t, n in zip(out, sizes, strict=True)]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.sizes = sizes
        return tuple(_padded_gather(x, sizes))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # every rank's loss may depend on this rank's rows: sum their gradients (reduce to the owner)
        top = max(ctx.sizes)
        stacked = torch.zeros((len(grads), top, *grads[0].shape[1:]), dtype=grads[0].dtype, device=grads[0].device)
        for i, g in enumerate(grads):
            stacked[i, : g.shape[0]] = g
        dist.all_reduce(stacked)
        rank = dist.get_rank()
        return stacked[rank, : ctx.sizes[rank]], None


def all_gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` [n_r, ...] from every rank -> ([sum n_r, ...], offset of this rank's rows);
    gradients flow back to each rank's own rows (SimCLR's negatives from all ranks). Ranks may hold
    different n_r (the last, partial batch of an epoch)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x, 0
    sizes = gather_sizes(x.shape[0], x.device)
    return torch.cat(_GatherWithGrad.apply(x, sizes), dim=0), sum(sizes[: dist.get_rank()])


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n_r, ...] from every rank, without gradients (MoCo's keys for the queue)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return torch.cat(_padded_gather(x, gather_sizes(x.shape[0], x.device)), dim=0)


def broadcast_state(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the start of data-parallel training)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Data-parallel gradient averaging, one all-reduce of all gradients flattened together (what
    DDP does in buckets). Parameters without a gradient on this rank count as zero."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each logged number over ranks (for reporting)."""
    if not is_distributed() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))
