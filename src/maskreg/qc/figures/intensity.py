"""Intensity layers of the QC figures: the grey-level window, the edge maps drawn over the fixed image and
the fixed/warped checkerboard.

Intensities are windowed to the 1st-99th percentile inside the mask (or the foreground when no mask).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from maskreg.qc.figures.views import View

_MAX_SAMPLES = 2_000_000  # above this many values, histograms and percentiles use a strided subsample
_SUBSAMPLE = 1_000_000  # about how many values that subsample keeps


def _otsu_threshold(vals: np.ndarray) -> float:
    """Otsu's threshold (intensity units) of a 1D array of finite values with a nonzero range."""
    hist, edges = np.histogram(vals, bins=256)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return centres[int(np.argmax(between[:-1]))]


def foreground(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels to window on: the mask when given and nonempty, else the Otsu foreground (everything
    brighter than Otsu's threshold, e.g. the body in CT or the head in MR), else all voxels."""
    if mask is not None and np.any(mask > 0):
        return mask > 0
    vals = arr[np.isfinite(arr)]
    if vals.size > _MAX_SAMPLES:
        vals = vals[:: vals.size // _SUBSAMPLE]
    if vals.size and np.ptp(vals) > 0:
        fg = arr > _otsu_threshold(vals)
        if np.count_nonzero(fg) >= 0.01 * arr.size:  # a tiny bright region is not a foreground
            return fg
    return np.ones(arr.shape, dtype=bool)


def window(arr: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """1st and 99th percentile of ``arr`` inside the mask (or the foreground)."""
    vals = arr[foreground(arr, mask)]
    if vals.size > _MAX_SAMPLES:
        vals = vals[:: vals.size // _SUBSAMPLE]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [1, 99]))
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def normalise(sl: np.ndarray, win: tuple[float, float]) -> np.ndarray:
    """Map a slice to [0, 1] (float64) through the window ``win``, clipping outside it."""
    lo, hi = win
    return np.clip((sl.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _upsample(im: sitk.Image, view: View, f: int) -> sitk.Image:
    """Linearly resample a 2D slice image ``f`` times finer along both axes, over the same field of view."""
    sp = (view.col_mm / f, view.row_mm / f)
    origin = (-0.5 * view.col_mm + 0.5 * sp[0], -0.5 * view.row_mm + 0.5 * sp[1])
    size = (im.GetSize()[0] * f, im.GetSize()[1] * f)
    return sitk.Resample(
        im, size, sitk.Transform(), sitk.sitkLinear, origin, sp, (1.0, 0.0, 0.0, 1.0), 0.0, sitk.sitkFloat32, True
    )


def edges(sl: np.ndarray, win: tuple[float, float], view: View, panel_px: float) -> np.ndarray:
    """Canny edges (bool array) of a windowed 2D slice.

    Small slices are linearly upsampled (up to 3x) to about the panel's pixel size first, so the edges are
    thin, smooth lines on screen rather than voxel staircases; large slices shown downsampled get their edges
    thickened by one pixel so they survive the downsampling. Draw the result with ``extent=extent(sl)``.
    """
    x = normalise(sl, win).astype(np.float32)
    if x.shape[0] < 4 or x.shape[1] < 4 or np.ptp(x) == 0:
        return np.zeros(x.shape, dtype=bool)
    im = sitk.GetImageFromArray(x)
    im.SetSpacing((view.col_mm, view.row_mm))
    f = int(np.clip(panel_px // max(x.shape), 1, 3))
    if f > 1:
        im = _upsample(im, view, f)
    sigma = max(view.col_mm, view.row_mm)
    gm = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(im, sigma))
    strong = gm[gm > 0.02 * gm.max()]
    if strong.size == 0:
        return np.zeros(gm.shape, dtype=bool)
    upper = float(np.percentile(strong, 70))
    found = sitk.GetArrayFromImage(sitk.CannyEdgeDetection(im, 0.5 * upper, upper, [sigma * sigma] * 2)) > 0
    if f == 1 and max(x.shape) > 1.3 * panel_px:
        found = ndimage.binary_dilation(found)
    return found


def checkerboard(a: np.ndarray, b: np.ndarray, view: View, n_tiles: int = 8) -> np.ndarray:
    """Tiles of ``a`` and ``b`` (same 2D shape) alternating, ``n_tiles`` square tiles along the panel's longer
    side in mm."""
    tile_mm = max(view.extent_mm) / n_tiles
    rows = (np.arange(a.shape[0]) * view.row_mm // tile_mm).astype(int)
    cols = (np.arange(a.shape[1]) * view.col_mm // tile_mm).astype(int)
    pick = (rows[:, None] + cols[None, :]) % 2 == 1
    return np.where(pick, b, a)
