from __future__ import annotations

import pytest
import torch

from inco_core.augment import PIXEL_MEAN, PIXEL_STD, augment_views, to_input
from inco_core.config import AugmentConfig
from inco_core.data import ImageSet

IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0.0, contrast=0.0, hflip=0.0, vflip=0.0)


def test_shapes_layout_and_range(neu32: ImageSet) -> None:
    x = neu32.images[:8]
    v = augment_views(x, 5, AugmentConfig(), torch.Generator().manual_seed(0), out_size=24)
    assert v.shape == (40, 1, 24, 24) and v.dtype == torch.float32
    pixels = v * PIXEL_STD + PIXEL_MEAN
    assert pixels.min() >= 0 and pixels.max() <= 1 + 1e-6
    assert not torch.allclose(v[:8], v[8:16])  # views differ


def test_seeded_and_repeatable(neu32: ImageSet) -> None:
    x = neu32.images[:4]
    a = augment_views(x, 3, AugmentConfig(), torch.Generator().manual_seed(1))
    b = augment_views(x, 3, AugmentConfig(), torch.Generator().manual_seed(1))
    c = augment_views(x, 3, AugmentConfig(), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_identity_and_exact_flips(neu32: ImageSet) -> None:
    x = neu32.images[:4]
    same = augment_views(x, 2, AugmentConfig(**IDENTITY), torch.Generator().manual_seed(0))
    assert torch.allclose(same, to_input(x).repeat(2, 1, 1, 1), atol=1e-5)
    h = augment_views(x, 1, AugmentConfig(**{**IDENTITY, "hflip": 1.0}), torch.Generator().manual_seed(0))
    assert torch.allclose(h, to_input(x).flip(-1), atol=1e-5)
    v = augment_views(x, 1, AugmentConfig(**{**IDENTITY, "vflip": 1.0}), torch.Generator().manual_seed(0))
    assert torch.allclose(v, to_input(x).flip(-2), atol=1e-5)


def test_brightness_scales_pixels(neu32: ImageSet) -> None:
    x = neu32.images[:2]
    out = augment_views(x, 1, AugmentConfig(**{**IDENTITY, "brightness": 0.5}), torch.Generator().manual_seed(0))
    ratio = (out * PIXEL_STD + PIXEL_MEAN).mean(dim=(1, 2, 3)) / (x.float() / 255).mean(dim=(1, 2, 3))
    assert ((ratio > 0.45) & (ratio < 1.55)).all() and not torch.allclose(ratio, torch.ones(2), atol=1e-3)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        augment_views(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), 2, AugmentConfig(), torch.Generator())
    with pytest.raises(ValueError, match="views"):
        augment_views(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 0, AugmentConfig(), torch.Generator())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda_with_a_cuda_generator(neu32: ImageSet) -> None:
    x = neu32.images[:8].cuda()
    v = augment_views(x, 5, AugmentConfig(), torch.Generator(device="cuda").manual_seed(0))
    assert v.is_cuda and v.shape == (40, 1, 32, 32)
