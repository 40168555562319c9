"""NT-Xent, InfoNCE and SimSiam's negative cosine against plain references."""

from __future__ import annotations

import math

import pytest
import torch

from inco_core.losses.infonce import info_nce
from inco_core.losses.negcos import negative_cosine
from inco_core.losses.ntxent import nt_xent


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _nt_xent_reference(z1: list[list[float]], z2: list[list[float]], tau: float) -> float:
    """SimCLR eq. 1 with explicit loops: anchors 0..2B-1, positive of k is (k + B) mod 2B."""
    z = [_unit(v) for v in z1 + z2]
    n2 = len(z)
    b = n2 // 2
    total = 0.0
    for a in range(n2):
        sims = [sum(x * y for x, y in zip(z[a], z[c], strict=True)) / tau for c in range(n2)]
        denom = sum(math.exp(sims[c]) for c in range(n2) if c != a)
        total += -math.log(math.exp(sims[(a + b) % n2]) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(tau: float) -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    expected = _nt_xent_reference(z1.tolist(), z2.tolist(), tau)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-9)


def test_nt_xent_is_symmetric_and_scale_invariant() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(nt_xent(z2, z1, 0.5).item(), rel=1e-6)
    assert nt_xent(3 * z1, z2, 0.5).item() == pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-5)


def test_nt_xent_lower_for_aligned_pairs() -> None:
    torch.manual_seed(2)
    z1 = torch.randn(16, 32)
    aligned = nt_xent(z1, z1 + 0.05 * torch.randn_like(z1), 0.5)
    unrelated = nt_xent(z1, torch.randn_like(z1), 0.5)
    assert aligned.item() < unrelated.item() - 1.0


def test_nt_xent_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), 0.0)


def test_info_nce_matches_hand_computed_value() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, -0.6]])
    tau = 0.5
    # query 0: logits [0.6, 1, -1, 0.8] / tau; query 1: logits [1, 0, 0, -0.6] / tau
    rows = [[0.6, 1.0, -1.0, 0.8], [1.0, 0.0, 0.0, -0.6]]
    expected = sum(-math.log(math.exp(r[0] / tau) / sum(math.exp(x / tau) for x in r)) for r in rows) / 2
    assert info_nce(q, k, queue, tau).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_rejects_bad_input() -> None:
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, q, torch.randn(5, 3), 0.2)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(q, torch.randn(2, 4), torch.randn(5, 4), 0.2)


def test_negative_cosine_value_and_stop_gradient() -> None:
    torch.manual_seed(3)
    p = torch.randn(4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    loss = negative_cosine(p, z)
    cos = [
        sum(a * b for a, b in zip(_unit(pi), _unit(zi), strict=True))
        for pi, zi in zip(p.tolist(), z.tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(-sum(cos) / len(cos), rel=1e-6)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None
    assert negative_cosine(z, 2 * z).item() == pytest.approx(-1.0, abs=1e-6)


def test_negative_cosine_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        negative_cosine(torch.randn(4, 6), torch.randn(4, 5))
