"""Which slices the QC figures show and how they are oriented on screen.

Display conventions
-------------------
* 2D images are shown as stored: array rows (``y`` index) downwards, columns (``x`` index) to the right.
* 3D images are first reoriented (permute/flip only, no interpolation) to LPS index axes, as
  ``SimpleITK.DICOMOrient(img, "LPS")`` would, so that the views are truly axial, coronal and sagittal and
  appear in radiological convention: axial with anterior up and patient right on the left of the screen,
  coronal with superior up and patient right on the left, sagittal with superior up and anterior on the
  left. Centres are always given in the *original* voxel index (SimpleITK order ``x, y, z``) and are mapped
  to the reoriented grid through physical space.
* Pixels are drawn with their physical aspect ratio (``aspect`` = row spacing / column spacing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from maskreg.masks import centroid_index


def slice_indices(mask: sitk.Image | None, size: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Centre voxel (SimpleITK index order ``x, y[, z]``) for the views through ``mask``.

    The centre is the rounded centroid of ``mask > 0``. When the slice through the centroid along some axis
    holds no mask voxel (a hollow or C-shaped mask), that coordinate moves to the nearest slice that does,
    so every view shows part of the mask. With no mask, or an empty one, the centre of the image (or of
    ``size``) is returned.
    """
    if mask is None:
        if size is None:
            raise ValueError("slice_indices needs a mask or a size")
        return tuple(int(s // 2) for s in size)
    arr = sitk.GetArrayViewFromImage(mask) > 0
    if not arr.any():
        return tuple(int(s // 2) for s in mask.GetSize())
    centre = list(centroid_index(mask))  # (x, y[, z]), rounded centroid
    ndim = arr.ndim
    for sitk_axis in range(ndim):
        array_axis = ndim - 1 - sitk_axis
        others = tuple(a for a in range(ndim) if a != array_axis)
        occupied = np.flatnonzero(np.any(arr, axis=others))
        k = centre[sitk_axis]
        if k not in occupied:
            centre[sitk_axis] = int(occupied[np.argmin(np.abs(occupied - k))])
    return tuple(int(c) for c in centre)


@dataclass
class View:
    """One panel row of a figure: a slice direction through the display grid and how to draw it."""

    name: str  # "axial", "coronal", "sagittal" or "2D"
    k: int  # slice index in the display grid (unused for 2D)
    aspect: float  # row spacing / column spacing
    extent_mm: tuple[float, float]  # (height, width) of the panel in mm
    row_mm: float  # spacing of the panel's rows in mm
    col_mm: float  # spacing of the panel's columns in mm
    label: str  # row label shown at the left
    letters: tuple[str, str, str, str] | None  # left, right, top, bottom orientation letters


def _view(
    name: str,
    k: int,
    sp: tuple[float, ...],
    size: tuple[int, ...],
    row: int,
    col: int,
    label: str,
    letters: tuple[str, str, str, str] | None,
) -> View:
    """The view ``name`` through slice ``k`` whose panel rows run along grid axis ``row`` and columns along grid
    axis ``col`` (spacing in mm and size in voxels of the grid, both in ``x, y[, z]`` order)."""
    extent = (size[row] * sp[row], size[col] * sp[col])
    return View(name, k, sp[row] / sp[col], extent, sp[row], sp[col], label, letters)


def _lps_views(sp: tuple[float, ...], size: tuple[int, ...], center: tuple[int, ...], labels: list[str]) -> list[View]:
    """Axial, coronal and sagittal views through ``center`` of an LPS display grid (spacing in mm, size in
    voxels, both in ``x, y, z`` order); ``labels[a]`` names the original index of display axis ``a``."""
    cx, cy, cz = center
    return [
        _view("axial", cz, sp, size, 1, 0, f"axial\n{labels[2]}", ("R", "L", "A", "P")),
        _view("coronal", cy, sp, size, 2, 0, f"coronal\n{labels[1]}", ("R", "L", "S", "I")),
        _view("sagittal", cx, sp, size, 2, 1, f"sagittal\n{labels[0]}", ("A", "P", "S", "I")),
    ]


class Display:
    """Reorients images of one grid for display and cuts the views through a centre.

    For 3D the reorientation to LPS index axes is a permutation and flips of the array axes, done with numpy
    views (no copy of the volumes); it equals ``sitk.DICOMOrient(img, "LPS")``, which is used instead only
    for a direction matrix too oblique to assign each index axis to a distinct anatomical axis.
    """

    def __init__(self, ref: sitk.Image, center: tuple[int, ...]):
        self.dim = ref.GetDimension()
        self.orig = ref
        self._keep: list[sitk.Image] = []  # images whose array views are in use
        if self.dim == 2:
            sp, size = ref.GetSpacing(), ref.GetSize()
            self.center = tuple(int(c) for c in center)
            self.views = [_view("2D", 0, sp, size, 1, 0, "", None)]
            return
        d = np.asarray(ref.GetDirection()).reshape(3, 3)
        src = [int(np.argmax(np.abs(d[a, :]))) for a in range(3)]  # display axis a <- index axis src[a]
        self.permute = sorted(src) == [0, 1, 2]
        if self.permute:
            sp, size, c = self._permuted_grid(ref, center, d, src)
        else:
            sp, size, c, src = self._oriented_grid(ref, center, d)
        self.center = tuple(int(min(max(v, 0), n - 1)) for v, n in zip(c, size, strict=False))
        labels = [f"{'xyz'[src[a]]} = {int(center[src[a]])}" for a in range(3)]
        self.views = _lps_views(sp, size, self.center, labels)

    def _permuted_grid(self, ref: sitk.Image, center: tuple[int, ...], d: np.ndarray, src: list[int]):
        """Spacing, size and centre on the display grid when it is a permutation and flips of the index axes;
        sets the array transpose and flips that :meth:`array` applies."""
        size0, sp0 = ref.GetSize(), ref.GetSpacing()
        flip = [bool(d[a, src[a]] < 0) for a in range(3)]
        self.axes = tuple(2 - src[2 - j] for j in range(3))  # array-axis transpose
        self.flips = tuple(flip[2 - j] for j in range(3))  # per display array axis
        sp = tuple(sp0[src[a]] for a in range(3))
        size = tuple(size0[src[a]] for a in range(3))
        c = [int(center[src[a]]) for a in range(3)]
        c = [size[a] - 1 - c[a] if flip[a] else c[a] for a in range(3)]
        return sp, size, c

    @staticmethod
    def _oriented_grid(ref: sitk.Image, center: tuple[int, ...], d: np.ndarray):
        """Spacing, size and centre on the ``DICOMOrient(ref, "LPS")`` grid for an oblique direction matrix,
        and the index axis nearest to each display axis (for the row labels only)."""
        oriented = sitk.DICOMOrient(ref, "LPS")
        sp, size = oriented.GetSpacing(), oriented.GetSize()
        pt = ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in center])
        c = list(oriented.TransformPhysicalPointToIndex(pt))
        d_or = np.asarray(oriented.GetDirection()).reshape(3, 3)
        src = [int(np.argmax(np.abs(d[:, a] @ d_or))) for a in range(3)]
        return sp, size, c, src

    def array(self, img: sitk.Image | None) -> np.ndarray | None:
        """Display-oriented array (a read-only view where possible) of an image on the reference grid."""
        if img is None:
            return None
        if tuple(img.GetSize()) != tuple(self.orig.GetSize()):
            raise ValueError(
                f"image of size {img.GetSize()} is not on the reference grid "
                f"{self.orig.GetSize()}; resample it onto the fixed grid first"
            )
        if self.dim == 2:
            self._keep.append(img)
            return sitk.GetArrayViewFromImage(img)
        if not self.permute:
            return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))
        self._keep.append(img)
        arr = np.transpose(sitk.GetArrayViewFromImage(img), self.axes)
        return arr[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    @staticmethod
    def cut(arr: np.ndarray | None, view: View) -> np.ndarray | None:
        """The 2D slice of a display-oriented array for ``view``, row 0 at the top of the panel."""
        if arr is None:
            return None
        if view.name == "2D":
            return arr
        if view.name == "axial":
            return arr[view.k, :, :]
        if view.name == "coronal":
            return arr[:, view.k, :][::-1, :]
        return arr[:, :, view.k][::-1, :]  # sagittal


def view_slices(image: sitk.Image, center: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """The 2D arrays exactly as the figures show them: ``[("2D", arr)]`` for a 2D image, else
    ``[("axial", ...), ("coronal", ...), ("sagittal", ...)]`` through ``center`` (original voxel index,
    SimpleITK order), reoriented to radiological display (row 0 at the top of the panel)."""
    disp = Display(image, tuple(center))
    arr = disp.array(image)
    return [(v.name, np.array(disp.cut(arr, v))) for v in disp.views]  # copies: safe after ``image`` dies
