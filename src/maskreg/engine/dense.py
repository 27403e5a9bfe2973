"""Dense sampling of a level: the fixed image, the moving image warped by a homogeneous matrix and the weight, on
every voxel of the fixed level (losses with neighbourhoods, overlap reports, scoring candidate poses)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from maskreg.engine.grid import Grid
from maskreg.engine.pyramid import Level
from maskreg.engine.sampling import grid_sample_inside


def level_maps(fixed_grid: Grid, moving_grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-side grid's normalised → physical and the moving level's physical → normalised matrices
    (homogeneous, float32), computed once per level (the fixed side: a level's grid or its ROI box)."""
    return (
        torch.as_tensor(fixed_grid.normalised_to_physical(), dtype=torch.float32, device=device),
        torch.as_tensor(moving_grid.physical_to_normalised(), dtype=torch.float32, device=device),
    )


def level_theta(h: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], dim: int) -> torch.Tensor:
    """``(1, dim, dim+1)`` affine_grid matrix: fixed-level normalised → moving-level normalised."""
    n_f, p_m = maps
    return (p_m @ h @ n_f)[None, :dim]


class AffineGrid:
    """``F.affine_grid(theta, [1, 1, *shape], align_corners=True)`` by broadcasting one normalised coordinate
    vector per axis: ``grid = Σ_a c_a θ[:, a] + θ[:, dim]``, one full-size operation instead of a batched
    matrix product over every voxel (no cuBLAS: nothing per-stream to allocate inside a CUDA graph)."""

    def __init__(self, shape: Sequence[int], device: torch.device):
        dim = len(shape)
        self.dim = dim
        self.coords = []
        for a in range(dim):  # a: x, y[, z]; tensor axis dim - 1 - a
            n = shape[dim - 1 - a]
            c = torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            view = [1] * (dim + 2)
            view[1 + (dim - 1 - a)] = n
            self.coords.append(c.reshape(view))

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``[1, *shape, dim]`` normalised sampling grid of ``theta`` ``(1, dim, dim+1)``."""
        t = theta[0]
        g = self.coords[0] * t[:, 0] + t[:, self.dim]
        for a in range(1, self.dim):
            g = g + self.coords[a] * t[:, a]
        return g


class DenseSampler:
    """Evaluates ``(fixed, warped moving, weight)`` on every voxel of the fixed level (dense: for losses with
    neighbourhoods, for overlap reports and for scoring candidate starts). Pointwise losses of the linear
    stages use :class:`maskreg.engine.points.PointLoss` instead."""

    def __init__(self, fl: Level, ml: Level, f_norm, m_norm):
        self.fl, self.ml = fl, ml
        self.f = f_norm
        self.maps = level_maps(fl.grid, ml.grid, f_norm.device)
        self.affine_grid = AffineGrid(fl.grid.shape, f_norm.device)
        # moving image and mask sampled in one call: zero padding is exact for the image too, since points
        # outside the moving grid ([-1, 1] with align_corners) get weight 0 through ``inside``
        self.moving_and_mask = torch.cat([m_norm, ml.mask], 1)

    def __call__(self, h: torch.Tensor):
        grid = self.affine_grid(level_theta(h, self.maps, self.fl.grid.dim))
        both, ins = grid_sample_inside(self.moving_and_mask, grid)
        warped, mm = both[:, :1], both[:, 1:]
        w = self.fl.mask * mm * ins
        return self.f, warped, w


def dense_overlap(sampler_dense: DenseSampler, h: torch.Tensor, fixed_mask_sum: float) -> tuple[float, int, float]:
    with torch.no_grad():
        _, _, w = sampler_dense(h)
    total = float(w.sum())
    return total, int((w > 0.5).sum()), total / max(fixed_mask_sum, 1e-9)
