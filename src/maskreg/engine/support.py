"""Where a deformable iteration's loss weight can be nonzero, as x ranges per row of the level's box.

The weight of a deformable level is ``w(x) = F_mask(x + u₋(x)) · M_mask(...) · inside``: zero wherever the
fixed mask, sampled where the fixed image has moved (SyN's half-way map ``u₋ = exp(-v/2)``; greedy: not at
all), is zero. Trilinear sampling of a binary mask is nonzero only within one voxel of a mask voxel, and
``|u₋(x)| <= max|v| / 2`` (each squaring at most doubles the largest vector; interpolation never exceeds it).
So ``w`` vanishes outside the fixed mask grown by ``max|v|/2`` mm and one voxel per axis, and the gradient
of the loss, the sampled images' central differences included, outside one voxel more. Sampling only there
gives the same loss and gradient to the bit, for every masked loss (a weight of 0 takes nothing from a
sample), and skips the empty corners of the box around a round organ (the mask fills only part of its box).

The growth is a box per axis (``ceil(reach / spacing_a) + 2`` voxels along index axis ``a``), a superset of
the Euclidean one, computed on the mask's row extents (a ``Z x Y`` table) by 2D min/max filters: no 3D
distance map per iteration.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

_EMPTY = np.iinfo(np.int64).max // 4  # lo of a row without mask voxels (and -_EMPTY its hi)


class WeightSupport:
    """Rows of a level box where the loss weight can be nonzero, for a displacement bound given per call.

    ``mask``: the fixed mask on the box, array ``[Z, Y, X]`` (nonzero = inside); ``spacing``: the box's voxel
    spacing in mm, x first."""

    def __init__(self, mask: np.ndarray, spacing: tuple[float, ...]):
        inside = np.asarray(mask) > 0
        self.shape = inside.shape
        z, y, x = self.shape
        any_x = inside.any(axis=2)
        self._lo = np.where(any_x, inside.argmax(axis=2), _EMPTY).astype(np.int64)
        self._hi = np.where(any_x, x - 1 - inside[:, :, ::-1].argmax(axis=2), -_EMPTY).astype(np.int64)
        self.spacing_zyx = tuple(float(s) for s in reversed(spacing))
        self._cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def radii(self, reach_mm: float) -> tuple[int, int, int]:
        """Voxels to grow the mask by along (z, y, x) for displacements up to ``reach_mm``: the reach rounded up
        (trilinear support included: a point less than one voxel from a mask voxel), one voxel for the sampled
        images' central differences and one for rounding."""
        return tuple(int(math.ceil(max(reach_mm, 0.0) / s - 1e-9)) + 2 for s in self.spacing_zyx)

    def rows(self, reach_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` int64 ``[Z, Y]``: the x range ``[lo, hi)`` of each row to sample (``lo = hi = 0``: none)."""
        r = self.radii(reach_mm)
        got = self._cache.get(r)
        if got is None:
            rz, ry, rx = r
            size = (2 * rz + 1, 2 * ry + 1)
            lo = ndimage.minimum_filter(self._lo, size=size, mode="constant", cval=_EMPTY) - rx
            hi = ndimage.maximum_filter(self._hi, size=size, mode="constant", cval=-_EMPTY) + rx + 1
            x = self.shape[2]
            lo, hi = np.clip(lo, 0, x), np.clip(hi, 0, x)
            empty = lo >= hi
            lo[empty] = hi[empty] = 0
            got = self._cache[r] = (np.ascontiguousarray(lo), np.ascontiguousarray(hi))
        return got

    def fraction(self, reach_mm: float) -> float:
        """Share of the box's voxels :meth:`rows` covers."""
        lo, hi = self.rows(reach_mm)
        return float((hi - lo).sum()) / float(np.prod(self.shape))
