"""Weighted image moments in physical space (LPS mm), from marginal sums.

The centre of mass and the second central moments of a weight image ``w`` (``[1, 1, (z,) y, x]``, e.g. a mask
or mask × intensity) need only sums of ``w`` against 1, ``i_a`` and ``i_a i_b`` (voxel indices), so each is a
sum over a 1D or 2D marginal of ``w``: three reductions of the full image in 3D (one per pair of axes) instead
of listing every voxel's physical point, which is several times slower. The index moments map to physical
space through the grid's affine ``p = M i + o``: ``com = M μ + o``, ``cov = M C Mᵀ``.
"""

from __future__ import annotations

import numpy as np
import torch

from maskreg.engine.grid import Grid


def weighted_moments(weight: torch.Tensor, grid: Grid) -> tuple[float, np.ndarray, np.ndarray]:
    """``(Σ w, centre of mass (dim,) in mm, covariance (dim, dim) in mm²)`` of ``weight`` on ``grid``
    (float64 numpy, physical LPS; the covariance is the weighted mean of ``(p − com)(p − com)ᵀ``). Weights
    must be ≥ 0 with a positive sum."""
    w = weight[0, 0]
    dim = w.dim()
    # pair marginals in tensor-axis order (a < b): w summed over every other axis, float64 from there on
    pairs: dict[tuple[int, int], torch.Tensor] = {}
    if dim == 2:
        pairs[(0, 1)] = w.double()
    else:
        for a in range(dim):
            for b in range(a + 1, dim):
                others = tuple(k for k in range(dim) if k not in (a, b))
                pairs[(a, b)] = w.sum(others).double()
    singles = {}
    for (a, b), m in pairs.items():
        singles.setdefault(a, m.sum(1))
        singles.setdefault(b, m.sum(0))
    coords = [torch.arange(w.shape[k], dtype=torch.float64, device=w.device) for k in range(dim)]
    total = singles[0].sum()
    mean = torch.stack([(coords[k] * singles[k]).sum() for k in range(dim)]) / total
    second = torch.zeros(dim, dim, dtype=torch.float64, device=w.device)
    for k in range(dim):
        second[k, k] = (coords[k] ** 2 * singles[k]).sum()
    for (a, b), m in pairs.items():
        second[a, b] = second[b, a] = (coords[a][:, None] * coords[b][None, :] * m).sum()
    cov_t = second / total - mean[:, None] * mean[None, :]
    # tensor order (z, y, x) -> index order (x, y, z)
    mu = mean.flip(0).cpu().numpy()
    cov_i = cov_t.flip(0, 1).cpu().numpy()
    m = grid.index_to_physical()
    lin, off = m[:dim, :dim], m[:dim, dim]
    return float(total), lin @ mu + off, lin @ cov_i @ lin.T
