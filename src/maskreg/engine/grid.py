"""Image grids and the coordinate maps between voxel indices, LPS physical points and torch's sampling space.

Conventions
-----------
* ``index`` is a continuous voxel index in SimpleITK order ``(i, j[, k])`` = ``(x, y[, z])``.
* ``physical`` is ITK LPS in mm: ``p = origin + D @ diag(spacing) @ index``.
* ``normalised`` is what ``torch.nn.functional.grid_sample(..., align_corners=True)`` reads: ``n = 2 * index /
  (size - 1) - 1`` per axis, components in the same ``(x, y[, z])`` order. Tensors hold arrays in reverse
  order ``[N, C, (z,) y, x]``, which is exactly how ``grid_sample`` pairs its last grid dimension with the
  tensor's spatial dimensions, so no axis flips are needed anywhere.
All matrices here are homogeneous ``(dim+1, dim+1)`` float64 numpy arrays.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """Geometry of an image: ``size`` (voxels, x-first), ``spacing`` (mm), ``origin`` (mm), ``direction``."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major dim*dim, as SimpleITK stores it

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
        )

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array/tensor shape, reverse of ``size``: ``(z, y, x)`` or ``(y, x)``."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.dim, self.dim)

    def index_to_physical(self) -> np.ndarray:
        """Homogeneous matrix mapping a voxel index to an LPS point (mm)."""
        m = np.eye(self.dim + 1)
        m[: self.dim, : self.dim] = self.direction_matrix @ np.diag(self.spacing)
        m[: self.dim, self.dim] = self.origin
        return m

    def centre(self) -> np.ndarray:
        """The centre of the grid's extent (the voxel index ``(size - 1) / 2``) as an LPS point (mm), ``(dim,)``."""
        index = (np.asarray(self.size, dtype=np.float64) - 1) / 2
        return self.index_to_physical()[: self.dim] @ np.append(index, 1.0)

    def physical_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_physical())

    def index_to_normalised(self) -> np.ndarray:
        """Homogeneous matrix mapping a voxel index to ``grid_sample`` coordinates (align_corners=True)."""
        m = np.eye(self.dim + 1)
        for a, n in enumerate(self.size):
            m[a, a] = 2.0 / max(n - 1, 1)
            m[a, self.dim] = -1.0
        return m

    def normalised_to_physical(self) -> np.ndarray:
        return self.index_to_physical() @ np.linalg.inv(self.index_to_normalised())

    def physical_to_normalised(self) -> np.ndarray:
        return np.linalg.inv(self.normalised_to_physical())

    def shrink(self, factors: tuple[int, ...], pads: tuple[int, ...] | None = None) -> Grid:
        """A coarser grid over the same physical box: spacing ``*f`` per axis; voxel ``j`` of the coarse grid
        is centred on the centre of fine voxels ``f*j - p ... f*j - p + f-1`` (fine index ``= f*j + (f-1)/2 - p``),
        ``p`` the ``pads`` (x-first, default 0): the fine grid as if it had ``p`` more voxels before its first
        (see :meth:`lattice_pads`)."""
        pads = tuple(pads) if pads is not None else (0,) * self.dim
        size = tuple(max(1, math.ceil((n + p) / f)) for n, f, p in zip(self.size, factors, pads, strict=False))
        spacing = tuple(s * f for s, f in zip(self.spacing, factors, strict=False))
        shift = np.array([(f - 1) / 2.0 - p for f, p in zip(factors, pads, strict=False)])
        origin = self.index_to_physical()[: self.dim] @ np.append(shift, 1.0)
        return Grid(size, spacing, tuple(float(v) for v in origin), self.direction)

    def lattice_pads(self, factors: tuple[int, ...]) -> tuple[int, ...]:
        """Pads (x-first) for :meth:`shrink` that put a coarse voxel's first fine voxel on the fine voxel holding
        the world origin (0, 0, 0), and so on every ``f``-th voxel from it: the coarse voxels are then the same
        fine voxels whatever the field of view, and a crop of an image (or a larger scan of the same scene) gets
        the same pyramid where the two overlap. The fine index of a point is computed, so the voxel whose
        boundary passes through the origin is taken by a rounding made stable against float noise."""
        origin_index = (self.physical_to_index() @ np.append(np.zeros(self.dim), 1.0))[: self.dim]
        return tuple(
            int((-math.floor(v + 0.5 + 1e-3)) % f) if f > 1 else 0 for v, f in zip(origin_index, factors, strict=False)
        )

    def crop(self, start: tuple[int, ...], size: tuple[int, ...]) -> Grid:
        """The sub-grid of ``size`` voxels starting at voxel index ``start`` (both x-first): same spacing and
        direction, its voxel ``j`` is this grid's voxel ``start + j``."""
        origin = self.index_to_physical() @ np.append(np.asarray(start, dtype=np.float64), 1.0)
        return Grid(
            tuple(int(n) for n in size), self.spacing, tuple(float(v) for v in origin[: self.dim]), self.direction
        )

    def covering_crop(self, other: Grid) -> Grid:
        """The smallest :meth:`crop` of this grid whose voxel centres span ``other``'s (its corner voxel
        centres mapped into this grid's indices, rounded outward, clipped to this grid). ``other`` a crop of this
        grid: the same grid."""
        corners = np.array(list(itertools.product(*[(0, n - 1) for n in other.size])), dtype=np.float64)
        m = self.physical_to_index() @ other.index_to_physical()
        idx = corners @ m[: self.dim, : self.dim].T + m[: self.dim, self.dim]
        lo = np.clip(np.floor(idx.min(0) + 1e-6), 0, np.asarray(self.size) - 1).astype(int)
        hi = np.clip(np.ceil(idx.max(0) - 1e-6), 0, np.asarray(self.size) - 1).astype(int)
        return self.crop(tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo + 1))

    def corner_aligned(self, size: tuple[int, ...]) -> Grid:
        """A grid of ``size`` voxels (x-first) whose first and last voxel centres are this grid's (same origin
        and direction, spacing ``s (n-1)/(m-1)``): ``F.interpolate(..., align_corners=True)`` between the two
        is exact (multi)linear resampling in physical space."""
        spacing = tuple(
            s * (n - 1) / (m - 1) if m > 1 else s for s, n, m in zip(self.spacing, self.size, size, strict=False)
        )
        return Grid(tuple(int(m) for m in size), spacing, self.origin, self.direction)

    def to_image(self, array: np.ndarray | None = None, pixel=sitk.sitkFloat32) -> sitk.Image:
        """A SimpleITK image on this grid, from ``array`` (shape ``self.shape``) or zeros."""
        if array is None:
            img = sitk.Image(list(self.size), pixel)
        else:
            img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def voxel_count(self) -> int:
        return int(np.prod(self.size))


def shrink_factors(spacing: tuple[float, ...], scale: int) -> tuple[int, ...]:
    """Per-axis shrink factors for pyramid level ``scale``: aim at an isotropic level spacing of
    ``scale * min(spacing)`` so thick-slice axes are not shrunk as much as fine ones (at least 1)."""
    target = scale * min(spacing)
    return tuple(max(1, int(round(target / s))) for s in spacing)


def resampling_theta(out_grid: Grid, in_grid: Grid, out_to_in_physical: np.ndarray) -> np.ndarray:
    """``(dim, dim+1)`` matrix for ``F.affine_grid``: output normalised coords → input normalised coords,
    through the physical map ``out_to_in_physical`` (homogeneous, LPS mm, out point → in point)."""
    m = in_grid.physical_to_normalised() @ out_to_in_physical @ out_grid.normalised_to_physical()
    return m[: out_grid.dim]
