"""The per-subject registration overlay: the fixed image with the edges of the moving image before and of the
warped image after registration, a fixed/warped checkerboard, fixed vs warped label (or mask) contours and,
when given, the Jacobian determinant map with folds marked. One row per view (see
:mod:`maskreg.qc.figures.views`), one column per panel kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

from maskreg.qc.figures.common import (
    C_EDGE_AFTER,
    C_EDGE_BEFORE,
    C_FIXED_LABEL,
    C_FIXED_MASK,
    C_FOLD,
    C_WARPED_LABEL,
    DPI,
    PANEL_IN,
    clean,
    extent,
    grey,
    label_contours,
    letters,
    outline,
    rgba,
    row_heights,
    save,
)
from maskreg.qc.figures.intensity import checkerboard, edges, foreground, normalise, window
from maskreg.qc.figures.views import Display, View, slice_indices


@dataclass
class _Overlay:
    """Display-oriented arrays of one subject on the fixed grid, their grey windows and what has been drawn."""

    disp: Display
    fixed: np.ndarray
    moving_before: np.ndarray
    warped: np.ndarray
    fixed_mask: np.ndarray | None
    warped_mask: np.ndarray | None
    fixed_labels: np.ndarray | None
    warped_labels: np.ndarray | None
    jacobian: np.ndarray | None
    fixed_win: tuple[float, float] = (0.0, 1.0)
    moving_win: tuple[float, float] = (0.0, 1.0)
    warped_win: tuple[float, float] = (0.0, 1.0)
    jacobian_norm: Normalize | None = None
    used: set[str] = field(default_factory=set)  # legend entries with something drawn

    @property
    def has_labels(self) -> bool:
        """Whether label maps are given (the overlap column then shows labels, not masks)."""
        return self.fixed_labels is not None or self.warped_labels is not None

    def columns(self) -> list[str]:
        """Panel kinds, left to right."""
        return ["before", "after", "checker", "overlap"] + (["jacobian"] if self.jacobian is not None else [])

    def titles(self) -> dict[str, str]:
        """Column titles by panel kind."""
        return {
            "before": "before: fixed + moving edges",
            "after": "after: fixed + warped edges",
            "checker": "checkerboard fixed / warped",
            "overlap": "labels: fixed vs warped" if self.has_labels else "masks: fixed vs warped",
            "jacobian": "Jacobian determinant",
        }


def _default_centre(
    fixed: sitk.Image, fixed_mask: sitk.Image | None, fixed_labels: sitk.Image | None
) -> tuple[int, ...]:
    """Centre voxel of the views: through the fixed mask, else the fixed labels, else the image centre."""
    if fixed_mask is not None:
        return slice_indices(fixed_mask)
    if fixed_labels is not None:
        return slice_indices(sitk.Cast(fixed_labels > 0, sitk.sitkUInt8))
    return slice_indices(None, fixed.GetSize())


def _jacobian_norm(jac: np.ndarray, fixed_mask: np.ndarray | None) -> Normalize:
    """Colour scale of det J: symmetric about 1, wide enough for the extremes (folds saturate at 0)."""
    jsel = foreground(jac, fixed_mask) if fixed_mask is not None else np.isfinite(jac)
    jv = jac[jsel & np.isfinite(jac)]
    if jv.size:
        half = float(np.clip(max(abs(jv.min() - 1.0), abs(jv.max() - 1.0)), 0.1, 1.0))
    else:
        half = 0.5
    return Normalize(vmin=1.0 - half, vmax=1.0 + half)


def _prepare(disp: Display, *images: sitk.Image | None) -> _Overlay:
    """Reorient the images (fixed, moving before, warped, masks, labels, Jacobian) and set their windows."""
    ov = _Overlay(disp, *(disp.array(img) for img in images))
    ov.fixed_win = window(ov.fixed, ov.fixed_mask)
    ov.moving_win = window(ov.moving_before, None)
    ov.warped_win = window(ov.warped, ov.warped_mask)
    if ov.jacobian is not None:
        ov.jacobian_norm = _jacobian_norm(ov.jacobian, ov.fixed_mask)
    return ov


def _draw_edges(ax, ov: _Overlay, view: View, col: str, first_col: bool) -> None:
    """Draw the fixed slice with the edges of the moving ("before") or warped ("after") slice over it."""
    f_sl = ov.disp.cut(ov.fixed, view)
    grey(ax, f_sl, ov.fixed_win, view)
    if col == "before":
        src, win, colour = ov.moving_before, ov.moving_win, C_EDGE_BEFORE
    else:
        src, win, colour = ov.warped, ov.warped_win, C_EDGE_AFTER
    e = edges(ov.disp.cut(src, view), win, view, PANEL_IN * DPI)
    if e.any():
        ax.imshow(rgba(e, colour), aspect=view.aspect, interpolation="nearest", extent=extent(f_sl))
    if outline(ax, ov.disp.cut(ov.fixed_mask, view), C_FIXED_MASK):
        ov.used.add("fixed_mask")
    if first_col:
        letters(ax, view)


def _draw_checker(ax, ov: _Overlay, view: View) -> None:
    """Draw the checkerboard of the fixed and warped slices, each normalised through its own window."""
    a = normalise(ov.disp.cut(ov.fixed, view), ov.fixed_win)
    b = normalise(ov.disp.cut(ov.warped, view), ov.warped_win)
    ax.imshow(checkerboard(a, b, view), cmap="gray", vmin=0, vmax=1, aspect=view.aspect, interpolation="antialiased")


def _draw_overlap(ax, ov: _Overlay, view: View) -> None:
    """Draw the fixed slice with fixed (solid) vs warped (dashed) label contours, or mask outlines if no labels."""
    cut = ov.disp.cut
    grey(ax, cut(ov.fixed, view), ov.fixed_win, view)
    if ov.has_labels:
        if label_contours(ax, cut(ov.fixed_labels, view), C_FIXED_LABEL, "solid"):
            ov.used.add("fixed_labels")
        if label_contours(ax, cut(ov.warped_labels, view), C_WARPED_LABEL, "dashed"):
            ov.used.add("warped_labels")
    else:
        if outline(ax, cut(ov.fixed_mask, view), C_FIXED_MASK):
            ov.used.add("fixed_mask")
        if outline(ax, cut(ov.warped_mask, view), C_WARPED_LABEL, ls="dashed"):
            ov.used.add("warped_mask")


def _draw_jacobian(fig: Figure, ax, ov: _Overlay, view: View, first_row: bool) -> None:
    """Draw the det J slice (diverging colours about 1, with a colour bar), folds (det J ≤ 0) in green."""
    j_sl = ov.disp.cut(ov.jacobian, view)
    im = ax.imshow(j_sl, cmap="RdBu_r", norm=ov.jacobian_norm, aspect=view.aspect, interpolation="nearest")
    folds = j_sl <= 0
    if folds.any():
        ax.imshow(rgba(ndimage.binary_dilation(folds), C_FOLD), aspect=view.aspect, interpolation="nearest")
        ov.used.add("folds")
    outline(ax, ov.disp.cut(ov.fixed_mask, view), "black", lw=0.8)
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02, extend="both")
    cb.ax.tick_params(labelsize=7)
    cb.ax.axhline(1.0, color="black", lw=0.8)
    if first_row:
        cb.set_label("det J", fontsize=8)


def _draw_panel(fig: Figure, ax, ov: _Overlay, view: View, col: str, r: int, c: int) -> None:
    """Draw one panel (row ``r`` = view, column ``c`` = panel kind ``col``) with its title and row label."""
    clean(ax)
    if r == 0:
        ax.set_title(ov.titles()[col], fontsize=10)
    if c == 0 and view.label:
        ax.set_ylabel(view.label, fontsize=9)
    if col in ("before", "after"):
        _draw_edges(ax, ov, view, col, c == 0)
    elif col == "checker":
        _draw_checker(ax, ov, view)
    elif col == "overlap":
        _draw_overlap(ax, ov, view)
    elif col == "jacobian":
        _draw_jacobian(fig, ax, ov, view, r == 0)


def _legend(fig: Figure, ov: _Overlay) -> None:
    """Draw the legend below the panels: only the outlines and contours that appear, edges always."""
    handles = []
    if "fixed_mask" in ov.used:
        handles.append(Line2D([], [], color=C_FIXED_MASK, lw=1.5, label="fixed mask outline"))
    handles.append(Line2D([], [], color=C_EDGE_BEFORE, lw=2, label="moving edges (before)"))
    handles.append(Line2D([], [], color=C_EDGE_AFTER, lw=2, label="warped edges (after)"))
    if "fixed_labels" in ov.used:
        handles.append(Line2D([], [], color=C_FIXED_LABEL, lw=1.5, label="fixed labels"))
    if "warped_labels" in ov.used:
        handles.append(Line2D([], [], color=C_WARPED_LABEL, lw=1.5, ls="--", label="warped labels"))
    if "warped_mask" in ov.used:
        handles.append(Line2D([], [], color=C_WARPED_LABEL, lw=1.5, ls="--", label="warped mask outline"))
    if ov.jacobian is not None:
        handles.append(Patch(color=C_FOLD, label="det J ≤ 0 (folding)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)


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
        center = _default_centre(fixed, fixed_mask, fixed_labels)
    disp = Display(fixed, tuple(center))
    images = (fixed, moving_before, warped, fixed_mask, warped_mask, fixed_labels, warped_labels, jacobian)
    ov = _prepare(disp, *images)
    cols = ov.columns()
    heights = row_heights(disp.views, PANEL_IN)
    width = PANEL_IN * len(cols) + 0.6 * (ov.jacobian is not None)  # room for the colour bar
    fig = Figure(figsize=(width, sum(heights) + 1.2), layout="constrained")
    axes = np.asarray(fig.subplots(len(disp.views), len(cols), squeeze=False, gridspec_kw={"height_ratios": heights}))
    for r, view in enumerate(disp.views):
        for c, col in enumerate(cols):
            _draw_panel(fig, axes[r, c], ov, view, col, r, c)
    _legend(fig, ov)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return save(fig, out_png)
