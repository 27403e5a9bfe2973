"""QC figures written as PNG files: registration overlays, mask overviews and cohort summaries.

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
* Intensities are windowed to the 1st-99th percentile inside the mask (or the foreground when no mask).

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas (no pyplot, no display,
no global backend change) and written atomically with :func:`maskreg.io.atomic_path`.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image as PILImage
from scipy import ndimage

from maskreg.io import atomic_path
from maskreg.masks import centroid_index
from maskreg.qc.flags import parse_flags

__all__ = [
    "registration_overlay",
    "mask_overview",
    "cohort_summary",
    "failure_table",
    "slice_indices",
    "view_slices",
]

DPI = 100
PANEL_IN = 3.0  # width of one image panel in inches
MAX_PNG_BYTES = 390_000

# colours (chosen to stay distinguishable on grey images and for common colour-vision deficiencies)
C_FIXED_MASK = "#00e5ff"  # cyan
C_MOVING_MASK = "#ff9f1c"  # orange
C_EDGE_BEFORE = "#ff9f1c"  # orange
C_EDGE_AFTER = "#ff2bd6"  # magenta
C_FIXED_LABEL = "#ffe600"  # yellow, solid
C_WARPED_LABEL = "#ff2bd6"  # magenta, dashed
C_FOLD = "#39ff14"  # neon green: Jacobian ≤ 0
C_FAILED = "#d62728"  # red
C_FLAGGED = "#e69f00"  # amber: finished, but flagged for a look (maskreg.qc.flags)


# ----------------------------------------------------------------------------------------------------------
# geometry helpers


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
class _View:
    name: str  # "axial", "coronal", "sagittal" or "2D"
    k: int  # slice index in the display grid (unused for 2D)
    aspect: float  # row spacing / column spacing
    extent_mm: tuple[float, float]  # (height, width) of the panel in mm
    row_mm: float
    col_mm: float
    label: str  # row label shown at the left
    letters: tuple[str, str, str, str] | None  # left, right, top, bottom orientation letters


class _Display:
    """Reorients images of one grid for display and cuts the views through a centre.

    For 3D the reorientation to LPS index axes is a permutation and flips of the array axes, done with numpy
    views (no copy of the volumes); it equals ``sitk.DICOMOrient(img, "LPS")``, which is used instead only
    for a direction matrix too oblique to assign each index axis to a distinct anatomical axis.
    """

    def __init__(self, ref: sitk.Image, center: tuple[int, ...]):
        self.dim = ref.GetDimension()
        self.orig = ref
        self._keep: list[sitk.Image] = []  # images whose array views are in use
        size0, sp0 = ref.GetSize(), ref.GetSpacing()
        if self.dim == 2:
            sp, size = sp0, size0
            self.center = tuple(int(c) for c in center)
            self.views = [_View("2D", 0, sp[1] / sp[0], (size[1] * sp[1], size[0] * sp[0]), sp[1], sp[0], "", None)]
            return
        d = np.asarray(ref.GetDirection()).reshape(3, 3)
        src = [int(np.argmax(np.abs(d[a, :]))) for a in range(3)]  # display axis a <- index axis src[a]
        self.permute = sorted(src) == [0, 1, 2]
        if self.permute:
            flip = [bool(d[a, src[a]] < 0) for a in range(3)]
            self.axes = tuple(2 - src[2 - j] for j in range(3))  # array-axis transpose
            self.flips = tuple(flip[2 - j] for j in range(3))  # per display array axis
            sp = tuple(sp0[src[a]] for a in range(3))
            size = tuple(size0[src[a]] for a in range(3))
            c = [int(center[src[a]]) for a in range(3)]
            c = [size[a] - 1 - c[a] if flip[a] else c[a] for a in range(3)]
        else:
            oriented = sitk.DICOMOrient(ref, "LPS")
            sp, size = oriented.GetSpacing(), oriented.GetSize()
            pt = ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in center])
            c = list(oriented.TransformPhysicalPointToIndex(pt))
            d_or = np.asarray(oriented.GetDirection()).reshape(3, 3)
            src = [int(np.argmax(np.abs(d[:, a] @ d_or))) for a in range(3)]  # approximate, for labels only
        self.center = tuple(int(min(max(v, 0), n - 1)) for v, n in zip(c, size, strict=False))
        names = "xyz"

        def lab(view: str, a: int) -> str:
            return f"{view}\n{names[src[a]]} = {int(center[src[a]])}"

        cx, cy, cz = self.center
        self.views = [
            _View(
                "axial",
                cz,
                sp[1] / sp[0],
                (size[1] * sp[1], size[0] * sp[0]),
                sp[1],
                sp[0],
                lab("axial", 2),
                ("R", "L", "A", "P"),
            ),
            _View(
                "coronal",
                cy,
                sp[2] / sp[0],
                (size[2] * sp[2], size[0] * sp[0]),
                sp[2],
                sp[0],
                lab("coronal", 1),
                ("R", "L", "S", "I"),
            ),
            _View(
                "sagittal",
                cx,
                sp[2] / sp[1],
                (size[2] * sp[2], size[1] * sp[1]),
                sp[2],
                sp[1],
                lab("sagittal", 0),
                ("A", "P", "S", "I"),
            ),
        ]

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
    def cut(arr: np.ndarray | None, view: _View) -> np.ndarray | None:
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
    disp = _Display(image, tuple(center))
    arr = disp.array(image)
    return [(v.name, np.array(disp.cut(arr, v))) for v in disp.views]  # copies: safe after ``image`` dies


# ----------------------------------------------------------------------------------------------------------
# drawing helpers


def _foreground(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels to window on: the mask when given and nonempty, else the Otsu foreground (everything
    brighter than Otsu's threshold, e.g. the body in CT or the head in MR), else all voxels."""
    if mask is not None and np.any(mask > 0):
        return mask > 0
    vals = arr[np.isfinite(arr)]
    if vals.size > 2_000_000:
        vals = vals[:: vals.size // 1_000_000]
    if vals.size and np.ptp(vals) > 0:
        hist, edges = np.histogram(vals, bins=256)
        centres = 0.5 * (edges[:-1] + edges[1:])
        w0 = np.cumsum(hist)
        w1 = w0[-1] - w0
        m0 = np.cumsum(hist * centres)
        mu0 = m0 / np.maximum(w0, 1)
        mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
        between = w0 * w1 * (mu0 - mu1) ** 2
        thr = centres[int(np.argmax(between[:-1]))]
        fg = arr > thr
        if np.count_nonzero(fg) >= 0.01 * arr.size:
            return fg
    return np.ones(arr.shape, dtype=bool)


def _window(arr: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """1st and 99th percentile of ``arr`` inside the mask (or the foreground)."""
    vals = arr[_foreground(arr, mask)]
    if vals.size > 2_000_000:
        vals = vals[:: vals.size // 1_000_000]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [1, 99]))
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _normalise(sl: np.ndarray, win: tuple[float, float]) -> np.ndarray:
    lo, hi = win
    return np.clip((sl.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _edges(sl: np.ndarray, win: tuple[float, float], view: _View, panel_px: float) -> np.ndarray:
    """Canny edges (bool array) of a windowed 2D slice.

    Small slices are linearly upsampled (up to 4x) to about the panel's pixel size first, so the edges are
    thin, smooth lines on screen rather than voxel staircases; large slices shown downsampled get their edges
    thickened by one pixel so they survive the downsampling. Draw the result with ``extent=_extent(sl)``.
    """
    x = _normalise(sl, win).astype(np.float32)
    if x.shape[0] < 4 or x.shape[1] < 4 or np.ptp(x) == 0:
        return np.zeros(x.shape, dtype=bool)
    im = sitk.GetImageFromArray(x)
    im.SetSpacing((view.col_mm, view.row_mm))
    f = int(np.clip(panel_px // max(x.shape), 1, 3))
    if f > 1:
        sp = (view.col_mm / f, view.row_mm / f)
        origin = (-0.5 * view.col_mm + 0.5 * sp[0], -0.5 * view.row_mm + 0.5 * sp[1])
        im = sitk.Resample(
            im,
            (x.shape[1] * f, x.shape[0] * f),
            sitk.Transform(),
            sitk.sitkLinear,
            origin,
            sp,
            (1.0, 0.0, 0.0, 1.0),
            0.0,
            sitk.sitkFloat32,
            True,
        )
    sigma = max(view.col_mm, view.row_mm)
    gm = sitk.GetArrayFromImage(sitk.GradientMagnitudeRecursiveGaussian(im, sigma))
    strong = gm[gm > 0.02 * gm.max()]
    if strong.size == 0:
        return np.zeros(gm.shape, dtype=bool)
    upper = float(np.percentile(strong, 70))
    edges = sitk.GetArrayFromImage(sitk.CannyEdgeDetection(im, 0.5 * upper, upper, [sigma * sigma] * 2)) > 0
    if f == 1 and max(x.shape) > 1.3 * panel_px:
        edges = ndimage.binary_dilation(edges)
    return edges


def _extent(sl: np.ndarray) -> tuple[float, float, float, float]:
    """imshow extent of a slice drawn with the default (``origin="upper"``) pixel grid."""
    return (-0.5, sl.shape[1] - 0.5, sl.shape[0] - 0.5, -0.5)


def _rgba(mask2d: np.ndarray, colour: str, alpha: float = 1.0) -> np.ndarray:
    rgba = np.zeros(mask2d.shape + (4,), dtype=np.float32)
    rgba[..., :3] = to_rgb(colour)
    rgba[..., 3] = np.where(mask2d, alpha, 0.0)
    return rgba


def _outline(ax, sl: np.ndarray | None, colour: str, lw: float = 1.2, ls: str = "solid") -> bool:
    if sl is None:
        return False
    b = (sl > 0).astype(np.float32)
    if not b.any() or b.all():
        return False
    ax.contour(b, levels=[0.5], colors=[colour], linewidths=lw, linestyles=ls)
    return True


def _label_contours(ax, sl: np.ndarray | None, colour: str, ls: str) -> bool:
    if sl is None:
        return False
    lab = np.rint(sl).astype(np.int64) if not np.issubdtype(sl.dtype, np.integer) else sl
    drawn = False
    for v in np.unique(lab):
        if v == 0:
            continue
        b = (lab == v).astype(np.float32)
        if b.sum() < 2:
            continue
        ax.contour(b, levels=[0.5], colors=[colour], linewidths=0.9, linestyles=ls)
        drawn = True
    return drawn


def _grey(ax, sl: np.ndarray, win: tuple[float, float], view: _View) -> None:
    ax.imshow(sl, cmap="gray", vmin=win[0], vmax=win[1], aspect=view.aspect, interpolation="antialiased")


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _letters(ax, view: _View) -> None:
    if view.letters is None:
        return
    left, right, top, bottom = view.letters
    kw = dict(
        transform=ax.transAxes,
        color="white",
        fontsize=8,
        fontweight="bold",
        bbox=dict(boxstyle="round,pad=0.1", fc="black", ec="none", alpha=0.5),
    )
    ax.text(0.01, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.99, 0.5, right, ha="right", va="center", **kw)
    ax.text(0.5, 0.99, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **kw)


def _checkerboard(a: np.ndarray, b: np.ndarray, view: _View, n_tiles: int = 8) -> np.ndarray:
    tile_mm = max(view.extent_mm) / n_tiles
    rows = (np.arange(a.shape[0]) * view.row_mm // tile_mm).astype(int)
    cols = (np.arange(a.shape[1]) * view.col_mm // tile_mm).astype(int)
    pick = (rows[:, None] + cols[None, :]) % 2 == 1
    return np.where(pick, b, a)


def _row_heights(views: list[_View], width_in: float) -> list[float]:
    hs = []
    for v in views:
        h, w = v.extent_mm
        hs.append(float(np.clip(width_in * h / w, 0.6, 2.0 * width_in)))
    return hs


def _render_png(fig: Figure, dpi: float) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    out = io.BytesIO()
    PILImage.open(buf).convert("RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()


def _save(fig: Figure, out_png: str | os.PathLike) -> Path:
    """Render with Agg as an RGB PNG (lossless) and write it atomically.

    When the file would exceed ``MAX_PNG_BYTES`` (noisy images compress poorly), the figure is rendered
    again at a lower dpi rather than quantised, so grey levels stay smooth.
    """
    FigureCanvasAgg(fig)
    dpi = float(DPI)
    data = _render_png(fig, dpi)
    while len(data) > MAX_PNG_BYTES and dpi > 40:
        dpi = max(40.0, dpi * math.sqrt(MAX_PNG_BYTES / len(data)) * 0.95)
        data = _render_png(fig, dpi)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


# ----------------------------------------------------------------------------------------------------------
# public figures


def registration_overlay(
    fixed: sitk.Image,
    moving_before: sitk.Image,
    warped: sitk.Image,
    out_png: str | os.PathLike,
    *,
    fixed_mask: sitk.Image | None = None,
    warped_mask: sitk.Image | None = None,
    fixed_labels: sitk.Image | None = None,
    warped_labels: sitk.Image | None = None,
    jacobian: sitk.Image | None = None,
    title: str = "",
    center: tuple[int, ...] | None = None,
) -> Path:
    """Write the per-subject registration overlay (one PNG) and return its path.

    All images are on the fixed grid. Rows are views (1 for 2D; axial, coronal, sagittal for 3D through
    ``center``, a voxel index in SimpleITK order, by default the centroid of ``fixed_mask``). Columns:
    before (fixed + edges of ``moving_before``), after (fixed + edges of ``warped``), checkerboard of fixed
    and warped, label contours (fixed solid vs warped dashed; mask outlines when no labels), and the
    Jacobian determinant map when ``jacobian`` is given. The fixed mask outline is drawn on the first two
    columns.
    """
    if center is None:
        if fixed_mask is not None:
            center = slice_indices(fixed_mask)
        elif fixed_labels is not None:
            center = slice_indices(sitk.Cast(fixed_labels > 0, sitk.sitkUInt8))
        else:
            center = slice_indices(None, fixed.GetSize())
    disp = _Display(fixed, tuple(center))
    f_arr = disp.array(fixed)
    mb_arr = disp.array(moving_before)
    w_arr = disp.array(warped)
    fm_arr = disp.array(fixed_mask)
    wm_arr = disp.array(warped_mask)
    fl_arr = disp.array(fixed_labels)
    wl_arr = disp.array(warped_labels)
    j_arr = disp.array(jacobian)

    f_win = _window(f_arr, fm_arr)
    mb_win = _window(mb_arr, None)
    w_win = _window(w_arr, wm_arr)

    has_labels = fl_arr is not None or wl_arr is not None
    cols = ["before", "after", "checker", "overlap"] + (["jacobian"] if j_arr is not None else [])
    titles = {
        "before": "before: fixed + moving edges",
        "after": "after: fixed + warped edges",
        "checker": "checkerboard fixed / warped",
        "overlap": "labels: fixed vs warped" if has_labels else "masks: fixed vs warped",
        "jacobian": "Jacobian determinant",
    }
    if j_arr is not None:
        jsel = _foreground(j_arr, fm_arr) if fm_arr is not None else np.isfinite(j_arr)
        jv = j_arr[jsel & np.isfinite(j_arr)]
        if jv.size:  # symmetric about 1, wide enough for the extremes (folds saturate at 0)
            half = float(np.clip(max(abs(jv.min() - 1.0), abs(jv.max() - 1.0)), 0.1, 1.0))
        else:
            half = 0.5
        j_norm = Normalize(vmin=1.0 - half, vmax=1.0 + half)

    ncols = len(cols)
    heights = _row_heights(disp.views, PANEL_IN)
    fig = Figure(figsize=(PANEL_IN * ncols + 0.6 * (j_arr is not None), sum(heights) + 1.2), layout="constrained")
    axes = np.asarray(fig.subplots(len(disp.views), ncols, squeeze=False, gridspec_kw={"height_ratios": heights}))
    panel_px = PANEL_IN * DPI
    used = set()
    for r, view in enumerate(disp.views):
        f_sl = disp.cut(f_arr, view)
        fm_sl = disp.cut(fm_arr, view)
        for c, col in enumerate(cols):
            ax = axes[r, c]
            _clean(ax)
            if r == 0:
                ax.set_title(titles[col], fontsize=10)
            if c == 0 and view.label:
                ax.set_ylabel(view.label, fontsize=9)
            if col in ("before", "after"):
                _grey(ax, f_sl, f_win, view)
                src, win, colour = (mb_arr, mb_win, C_EDGE_BEFORE) if col == "before" else (w_arr, w_win, C_EDGE_AFTER)
                e = _edges(disp.cut(src, view), win, view, panel_px)
                if e.any():
                    ax.imshow(_rgba(e, colour), aspect=view.aspect, interpolation="nearest", extent=_extent(f_sl))
                used.add(col)
                if _outline(ax, fm_sl, C_FIXED_MASK):
                    used.add("fixed_mask")
                if c == 0:
                    _letters(ax, view)
            elif col == "checker":
                board = _checkerboard(_normalise(f_sl, f_win), _normalise(disp.cut(w_arr, view), w_win), view)
                ax.imshow(board, cmap="gray", vmin=0, vmax=1, aspect=view.aspect, interpolation="antialiased")
            elif col == "overlap":
                _grey(ax, f_sl, f_win, view)
                if has_labels:
                    if _label_contours(ax, disp.cut(fl_arr, view), C_FIXED_LABEL, "solid"):
                        used.add("fixed_labels")
                    if _label_contours(ax, disp.cut(wl_arr, view), C_WARPED_LABEL, "dashed"):
                        used.add("warped_labels")
                else:
                    if _outline(ax, fm_sl, C_FIXED_MASK):
                        used.add("fixed_mask")
                    if _outline(ax, disp.cut(wm_arr, view), C_WARPED_LABEL, ls="dashed"):
                        used.add("warped_mask")
            elif col == "jacobian":
                j_sl = disp.cut(j_arr, view)
                im = ax.imshow(j_sl, cmap="RdBu_r", norm=j_norm, aspect=view.aspect, interpolation="nearest")
                folds = j_sl <= 0
                if folds.any():
                    ax.imshow(
                        _rgba(ndimage.binary_dilation(folds), C_FOLD), aspect=view.aspect, interpolation="nearest"
                    )
                    used.add("folds")
                _outline(ax, fm_sl, "black", lw=0.8)
                cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02, extend="both")
                cb.ax.tick_params(labelsize=7)
                cb.ax.axhline(1.0, color="black", lw=0.8)
                if r == 0:
                    cb.set_label("det J", fontsize=8)

    handles = []
    if "fixed_mask" in used:
        handles.append(Line2D([], [], color=C_FIXED_MASK, lw=1.5, label="fixed mask outline"))
    handles.append(Line2D([], [], color=C_EDGE_BEFORE, lw=2, label="moving edges (before)"))
    handles.append(Line2D([], [], color=C_EDGE_AFTER, lw=2, label="warped edges (after)"))
    if "fixed_labels" in used:
        handles.append(Line2D([], [], color=C_FIXED_LABEL, lw=1.5, label="fixed labels"))
    if "warped_labels" in used:
        handles.append(Line2D([], [], color=C_WARPED_LABEL, lw=1.5, ls="--", label="warped labels"))
    if "warped_mask" in used:
        handles.append(Line2D([], [], color=C_WARPED_LABEL, lw=1.5, ls="--", label="warped mask outline"))
    if j_arr is not None:
        handles.append(Patch(color=C_FOLD, label="det J ≤ 0 (folding)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return _save(fig, out_png)


def _mask_caption(name: str, mask: sitk.Image | None) -> str:
    if mask is None:
        return f"{name}\n(no mask)"
    arr = sitk.GetArrayViewFromImage(mask) > 0
    n = int(np.count_nonzero(arr))
    return f"{name}\nmask: {n:,} voxels ({100.0 * n / arr.size:.1f}% of image)"


def mask_overview(
    fixed: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving: sitk.Image,
    moving_mask: sitk.Image | None,
    out_png: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Write fixed and moving images with their prepared mask outlines (one PNG) and return its path.

    Each image is shown on its own grid (3D: axial, coronal, sagittal through its own mask's centroid);
    panel titles give the mask's voxel count and share of the image.
    """
    items = [("fixed", fixed, fixed_mask, C_FIXED_MASK), ("moving", moving, moving_mask, C_MOVING_MASK)]
    disps, arrays = [], []
    for _, img, msk, _ in items:
        centre = slice_indices(msk) if msk is not None else slice_indices(None, img.GetSize())
        d = _Display(img, centre)
        disps.append(d)
        a = d.array(img)
        m = d.array(msk)
        arrays.append((a, m, _window(a, m)))
    nrows = len(disps[0].views)
    heights = [
        max(h1, h2)
        for h1, h2 in zip(_row_heights(disps[0].views, PANEL_IN), _row_heights(disps[1].views, PANEL_IN), strict=False)
    ]
    fig = Figure(figsize=(2 * PANEL_IN + 0.4, sum(heights) + 1.3), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, 2, squeeze=False, gridspec_kw={"height_ratios": heights}))
    for c, ((name, _img, msk, colour), d, (a, m, win)) in enumerate(zip(items, disps, arrays, strict=False)):
        for r, view in enumerate(d.views):
            ax = axes[r, c]
            _clean(ax)
            _grey(ax, d.cut(a, view), win, view)
            m_sl = d.cut(m, view)
            if m_sl is not None and m_sl.any():
                ax.imshow(_rgba(m_sl > 0, colour, 0.15), aspect=view.aspect, interpolation="nearest")
            _outline(ax, m_sl, colour, lw=1.5)
            _letters(ax, view)
            if view.label:
                ax.set_ylabel(view.label, fontsize=9)
            if r == 0:
                ax.set_title(_mask_caption(name, msk), fontsize=9)
    handles = [
        Line2D([], [], color=C_FIXED_MASK, lw=1.5, label="fixed mask outline"),
        Line2D([], [], color=C_MOVING_MASK, lw=1.5, label="moving mask outline"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return _save(fig, out_png)


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)


def cohort_summary(metrics: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Write the cohort summary plot (one PNG) and return its path.

    ``metrics`` has one row per subject with columns ``subject``, ``status`` ("ok"/"failed"), ``seconds``,
    ``ncc_before``, ``ncc_after``, ``dice_before``, ``dice_after``, ``tre_before_mm``, ``tre_after_mm``
    and ``flags`` (missing columns or cells are treated as absent). Panels share the subject axis: NCC before
    → after, Dice before → after and TRE before → after (each when any value exists) and runtime. Failed
    subjects get a red band, a red ✗ in every panel and a red "(failed)" tick label. Flagged subjects (a
    non-empty ``flags`` cell, :mod:`maskreg.qc.flags`) get an amber band, an amber ▲ at the top of every panel
    and an amber tick label that lists their flags.
    """
    df = metrics.reset_index(drop=True)
    n = len(df)
    subjects = df["subject"].astype(str).tolist() if "subject" in df.columns else [str(i) for i in range(n)]
    status = df["status"].astype(str).str.strip().str.lower() if "status" in df.columns else pd.Series(["ok"] * n)
    failed = (status == "failed").to_numpy()
    flag_names = [
        [] if f else parse_flags(c)
        for f, c in zip(failed, df["flags"] if "flags" in df.columns else [None] * n, strict=False)
    ]
    flagged = np.array([bool(names) for names in flag_names], dtype=bool)
    x = np.arange(n)

    panels = [("NCC (masked)", "ncc_before", "ncc_after", False)]
    if np.isfinite(_col(df, "dice_before")).any() or np.isfinite(_col(df, "dice_after")).any():
        panels.append(("mean Dice", "dice_before", "dice_after", False))
    if np.isfinite(_col(df, "tre_before_mm")).any() or np.isfinite(_col(df, "tre_after_mm")).any():
        panels.append(("TRE (mm)", "tre_before_mm", "tre_after_mm", True))
    panels.append(("runtime (s)", "seconds", None, True))

    width = float(np.clip(2.0 + 0.35 * n, 6.0, 20.0))
    fig = Figure(figsize=(width, 1.9 * len(panels) + 1.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, before, after, from_zero) in zip(axes, panels, strict=False):
        for i in np.flatnonzero(failed):
            ax.axvspan(i - 0.45, i + 0.45, color=C_FAILED, alpha=0.12, lw=0)
        for i in np.flatnonzero(flagged):
            ax.axvspan(i - 0.45, i + 0.45, color=C_FLAGGED, alpha=0.15, lw=0)
        if after is None:  # runtime bars
            y = _col(df, before)
            colours = [C_FAILED if f else "#4c72b0" for f in failed]
            ax.bar(x, np.nan_to_num(y, nan=0.0), color=colours, width=0.7)
            if np.isfinite(y).any() and np.nanmax(y) > 0:
                ax.set_ylim(bottom=0)
            else:
                ax.set_ylim(0, 1)
                ax.text(
                    0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=10
                )
            ref = 0.0
        else:
            yb, ya = _col(df, before), _col(df, after)
            for i in range(n):
                if np.isfinite(yb[i]) and np.isfinite(ya[i]):
                    ax.annotate(
                        "",
                        xy=(i, ya[i]),
                        xytext=(i, yb[i]),
                        arrowprops=dict(arrowstyle="-|>", color="0.45", lw=1, shrinkA=3, shrinkB=3),
                    )
            ax.plot(x, yb, "o", mfc="white", mec="0.35", ms=6, ls="none", label="before")
            ax.plot(x, ya, "o", color="#1f77b4", ms=6, ls="none", label="after")
            vals = np.concatenate([yb[np.isfinite(yb)], ya[np.isfinite(ya)]])
            if not vals.size:
                ax.text(
                    0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=10
                )
                ax.set_ylim(0, 1)
            elif from_zero:
                ax.set_ylim(bottom=0, top=max(float(vals.max()) * 1.1, 1e-6))
            ref = ax.get_ylim()[0]
        ylo, yhi = ax.get_ylim()
        for i in np.flatnonzero(failed):
            ax.plot(
                [i],
                [ylo + 0.1 * (yhi - ylo) if after is not None else ref],
                marker="x",
                color=C_FAILED,
                ms=10,
                mew=2.5,
                ls="none",
                clip_on=False,
                zorder=5,
            )
        if flagged.any():  # headroom above the values for the flag markers
            yhi = yhi + 0.18 * (yhi - ylo)
        for i in np.flatnonzero(flagged):
            ax.plot(
                [i],
                [ylo + 0.93 * (yhi - ylo)],
                marker="^",
                color=C_FLAGGED,
                mec="0.25",
                ms=9,
                ls="none",
                clip_on=False,
                zorder=5,
            )
        ax.set_ylim(ylo, yhi)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", mfc="white", mec="0.35", ls="none", label="before"),
        Line2D([], [], marker="o", color="#1f77b4", ls="none", label="after"),
    ]
    if failed.any():
        handles.append(Line2D([], [], marker="x", color=C_FAILED, mew=2.5, ls="none", label="failed subject"))
    if flagged.any():
        handles.append(
            Line2D([], [], marker="^", color=C_FLAGGED, mec="0.25", ls="none", label="flagged subject [flags]")
        )
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9, frameon=False)
    axes[-1].set_xticks(x)
    ticks = [
        f"{s} (failed)" if f else (f"{s} [{', '.join(names)}]" if names else s)
        for s, f, names in zip(subjects, failed, flag_names, strict=False)
    ]
    axes[-1].set_xticklabels(
        ticks,
        rotation=45 if n > 3 or flagged.any() else 0,
        ha="right" if n > 3 or flagged.any() else "center",
        fontsize=8,
    )
    for lab, f, g in zip(axes[-1].get_xticklabels(), failed, flagged, strict=False):
        if f or g:
            lab.set_color(C_FAILED if f else C_FLAGGED)
            lab.set_fontweight("bold")
    pad = 0.6 if n >= 3 else 1.2
    axes[-1].set_xlim(-pad, n - 1 + pad)
    n_failed, n_flagged = int(failed.sum()), int(flagged.sum())
    head = f"Cohort summary: {n} subject{'s' if n != 1 else ''}"
    if n_flagged:
        head += f", {n_flagged} flagged"
    if n_failed:
        fig.suptitle(f"{head} — {n_failed} FAILED", fontsize=12, fontweight="bold", color=C_FAILED)
    else:
        fig.suptitle(f"{head}, none failed", fontsize=12, fontweight="bold")
    return _save(fig, out_png)


def failure_table(metrics: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Write a table image of the failed subjects with their one-line ``error`` ("no failures" if none)."""
    df = metrics.reset_index(drop=True)
    if "status" in df.columns:
        failed = df[df["status"].astype(str).str.strip().str.lower() == "failed"]
    else:
        failed = df.iloc[0:0]
    if failed.empty:
        fig = Figure(figsize=(6, 1.2))
        fig.text(
            0.5,
            0.5,
            f"no failures ({len(df)} subject{'s' if len(df) != 1 else ''})",
            ha="center",
            va="center",
            fontsize=14,
            color="#2ca02c",
            fontweight="bold",
        )
        return _save(fig, out_png)
    rows = []
    for _, row in failed.iterrows():
        err = row.get("error", "")
        err = "" if (err is None or (isinstance(err, float) and math.isnan(err))) else str(err)
        err = " ".join(err.split()) or "(no error message recorded)"
        if len(err) > 300:
            err = err[:297] + "..."
        rows.append([str(row.get("subject", "?")), textwrap.fill(err, 110)])
    n_lines = [r[1].count("\n") + 1 for r in rows]
    units = [1.3] + [n + 0.8 for n in n_lines]  # header, then each row in text lines
    line_in = 0.19
    table_h = line_in * sum(units)
    fig = Figure(figsize=(11, table_h + 0.75))
    ax = fig.add_axes((0.01, 0.2 / (table_h + 0.75), 0.98, table_h / (table_h + 0.75)))
    ax.axis("off")
    fig.suptitle(
        f"{len(rows)} of {len(df)} subjects failed",
        fontsize=12,
        fontweight="bold",
        color=C_FAILED,
        y=1 - 0.08 / (table_h + 0.75),
        va="top",
    )
    table = ax.table(
        cellText=rows,
        colLabels=["subject", "error"],
        colWidths=[0.16, 0.84],
        bbox=(0.0, 0.0, 1.0, 1.0),
        cellLoc="left",
        colLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (r, c), cell in table.get_celld().items():
        cell.PAD = 0.02
        cell.set_height(units[r] / sum(units))
        if r == 0:
            cell.set_facecolor("#f2f2f2")
            cell.set_text_props(fontweight="bold")
        elif c == 0:
            cell.set_text_props(color=C_FAILED, fontweight="bold")
    return _save(fig, out_png)
