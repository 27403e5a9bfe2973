"""The per-subject mask overview: the fixed and the moving image side by side, each on its own grid with its
prepared mask shaded and outlined, one row per view (see :mod:`maskreg.qc.figures.views`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from maskreg.qc.figures.common import (
    C_FIXED_MASK,
    C_MOVING_MASK,
    PANEL_IN,
    clean,
    grey,
    letters,
    outline,
    rgba,
    row_heights,
    save,
)
from maskreg.qc.figures.intensity import window
from maskreg.qc.figures.views import Display, View, slice_indices


def _mask_caption(name: str, mask: sitk.Image | None) -> str:
    """Column title: the image's name and its mask's voxel count and share of the image."""
    if mask is None:
        return f"{name}\n(no mask)"
    arr = sitk.GetArrayViewFromImage(mask) > 0
    n = int(np.count_nonzero(arr))
    return f"{name}\nmask: {n:,} voxels ({100.0 * n / arr.size:.1f}% of image)"


def _mask_panel(
    ax, d: Display, arrays: tuple[np.ndarray, np.ndarray | None, tuple[float, float]], view: View, colour: str
) -> None:
    """Draw one view of an image in grey with its mask shaded and outlined in ``colour``."""
    a, m, win = arrays
    clean(ax)
    grey(ax, d.cut(a, view), win, view)
    m_sl = d.cut(m, view)
    if m_sl is not None and m_sl.any():
        ax.imshow(rgba(m_sl > 0, colour, 0.15), aspect=view.aspect, interpolation="nearest")
    outline(ax, m_sl, colour, lw=1.5)
    letters(ax, view)
    if view.label:
        ax.set_ylabel(view.label, fontsize=9)


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
        d = Display(img, centre)
        disps.append(d)
        a = d.array(img)
        m = d.array(msk)
        arrays.append((a, m, window(a, m)))
    heights = [
        max(h1, h2)
        for h1, h2 in zip(row_heights(disps[0].views, PANEL_IN), row_heights(disps[1].views, PANEL_IN), strict=False)
    ]
    fig = Figure(figsize=(2 * PANEL_IN + 0.4, sum(heights) + 1.3), layout="constrained")
    axes = np.asarray(fig.subplots(len(disps[0].views), 2, squeeze=False, gridspec_kw={"height_ratios": heights}))
    for c, ((name, _img, msk, colour), d, arrs) in enumerate(zip(items, disps, arrays, strict=False)):
        for r, view in enumerate(d.views):
            _mask_panel(axes[r, c], d, arrs, view, colour)
            if r == 0:
                axes[r, c].set_title(_mask_caption(name, msk), fontsize=9)
    handles = [
        Line2D([], [], color=C_FIXED_MASK, lw=1.5, label="fixed mask outline"),
        Line2D([], [], color=C_MOVING_MASK, lw=1.5, label="moving mask outline"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return save(fig, out_png)
