"""Data-parallel semantics with 2 real gloo processes on this machine: the global batch is split
without changing BID labels, and SimCLR's loss and gradients with 2 ranks equal one process's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inco_core.config import MoCoConfig, PretrainConfig
from inco_core.distributed import all_gather_no_grad, average_gradients, world
from inco_core.losses.ntxent import nt_xent
from inco_core.methods import build_method
from inco_core.methods.base import StepContext
from inco_core.train import BatchPartition

B, D, TAU = 7, 16, 0.5  # 7 images: ranks hold 4 and 3, like the last partial batch of an epoch


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("fixed", [True, False])
def test_ranks_share_a_global_batch_with_one_worker_labels(world_size: int, fixed: bool) -> None:
    one = BatchPartition(1080, 64, seed=3, fixed=fixed)
    many = BatchPartition(1080, 64, seed=3, fixed=fixed)  # what every rank builds
    for epoch in (0, 5):
        for batch, same in zip(one.batches(epoch), many.batches(epoch), strict=True):
            assert torch.equal(batch, same)  # every rank cuts the same global batches
            parts = [BatchPartition.local(same, r, world_size) for r in range(world_size)]
            assert torch.equal(torch.cat([p for p, _ in parts]), batch)
            assert torch.equal(torch.cat([lab for _, lab in parts]), torch.arange(len(batch)))  # BID labels


def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _rank_main(rank: int, world_size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        assert world() == (rank, world_size)
        z1, z2 = _reference()
        mine = torch.tensor_split(torch.arange(B), world_size)[rank]
        a = z1[mine].clone().requires_grad_(True)
        b = z2[mine].clone().requires_grad_(True)
        share = len(mine) * world_size / B  # as the pretraining loop weights each rank's mean loss
        loss = nt_xent(a, b, TAU) * share
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        # a parameter's gradient is the rank average (average_gradients) of these leaf gradients
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))
        average_gradients([p])
        keys = all_gather_no_grad(torch.full((len(mine), 2), float(rank)))
        # one MoCo v2 step on this rank's images (same seed, so the same encoders and queue everywhere)
        torch.manual_seed(0)
        moco = build_method("mocov2", _moco_cfg())
        views = torch.randn(2, B, 1, 32, 32, generator=torch.Generator().manual_seed(1))[:, mine].reshape(-1, 1, 32, 32)
        moco.step(views, StepContext(epoch=0.0, labels=mine, batch_size=B))
        torch.save(
            {
                "queue": moco.queue.clone(),
                "queue_ptr": int(moco.queue_ptr),
                "loss": total / world_size,
                "ga": a.grad / world_size,
                "gb": b.grad / world_size,
                "rows": mine,
                "avg": p.grad,
                "keys": keys,
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _moco_cfg() -> PretrainConfig:
    return PretrainConfig(epochs=1, batch_size=B, mocov2=MoCoConfig(queue_size=16, out_dim=8, hidden_dim=16))


def test_simclr_loss_and_gradients_with_two_ranks_equal_one_process() -> None:
    """Also MoCo v2's queue: after one step on two ranks (4 and 3 images), both ranks hold the same
    queue, its first 7 rows the new keys of all 7 images, and the same pointer."""
    z1, z2 = _reference()
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = nt_xent(a, b, TAU)
    loss.backward()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.start_processes(_rank_main, args=(2, init, tmp), nprocs=2, join=True, start_method="spawn")
        parts = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [len(p["rows"]) for p in parts] == [4, 3]
    for part in parts:
        assert part["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        assert torch.allclose(part["ga"], a.grad[part["rows"]], atol=1e-6)
        assert torch.allclose(part["gb"], b.grad[part["rows"]], atol=1e-6)
        assert torch.equal(part["avg"], torch.full((3,), 1.5))
        assert part["keys"][:, 0].tolist() == [0.0] * 4 + [1.0] * 3  # uneven gather, rank order
    assert torch.equal(parts[0]["queue"], parts[1]["queue"]) and parts[0]["queue_ptr"] == parts[1]["queue_ptr"] == B
    torch.manual_seed(0)
    fresh = build_method("mocov2", _moco_cfg())
    assert torch.equal(parts[0]["queue"][B:], fresh.queue[B:])  # the rest of the queue as it was
    assert not torch.equal(parts[0]["queue"][:B], fresh.queue[:B])  # the first B rows: the new keys
    assert torch.allclose(parts[0]["queue"][:B].norm(dim=1), torch.ones(B), atol=1e-5)
