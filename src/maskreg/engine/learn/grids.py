"""The training grid: where a network sees a pair and predicts its field.

A training grid has the fixed image's direction cosines and a fixed number of voxels (``shape``, x first, each a
multiple of ``2^(levels-1)`` so the network's poolings divide it). It spans the fixed image's extent
(``grid: image``), or the fixed mask's bounding box grown by ``margin_mm`` (``grid: box``); its spacing is that
extent over ``shape - 1``, so every pair of a cohort is seen at the same number of voxels whatever its own grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maskreg.engine.grid import Grid

# an automatic shape halves the first training pair's fixed grid until its longest axis is at most this: the
# network's cost grows with the voxels, and on 2 CPU cores a 24 x 32 x 24 grid trains in minutes
MAX_AUTO_VOXELS = 40


def network_shape(size: tuple[int, ...], levels: int, cap: int = MAX_AUTO_VOXELS) -> tuple[int, ...]:
    """``size`` (voxels, x first) halved until its longest axis is at most ``cap``, then rounded up to a
    multiple of ``2^(levels-1)`` (the network's poolings must divide it)."""
    step = 2 ** max(levels - 1, 0)
    factor = 1
    while max(size) / factor > cap:
        factor *= 2
    return tuple(int(math.ceil(n / factor / step) * step) for n in size)


def training_grid(
    fixed: Grid, shape: tuple[int, ...], mask: torch.Tensor | None = None, margin_mm: float = 0.0
) -> Grid:
    """The grid of ``shape`` voxels over ``fixed``'s extent, or over the box of ``mask > 0`` (a ``[1, 1, *shape]``
    tensor on ``fixed``) grown by ``margin_mm``; the corners are voxel centres of both grids' extents."""
    dim = fixed.dim
    lo = np.zeros(dim)
    hi = np.asarray(fixed.size, dtype=np.float64) - 1.0
    if mask is not None:
        nz = torch.nonzero(mask[0, 0] > 0)
        if nz.numel():
            grow = margin_mm / np.asarray(fixed.spacing)
            lo = np.flip(nz.min(0).values.cpu().numpy()).astype(np.float64) - grow  # tensor order -> x first
            hi = np.flip(nz.max(0).values.cpu().numpy()).astype(np.float64) + grow
    extent = np.maximum(hi - lo, 1.0) * np.asarray(fixed.spacing)  # mm along each index axis
    spacing = tuple(float(e / max(n - 1, 1)) for e, n in zip(extent, shape, strict=True))
    origin = fixed.index_to_physical() @ np.append(lo, 1.0)
    return Grid(tuple(int(n) for n in shape), spacing, tuple(float(v) for v in origin[:dim]), fixed.direction)
