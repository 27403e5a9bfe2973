"""QC figures written as PNG files: registration overlays (:mod:`.overlay`), mask overviews (:mod:`.masks`)
cohort summaries and failure tables (:mod:`.cohort`) and a model's training curve (:mod:`.training`).

Slices are chosen and oriented for display by :mod:`.views` (radiological convention, physical aspect ratio),
windowed and edge-mapped by :mod:`.intensity`, and drawn and written with the helpers, sizes and colours of
:mod:`.common`. The package never imports torch.
"""

from maskreg.qc.figures.cohort import cohort_summary, failure_table
from maskreg.qc.figures.common import (
    C_EDGE_AFTER,
    C_EDGE_BEFORE,
    C_FAILED,
    C_FIXED_LABEL,
    C_FIXED_MASK,
    C_FLAGGED,
    C_FOLD,
    C_MOVING_MASK,
    C_WARPED_LABEL,
    DPI,
    MAX_PNG_BYTES,
    PANEL_IN,
)
from maskreg.qc.figures.masks import mask_overview
from maskreg.qc.figures.overlay import registration_overlay
from maskreg.qc.figures.training import training_curve
from maskreg.qc.figures.views import slice_indices, view_slices

__all__ = [
    "registration_overlay",
    "mask_overview",
    "cohort_summary",
    "failure_table",
    "training_curve",
    "slice_indices",
    "view_slices",
    # sizes and colours of the figures
    "C_EDGE_AFTER",
    "C_EDGE_BEFORE",
    "C_FAILED",
    "C_FIXED_LABEL",
    "C_FIXED_MASK",
    "C_FLAGGED",
    "C_FOLD",
    "C_MOVING_MASK",
    "C_WARPED_LABEL",
    "DPI",
    "MAX_PNG_BYTES",
    "PANEL_IN",
]
