"""SimCLR, MoCo v2 and SimSiam: gradients reach every trainable parameter, the loss falls on a
fixed batch, and MoCo's queue and momentum encoder behave as in the paper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inco_core.config import MoCoConfig, PretrainConfig
from inco_core.losses.negcos import negative_cosine
from inco_core.losses.ntxent import nt_xent
from inco_core.methods import PretrainMethod, StepContext, build_method
from inco_core.methods.mocov2 import MoCoV2

B = 8
BASELINES = ["simclr", "mocov2", "simsiam"]


def _cfg(**mocov2: float) -> PretrainConfig:
    return PretrainConfig(epochs=2, batch_size=B, mocov2=MoCoConfig(**mocov2))


def _views(seed: int = 0) -> torch.Tensor:
    """[2B, 1, 32, 32]: a fixed random batch and a slightly perturbed copy as the second view."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 32, 32, generator=g)
    return torch.cat([x, x + 0.1 * torch.randn(x.shape, generator=g)])


def _ctx() -> StepContext:
    return StepContext(epoch=0.0, labels=torch.arange(B), batch_size=B)


def _method(name: str, cfg: PretrainConfig | None = None) -> PretrainMethod:
    torch.manual_seed(0)
    method = build_method(name, cfg or _cfg())
    method.train()
    return method


@pytest.mark.parametrize("name", BASELINES)
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    method = _method(name)
    out = method.step(_views(), _ctx())
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logs["loss"] == pytest.approx(out.loss.item())
    out.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert sum(1 for _ in method.trainable_parameters()) > 0


@pytest.mark.parametrize("name", BASELINES)
def test_loss_falls_on_a_fixed_batch(name: str) -> None:
    method = _method(name, _cfg(queue_size=1024))
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9)
    views = _views()
    if isinstance(method, MoCoV2):  # fixed batch: keep its keys out of the queue (false negatives)
        queue = method.queue.clone()
    losses = []
    for _ in range(6):
        if isinstance(method, MoCoV2):
            method.queue.copy_(queue)
        out = method.step(views, _ctx())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", BASELINES)
def test_step_rejects_an_odd_number_of_views(name: str) -> None:
    with pytest.raises(ValueError, match=r"2 \* B"):
        _method(name).step(torch.randn(5, 1, 32, 32), _ctx())


def test_simclr_and_simsiam_losses_pair_view_one_with_view_two() -> None:
    views = _views()
    simclr = _method("simclr").eval()  # running BN statistics: one forward equals another
    with torch.no_grad():
        z = simclr.projector(simclr.backbone(views))
        expected = nt_xent(z[:B], z[B:], simclr.cfg.simclr.temperature)
        got = simclr.step(views, _ctx()).loss
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    simsiam = _method("simsiam").eval()
    with torch.no_grad():
        z = simsiam.projector(simsiam.backbone(views))
        p = simsiam.predictor(z)
        expected = 0.5 * negative_cosine(p[:B], z[B:]) + 0.5 * negative_cosine(p[B:], z[:B])
        got = simsiam.step(views, _ctx()).loss
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_simsiam_gradient_reaches_z_only_through_the_predictor() -> None:
    method = _method("simsiam")
    captured: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, inputs: tuple[torch.Tensor], p: torch.Tensor) -> None:
        captured["z"], captured["p"] = inputs[0], p

    method.predictor.register_forward_hook(keep)
    loss = method.step(_views(), _ctx()).loss
    z, p = captured["z"], captured["p"]  # [2B, proj_dim] projector output and prediction
    dz, dp = torch.autograd.grad(loss, [z, p], retain_graph=True)
    # without the stop-gradient, dL/dz would also hold the target branch's dD/dz
    (through_predictor,) = torch.autograd.grad(p, z, grad_outputs=dp)
    torch.testing.assert_close(dz, through_predictor)
    assert through_predictor.abs().sum() > 0


def test_moco_key_encoder_is_frozen_and_gets_no_gradient() -> None:
    method = _method("mocov2")
    assert isinstance(method, MoCoV2)
    trainable = {id(p) for p in method.trainable_parameters()}
    key_params = list(method.backbone_k.parameters()) + list(method.projector_k.parameters())
    assert key_params and not any(id(p) in trainable for p in key_params)
    method.step(_views(), _ctx()).loss.backward()
    assert all(p.grad is None for p in key_params)
    assert all(p.grad is not None for p in method.backbone.parameters())


def test_moco_momentum_update_matches_formula() -> None:
    method = _method("mocov2", _cfg(momentum=0.9))
    assert isinstance(method, MoCoV2)
    w_q, w_k = method.projector[0].weight, method.projector_k[0].weight
    with torch.no_grad():
        w_q.add_(torch.randn_like(w_q))
        method.backbone.net.bn1.running_mean.fill_(0.25)
    before_q, before_k = w_q.detach().clone(), w_k.clone()
    method.after_optimizer_step()
    torch.testing.assert_close(w_k, 0.9 * before_k + 0.1 * before_q)
    torch.testing.assert_close(w_q, before_q)
    assert torch.all(method.backbone_k.net.bn1.running_mean == 0.25)


def test_moco_step_enqueues_normalised_keys_of_view_two() -> None:
    method = _method("mocov2", _cfg(queue_size=12))
    assert isinstance(method, MoCoV2)
    method.eval()  # running BN statistics: keys do not depend on the shuffle
    views = _views()
    old = method.queue.clone()
    method.step(views, _ctx())
    assert int(method.queue_ptr) == B
    with torch.no_grad():
        expected = F.normalize(method.projector_k(method.backbone_k(views[B:])), dim=1)
    torch.testing.assert_close(method.queue[:B], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.queue[B:], old[B:])
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(12))


def test_moco_queue_wraps_around() -> None:
    method = _method("mocov2", _cfg(queue_size=12, out_dim=8))
    assert isinstance(method, MoCoV2)
    first, second = torch.full((8, 8), 1.0), torch.full((8, 8), 2.0)
    method.enqueue(first)
    assert int(method.queue_ptr) == 8
    method.enqueue(second)
    assert int(method.queue_ptr) == 4  # (8 + 8) mod 12
    assert torch.all(method.queue[8:] == 2.0) and torch.all(method.queue[:4] == 2.0)
    assert torch.all(method.queue[4:8] == 1.0)
    method.enqueue(torch.arange(30.0).repeat_interleave(8).view(30, 8))  # more than the queue
    assert int(method.queue_ptr) == (4 + 30) % 12
    # the last 12 keys (18..29) fill the queue, key 29 just before the pointer
    assert method.queue[(int(method.queue_ptr) - 1) % 12, 0].item() == 29.0
    assert sorted(method.queue[:, 0].tolist()) == [float(v) for v in range(18, 30)]


def test_moco_shuffled_keys_come_back_in_order() -> None:
    method = _method("mocov2")
    assert isinstance(method, MoCoV2)
    method.eval()
    views = _views()
    with torch.no_grad():
        direct = F.normalize(method.projector_k(method.backbone_k(views)), dim=1)
    torch.testing.assert_close(method.keys(views), direct, rtol=1e-4, atol=1e-5)


def test_moco_keeps_a_querys_own_older_keys_out_of_its_negatives(monkeypatch: pytest.MonkeyPatch) -> None:
    from inco_core.methods import mocov2 as moco_module

    method = _method("mocov2", _cfg(queue_size=2 * B))
    first = torch.arange(100, 100 + B)  # the images of the first step (positions in the pretraining set)
    method.step(_views(0), StepContext(0.0, torch.arange(B), B, images=first))
    older = dict(zip(first.tolist(), method.queue[:B].clone(), strict=True))  # image -> its key in the queue
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real = moco_module.info_nce

    def spy(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float, **kw: torch.Tensor) -> torch.Tensor:
        seen.append((queue, kw.get("exclude")))
        return real(q, k, queue, t, **kw)

    monkeypatch.setattr(moco_module, "info_nce", spy)
    second = torch.cat([first[: B // 2], torch.arange(200, 200 + B // 2)])  # half of them again
    method.step(_views(1), StepContext(0.0, torch.arange(B), B, images=second))
    assert len(seen) == 2  # both directions of the symmetric loss
    for queue, exclude in seen:
        for i, image in enumerate(second.tolist()):
            negatives = queue if exclude is None else queue[~exclude[i]]
            if image in older:
                assert not any(torch.equal(n, older[image]) for n in negatives), f"image {image}'s own key"
                assert len(negatives) == 2 * B - 1  # only that one key is left out
            else:
                assert len(negatives) == 2 * B


def test_the_pretraining_loop_tells_the_method_which_images_it_sees() -> None:
    from inco_core.train import pretrain

    method = _method("mocov2", PretrainConfig(epochs=2, batch_size=4, mocov2=MoCoConfig(queue_size=16)))
    seen: list[list[int]] = []
    real_step = method.step

    def spy(views: torch.Tensor, ctx: StepContext) -> object:
        assert ctx.images is not None
        seen.append(ctx.images.tolist())
        return real_step(views, ctx)

    method.step = spy  # type: ignore[method-assign]
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    pretrain(method, images, method.cfg, seed=0, device=torch.device("cpu"))
    assert len(seen) == 4  # 2 epochs of 2 batches
    first, second = (sorted(i for batch in epoch for i in batch) for epoch in (seen[:2], seen[2:]))
    assert first == second == list(range(8))  # positions in the pretraining set, every epoch
