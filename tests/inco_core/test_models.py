"""The backbone helpers of inco_core.models."""

from __future__ import annotations

import torch

from inco_core.models import Backbone, embed


def test_embed_uses_eval_mode_and_restores_the_callers_mode() -> None:
    backbone = Backbone()
    x = torch.randn(4, 1, 32, 32)
    backbone.eval()
    expected = embed(backbone, x)
    stats = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    backbone.net.bn1.eval()  # a caller's mixed modes (a frozen batch norm) come back as they were
    got = embed(backbone, x)
    assert backbone.training and not backbone.net.bn1.training
    assert all(m.training for m in backbone.modules() if m is not backbone.net.bn1)
    assert torch.equal(got, expected)  # eval-mode batch norm: running statistics, not the batch's
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, stats[name]), f"{name} changed"  # running statistics untouched
    assert not got.requires_grad
