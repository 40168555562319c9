"""DWV (eqs. 2-3) and BID (eq. 1, labels and the fixed partition) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from inco_core.config import PretrainConfig
from inco_core.losses.bid import bid_labels, bid_loss
from inco_core.losses.dwv import dwv_loss, dwv_weight
from inco_core.methods import build_method
from inco_core.methods.base import StepContext
from inco_core.train import BatchPartition


def test_dwv_matches_hand_computation_both_readings() -> None:
    # K = 2 views, n = 2 images, D = 2 dims
    z = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 2.0], [0.0, 4.0]]])
    # image 0: mu = (2, 2); deviations (-1, 0), (1, 0) -> squared norms 1, 1
    # image 1: mu = (0, 2); deviations (0, -2), (0, 2) -> squared norms 4, 4
    summed = (1 + 1 + 4 + 4) / (2 * 2)
    assert dwv_loss(z, "sum").item() == pytest.approx(summed)
    assert dwv_loss(z, "mean").item() == pytest.approx(summed / 2)


def test_dwv_is_zero_for_identical_views_and_rejects_bad_shapes() -> None:
    z = torch.randn(1, 4, 8).repeat(5, 1, 1)
    assert dwv_loss(z).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"\[K, B, D\]"):
        dwv_loss(torch.randn(4, 8))


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.0, 0.0), (30.0, 0.0), (90.0, 0.5), (150.0, 1.0), (199.0, 1.0), (10_000.0, 1.0)],
)
def test_weight_ramp_paper_values(t: float, expected: float) -> None:
    assert dwv_weight(t, a_f=1.0, t1=30, t2=150) == pytest.approx(expected)


def test_weight_ramp_scales_with_a_f_and_rejects_t2_before_t1() -> None:
    assert dwv_weight(90, a_f=0.5, t1=30, t2=150) == pytest.approx(0.25)
    assert dwv_weight(200, a_f=0.0, t1=30, t2=150) == 0.0
    with pytest.raises(ValueError):
        dwv_weight(1, 1.0, t1=5, t2=5)


def test_inco_ramp_defaults_scale_with_epochs() -> None:
    cfg = PretrainConfig(epochs=200)
    assert cfg.inco.ramp(200) == (30.0, 150.0)
    assert cfg.inco.ramp(20) == pytest.approx((3.0, 15.0))


def test_dwv_gradient_reaches_the_backbone() -> None:
    cfg = PretrainConfig(epochs=10, batch_size=4, inco={"views": 3, "t1": 0, "t2": 1})
    method = build_method("inco", cfg)
    views = torch.randn(3 * 4, 1, 32, 32)
    z = method.backbone(views)
    dwv_loss(z.view(3, 4, -1)).backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None for g in grads)
    assert method.backbone.net.conv1.weight.grad.abs().sum() > 0
    assert method.fc.weight.grad is None  # DWV alone never touches the BID classifier


def test_bid_labels_full_and_partial_batches() -> None:
    assert bid_labels(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    assert bid_labels(2, 3, offset=4).tolist() == [4, 5, 4, 5, 4, 5]


def test_bid_loss_is_cross_entropy_over_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    t = 0.5
    expected = -0.5 * (math.log(math.exp(4) / (math.exp(4) + 1)) + math.log(math.exp(2) / (1 + math.exp(2))))
    assert bid_loss(logits, labels, t).item() == pytest.approx(expected, rel=1e-6)


def test_partition_is_fixed_across_epochs_and_keeps_labels() -> None:
    part = BatchPartition(650, 64, seed=3, fixed=True)
    assert len(part) == 11
    label_of: dict[int, dict[int, int]] = {0: {}, 1: {}}
    for epoch in (0, 1):
        batches = part.batches(epoch)
        assert sorted(len(b) for b in batches) == [10] + [64] * 10  # last partial batch kept
        for batch in batches:
            positions, labels = part.local(batch, 0, 1)
            for img, lab in zip(positions.tolist(), labels.tolist(), strict=True):
                label_of[epoch][img] = lab
    assert len(label_of[0]) == 650
    assert label_of[0] == label_of[1]
    assert [b.tolist() for b in part.batches(0)] != [b.tolist() for b in part.batches(1)]  # order moves


def test_unfixed_partition_reshuffles_and_drops_a_single_leftover() -> None:
    part = BatchPartition(129, 64, seed=0, fixed=False)
    assert len(part) == 2
    a, b = part.batches(0), part.batches(1)
    assert all(len(x) == 64 for x in a + b)
    assert a[0].tolist() != b[0].tolist()


def test_ddp_rank_offsets_equal_single_process_labels() -> None:
    batch = torch.arange(100, 164)
    single_pos, single_lab = BatchPartition.local(batch, 0, 1)
    merged = {}
    for rank in range(2):
        pos, lab = BatchPartition.local(batch, rank, 2)
        assert lab.tolist() == list(range(rank * 32, rank * 32 + 32))  # r * local_n + j
        merged.update(dict(zip(pos.tolist(), lab.tolist(), strict=True)))
    assert merged == dict(zip(single_pos.tolist(), single_lab.tolist(), strict=True))
    # a partial batch of 57 split over 2 ranks: labels stay global positions
    pos0, lab0 = BatchPartition.local(torch.arange(57), 0, 2)
    pos1, lab1 = BatchPartition.local(torch.arange(57), 1, 2)
    assert torch.cat([lab0, lab1]).tolist() == list(range(57))
    assert torch.cat([pos0, pos1]).tolist() == list(range(57)) and len(pos0) == 29


def test_inco_step_logs_weight_and_uses_views_k() -> None:
    cfg = PretrainConfig(epochs=10, batch_size=4, inco={"views": 3, "t1": 2, "t2": 6})
    method = build_method("inco", cfg)
    out = method.step(torch.randn(12, 1, 32, 32), StepContext(4.0, torch.arange(4), 4))
    assert out.logs["dwv_weight"] == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(out.logs["bid"] + 0.5 * out.logs["dwv"], rel=1e-5)


def test_dwv_is_computed_in_float32_from_bf16_embeddings() -> None:
    # near collapse: the K views of an image differ by ~1e-3 of their size, about bf16's resolution
    gen = torch.Generator().manual_seed(0)
    centre = 1.0 + torch.rand(1, 8, 64, generator=gen)
    z = (centre + 1e-3 * torch.randn(5, 8, 64, generator=gen)).to(torch.bfloat16)
    for reduction in ("mean", "sum"):
        got = dwv_loss(z, reduction)
        assert got.dtype == torch.float32
        # the same bf16 values, cast to float32 first, computed in float32
        assert got.item() == pytest.approx(dwv_loss(z.float(), reduction).item(), rel=1e-6)


def test_inco_losses_run_in_float32_under_bf16_autocast() -> None:
    cfg = PretrainConfig(epochs=10, batch_size=4, inco={"views": 2})
    method = build_method("inco", cfg)
    seen: list[torch.dtype] = []
    method.fc.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    ctx = StepContext(epoch=0.0, labels=torch.arange(4), batch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what CUDA's autocast does, on the CPU
        out = method.step(torch.randn(2 * 4, 1, 32, 32), ctx)
    assert seen == [torch.float32]  # the BID logits
    assert out.loss.dtype == torch.float32
