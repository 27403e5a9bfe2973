"""Weighted moments from marginal sums (maskreg.engine.moments) against every voxel's physical point, on oblique,
anisotropic grids in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maskreg.engine.grid import Grid
from maskreg.engine.moments import weighted_moments


def _oblique_grid(dim: int) -> Grid:
    img = sitk.Image([13, 9, 7][:dim], sitk.sitkFloat32)
    img.SetSpacing([0.7, 1.3, 2.9][:dim])
    img.SetOrigin([-12.0, 40.5, 7.25][:dim])
    if dim == 3:
        r = sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()
    else:
        c, s = np.cos(0.4), np.sin(0.4)
        r = (c, -s, s, c)
    img.SetDirection(r)
    return Grid.of(img)


@pytest.mark.parametrize("dim", [2, 3])
def test_weighted_moments_equal_the_brute_force_sums(dim):
    grid = _oblique_grid(dim)
    g = torch.Generator().manual_seed(dim)
    weight = torch.rand(1, 1, *grid.shape, generator=g) * (torch.rand(1, 1, *grid.shape, generator=g) > 0.4)
    total, com, cov = weighted_moments(weight, grid)
    # brute force: each voxel's index (x-first) to LPS mm
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, dim)[:, ::-1]
    m = grid.index_to_physical()
    pts = idx @ m[:dim, :dim].T + m[:dim, dim]
    w = weight.double().numpy().reshape(-1)
    ref_com = (w[:, None] * pts).sum(0) / w.sum()
    d = pts - ref_com
    ref_cov = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w.sum()
    assert total == pytest.approx(w.sum(), rel=1e-5)
    assert np.allclose(com, ref_com, atol=1e-4)
    assert np.allclose(cov, ref_cov, atol=1e-3, rtol=1e-5)
    assert abs(cov[0, 1]) > 0.1  # the oblique grid gives cross terms: their signs and order are tested too
