"""Shared pieces of the QC figures: sizes and colours, panel decoration (grey image, orientation letters,
mask and label outlines, colour layers) and the PNG writer.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas (no pyplot, no display, no
global backend change), then written atomically with :func:`maskreg.io.atomic_path`.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from PIL import Image as PILImage

from maskreg.io import atomic_path
from maskreg.qc.figures.views import View

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
# panel drawing


def extent(sl: np.ndarray) -> tuple[float, float, float, float]:
    """imshow extent of a slice drawn with the default (``origin="upper"``) pixel grid."""
    return (-0.5, sl.shape[1] - 0.5, sl.shape[0] - 0.5, -0.5)


def rgba(mask2d: np.ndarray, colour: str, alpha: float = 1.0) -> np.ndarray:
    """Colour layer (``mask2d.shape + (4,)`` float32): ``colour`` at ``alpha`` where the mask is set, else clear."""
    layer = np.zeros(mask2d.shape + (4,), dtype=np.float32)
    layer[..., :3] = to_rgb(colour)
    layer[..., 3] = np.where(mask2d, alpha, 0.0)
    return layer


def outline(ax, sl: np.ndarray | None, colour: str, lw: float = 1.2, ls: str = "solid") -> bool:
    """Draw the outline of ``sl > 0``; return whether anything was drawn (nothing for an empty or full slice)."""
    if sl is None:
        return False
    b = (sl > 0).astype(np.float32)
    if not b.any() or b.all():
        return False
    ax.contour(b, levels=[0.5], colors=[colour], linewidths=lw, linestyles=ls)
    return True


def label_contours(ax, sl: np.ndarray | None, colour: str, ls: str) -> bool:
    """Draw one contour per nonzero label of a label slice; return whether anything was drawn."""
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


def grey(ax, sl: np.ndarray, win: tuple[float, float], view: View) -> None:
    """Draw a 2D slice in grey levels, windowed to ``win`` (intensity units), at the view's pixel aspect."""
    ax.imshow(sl, cmap="gray", vmin=win[0], vmax=win[1], aspect=view.aspect, interpolation="antialiased")


def clean(ax) -> None:
    """Remove ticks and frame from an image panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def letters(ax, view: View) -> None:
    """Draw the anatomical orientation letters at the four panel edges (none for 2D)."""
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


def row_heights(views: list[View], width_in: float) -> list[float]:
    """Height in inches of each view's panel row for panels ``width_in`` inches wide, at physical aspect."""
    hs = []
    for v in views:
        h, w = v.extent_mm
        hs.append(float(np.clip(width_in * h / w, 0.6, 2.0 * width_in)))
    return hs


# ----------------------------------------------------------------------------------------------------------
# writing


def _render_png(fig: Figure, dpi: float) -> bytes:
    """Render the figure at ``dpi`` to optimised RGB PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    out = io.BytesIO()
    PILImage.open(buf).convert("RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()


def save(fig: Figure, out_png: str | os.PathLike) -> Path:
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
