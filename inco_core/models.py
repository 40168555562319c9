"""ResNet18 backbone for one-channel images and the small heads the methods put on top."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

EMBED_DIM = 512


class Backbone(nn.Module):
    """torchvision ResNet18, random init, ``in_channels`` input, global average pooled output.

    forward: x [B, C, H, W] float -> z [B, 512], the embedding z of the paper.
    """

    embed_dim = EMBED_DIM

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a Linear: the projection / prediction heads of SimCLR, MoCo v2
    and SimSiam. ``last_bn`` adds an affine-free BatchNorm after the output (SimSiam's projector)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class Classifier(nn.Module):
    """Backbone plus a linear softmax classifier: [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def embed(backbone: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode embeddings without gradients: [B, C, H, W] -> [B, 512].

    The backbone runs in eval mode (batch norm uses, and leaves alone, its running statistics)
    whatever mode the caller left it in; each module's mode is restored afterwards.
    """
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        return backbone(x)
    finally:
        for module, training in modes:
            module.training = training
