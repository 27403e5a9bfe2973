"""What a network reads: a pair resampled onto its training grid, the same way in training and in registration.

The fixed image is resampled onto the grid as it is; the moving image through the linear transform ``L`` (fixed →
moving points, LPS mm): ``m_L(x) = m(L(x))``, so the network's field ``u`` (on the grid) completes the transform as
the deformable stages' does, ``T(x) = L(x + u(x))``. Each image is scaled by robust percentiles of its values on
the grid, where it is defined (inside its own field of view).
"""

from __future__ import annotations

import torch

from maskreg.engine.grid import Grid
from maskreg.engine.losses import intensity_scale
from maskreg.engine.pyramid import resample
from maskreg.transforms import LinearTransform


def normalised(image: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
    """``image`` mapped to about [0, 1] by its 0.5 and 99.5 percentiles where ``defined > 0.5``."""
    off, sc = intensity_scale(image, (defined > 0.5).float())
    return (image - off) / sc


def on_grid(
    t: torch.Tensor, grid: Grid, target: Grid, linear: LinearTransform | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (``[1, C, *grid.shape]``) on ``target`` through ``linear`` (target point → ``grid`` point; identity
    when none), linear interpolation, zero padding; and where ``target``'s voxels fall inside ``grid``
    (``[1, 1, *target.shape]``, 1 inside)."""
    m = None if linear is None else linear.homogeneous()
    values = resample(t, grid, target, m)
    inside = resample(torch.ones_like(t[:, :1]), grid, target, m)
    return values, (inside > 0.999).float()


def network_inputs(
    fixed: torch.Tensor, fixed_grid: Grid, moving: torch.Tensor, moving_grid: Grid, linear: LinearTransform, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, moving through ``linear``, where the moving image is defined), each ``[1, 1, *grid.shape]``, the
    images normalised: the network's two input channels and the moving side's field of view."""
    f, f_in = on_grid(fixed, fixed_grid, grid)
    m, m_in = on_grid(moving, moving_grid, grid, linear)
    return normalised(f, f_in), normalised(m, m_in), m_in
