"""The CPU-split grid_sample, spatial gradients on oblique anisotropic grids, and the coarse exponentials of the
SyN iteration."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from maskreg.engine import fields as dfm
from maskreg.engine.grid import Grid
from maskreg.engine.sampling import grid_sample


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("shape", [(23, 17, 9), (5, 3, 4)])
def test_split_grid_sample_is_bit_identical(shape, padding, torch_kernels):
    torch.manual_seed(0)
    x = torch.randn(1, 3, *shape)
    g = torch.rand(1, *shape, 3) * 2.4 - 1.2  # some points outside: padding matters
    ref = F.grid_sample(x, g, padding_mode=padding, align_corners=True)
    assert torch.equal(grid_sample(x, g, padding_mode=padding), ref)


def test_split_grid_sample_points_batch_and_gradient(torch_kernels):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 20, 30, 40)
    pts = torch.rand(1, 12347, 1, 1, 3) * 2 - 1  # mask-direct layout, a length no piece count divides
    a, b = pts.clone().requires_grad_(), pts.clone().requires_grad_()
    ya = F.grid_sample(x, a, align_corners=True)
    yb = grid_sample(x, b)
    assert torch.equal(ya, yb)
    ga = torch.autograd.grad(ya.pow(2).sum(), a)[0]
    gb = torch.autograd.grad(yb.pow(2).sum(), b)[0]
    assert torch.equal(ga, gb)
    assert ga.abs().sum() > 0
    # a batch of two fields sampled at their own grids (exp_pair's layout)
    x2, g2 = torch.randn(2, 3, 10, 11, 12), torch.rand(2, 10, 11, 12, 3) * 2 - 1
    assert torch.equal(grid_sample(x2, g2), F.grid_sample(x2, g2, align_corners=True))


def _oblique_grid() -> Grid:
    img = sitk.Image([31, 24, 17], sitk.sitkFloat32)
    img.SetSpacing([1.2, 0.9, 2.5])
    img.SetOrigin([-14.0, 7.5, 30.0])
    rot = sitk.VersorTransform([0.3, -0.5, 0.8], 0.6)  # an oblique orientation
    img.SetDirection(rot.GetMatrix())
    return Grid.of(img)


def test_spatial_gradient_of_a_linear_function_is_exact_in_physical_space():
    grid = _oblique_grid()
    ops = dfm.FieldOps(grid, torch.device("cpu"))
    # f(p) = a·p + c over the physical points of the grid (LPS mm)
    a = np.array([0.7, -1.3, 0.4])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), -1).reshape(-1, 3)
    m = grid.index_to_physical()
    pts = idx @ m[:3, :3].T + m[:3, 3]
    vals = (pts @ a + 5.0).reshape(grid.size).transpose(2, 1, 0)  # x-first -> tensor order (z, y, x)
    t = torch.as_tensor(vals, dtype=torch.float32)[None, None]
    g = ops.spatial_gradient(t)
    assert g.shape == (1, 3, *grid.shape)
    got = g.reshape(3, -1).mean(1).numpy()
    np.testing.assert_allclose(got, a, atol=1e-3)
    assert float((g - torch.as_tensor(a, dtype=torch.float32).reshape(1, 3, 1, 1, 1)).abs().max()) < 2e-3


def test_corner_aligned_grid_keeps_first_and_last_voxel_centres():
    grid = _oblique_grid()
    c = grid.corner_aligned((16, 12, 9))
    for g_idx, c_idx in (((0, 0, 0), (0, 0, 0)), ((30, 23, 16), (15, 11, 8))):
        p1 = grid.index_to_physical() @ np.append(g_idx, 1.0)
        p2 = c.index_to_physical() @ np.append(c_idx, 1.0)
        np.testing.assert_allclose(p1, p2, atol=1e-9)


def test_coarse_exponentials_match_the_full_grid_for_a_smooth_velocity():
    img = sitk.Image([96, 80, 72], sitk.sitkFloat32)
    img.SetSpacing([1.5, 1.5, 2.0])
    ops = dfm.FieldOps(Grid.of(img), torch.device("cpu"), coarse_exp=True)
    assert ops.coarse is not None and ops.coarse.grid.voxel_count() * 6 < ops.grid.voxel_count()
    torch.manual_seed(2)
    v = dfm.gaussian_blur(torch.randn(1, 3, *ops.grid.shape) * 60.0, (4.0, 4.0, 4.0))
    vmax = ops.max_voxels(v)
    assert 1.0 < vmax < 20.0
    exact = ops.exp_pair(0.5 * v)
    fast = ops.exp_pair_in_iteration(0.5 * v, ops.iteration_squarings(0.5 * vmax))
    # measured 5 % (mean) and 8 % (max), almost all from interpolating down and back up (the same error as
    # interpolating the exact result down and up); more squarings do not change it
    for e, f in zip(exact, fast, strict=False):
        err = (e - f).pow(2).sum(1).sqrt()
        assert float(err.mean()) < 0.08 * float(e.pow(2).sum(1).sqrt().mean())
        assert float(err.max()) < 0.12 * float(e.pow(2).sum(1).sqrt().max())
    # forward and inverse halves still cancel
    uf, um = fast
    assert float(ops.compose(uf, um).pow(2).sum(1).sqrt().mean()) < 0.05
