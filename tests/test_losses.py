"""The losses' closed-form histograms and gradients equal plain autograd through the textbook formulas."""

from __future__ import annotations

import pytest
import torch

from maskreg.engine import losses


def textbook_joint_histogram(fixed, moving, weight, bins: int) -> torch.Tensor:
    """Mattes' Parzen joint histogram by the formula, through plain autograd: intensities in [0, 1] (clamped)
    mapped to bins 2..bins-3, the fixed value to its nearest bin, the moving one spread over bins ``j`` by the
    cubic B-spline ``β₃(mv - j)``, weighted, normalised to sum 1."""
    f, m, w = fixed.reshape(-1), moving.reshape(-1), weight.reshape(-1)
    usable = bins - 5
    fb = (f.clamp(0, 1) * usable + 2).round().long()
    mv = m.clamp(0, 1) * usable + 2
    j = torch.arange(bins, dtype=mv.dtype)
    d = (mv[:, None] - j[None, :]).abs()
    beta = torch.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, torch.where(d < 2, (2 - d) ** 3 / 6, torch.zeros_like(d)))
    rows = torch.nn.functional.one_hot(fb, bins).to(mv.dtype)  # [N, bins]: each point's fixed bin
    hist = (rows * w[:, None]).T @ beta  # [fixed bin, moving bin]
    return hist / hist.sum()


def entropies(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H(F), H(M) and H(F, M) of a joint histogram (0 log 0 = 0)."""

    def h(q):
        return -(q * torch.log(q.clamp_min(1e-10))).sum()

    return h(p.sum(1)), h(p.sum(0)), h(p)


def _inputs(seed: int, shape=(1, 1, 9, 11, 13)):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64)
    moving = torch.rand(shape, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some values outside [0, 1]
    weight = (torch.rand(shape, generator=g, dtype=torch.float64) > 0.3).double()
    return fixed, moving, weight


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bins", [16, 32])
def test_parzen_histogram_and_mi_gradient_match_autograd(seed, bins):
    fixed, moving, weight = _inputs(seed)
    ref = textbook_joint_histogram(fixed, moving, weight, bins)
    got = losses.joint_histogram(fixed, moving, weight, bins)
    assert torch.allclose(got, ref, atol=1e-12)
    assert abs(float(got.sum()) - 1.0) < 1e-12

    m1 = moving.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(losses.mattes_mi(fixed, m1, weight, bins=bins), [m1])
    m2 = moving.clone().requires_grad_(True)
    hf, hm, hfm = entropies(textbook_joint_histogram(fixed, m2, weight, bins))
    (g2,) = torch.autograd.grad(-(hf + hm - hfm), [m2])
    assert g1.abs().max() > 0
    assert torch.allclose(g1, g2, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("name", ["mse", "gc", "mi", "nmi"])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_pointwise_gradients_match_autograd(name, seed):
    """The value-and-gradient forms the point sampler uses (no autograd) equal autograd through the losses,
    with values outside [0, 1] (clamped: gradient 0 there) and partial weights."""
    fixed, moving, weight = _inputs(seed, shape=(1, 1, 4000))
    weight = weight * torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = moving.clone().requires_grad_(True)
    ref = losses.LOSSES[name](fixed, m, weight, bins=32)
    (g_ref,) = torch.autograd.grad(ref, [m])
    val, g = losses.VALUE_AND_GRAD[name](fixed, moving, weight, bins=32)
    assert float(val) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert g.shape == moving.shape and g_ref.abs().max() > 0
    assert torch.allclose(g, g_ref, atol=1e-12, rtol=1e-8)


def test_global_cc_is_ants_gc_the_squared_weighted_pearson_correlation():
    """``gc`` is ``−r²`` with ``r`` the weighted Pearson correlation (numpy's ``cov`` with analytic weights);
    blind to a linear intensity map, an inverted contrast included; voxels of weight 0 count for nothing."""
    import numpy as np

    fixed, noise, weight = _inputs(3, shape=(1, 1, 3000))
    weight = weight * torch.rand(weight.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moving = 0.6 * fixed + 0.4 * noise
    f, m, w = (t.flatten().numpy() for t in (fixed, moving, weight))
    c = np.cov(np.stack([f, m]), aweights=w)
    r2 = c[0, 1] ** 2 / (c[0, 0] * c[1, 1])
    assert 0.01 < r2 < 0.99
    assert float(losses.global_cc(fixed, moving, weight)) == pytest.approx(-r2, rel=1e-10)
    assert float(losses.global_cc(fixed, 5.0 - 3.0 * moving, weight)) == pytest.approx(-r2, rel=1e-10)
    outside = weight == 0
    assert bool(outside.any())
    scrambled = torch.where(outside, torch.randn_like(moving) * 100.0, moving)
    assert float(losses.global_cc(fixed, scrambled, weight)) == pytest.approx(-r2, rel=1e-10)
    assert float(losses.global_cc(fixed, fixed, weight)) == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.parametrize("window", [3, 5])
def test_local_cc_gradient_matches_autograd(window):
    fixed, moving, weight = _inputs(7)
    m1 = moving.clone().requires_grad_(True)
    l1 = losses.local_cc(fixed, m1, weight, window=window)
    (g1,) = torch.autograd.grad(l1, [m1])
    m2 = moving.clone().requires_grad_(True)
    l2 = losses.local_cc_autograd(fixed, m2, weight, window=window)
    (g2,) = torch.autograd.grad(l2, [m2])
    assert torch.allclose(l1, l2, atol=1e-12)
    assert g1.abs().max() > 0
    assert torch.allclose(g1, g2, atol=1e-10, rtol=1e-7)


def test_local_cc_over_region_counts_what_leaves_the_overlap():
    """The linear stages' cc: ``-Σ w cc² / region``. Its value is :func:`local_cc`'s times the overlap's share of
    the region, and it has a gradient in the weight, so a voxel leaving the overlap (its weight falling) raises
    the loss instead of being free."""
    from maskreg.engine.losses import local_cc_autograd, local_cc_over_region

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 24, 20, generator=g)
    moving = fixed + 0.3 * torch.rand(1, 1, 24, 20, generator=g)
    weight = torch.ones(1, 1, 24, 20)
    weight[..., :, 15:] = 0.0  # a quarter of the region outside the overlap
    region = 24 * 20.0
    w = weight.clone().requires_grad_(True)
    value = local_cc_over_region(fixed, moving, w, region, window=5)
    expected = local_cc_autograd(fixed, moving, weight, window=5) * float(weight.sum()) / region
    assert torch.allclose(value, expected, atol=1e-6)
    (grad,) = torch.autograd.grad(value, [w])
    inside = weight > 0
    assert float(grad[inside].mean()) < 0  # more weight in the overlap lowers the loss
