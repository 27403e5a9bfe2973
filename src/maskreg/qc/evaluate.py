"""Per-subject and cohort evaluation: before/after metrics of one registration, and the cohort tables.

"Before" means the moving data resampled on the fixed grid with the identity transform (physical
coordinates as the scanner gave them); "after" means with the registration's transform. NCC is computed
inside ``fixed_mask · moved moving_mask`` (the voxels the registration could use). The ``flags`` column names
what looks wrong with a finished registration (:mod:`maskreg.qc.flags`); the status stays ``ok``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from maskreg import logs
from maskreg.qc import flags as qc_flags
from maskreg.qc.metrics import (
    dice_per_label,
    jacobian_map,
    jacobian_stats,
    log_jacobian,
    masked_ncc,
    mean_dice,
    tre,
)
from maskreg.warp import common_labels, warp_image, warp_labels, warp_mask, warp_points

METRIC_COLUMNS = [
    "subject",
    "status",
    "device",
    "seconds",
    "overlap_voxels",
    "overlap_fraction",
    "ncc_before",
    "ncc_after",
    "dice_before",
    "dice_after",
    "jacobian_min",
    "jacobian_nonpositive_fraction",
    "displacement_max_mm",
    "fixed_mask_diagonal_mm",
    "tre_before_mm",
    "tre_after_mm",
    "tre_before_max_mm",
    "tre_after_max_mm",
    "flags",
    "error",
]
DICE_COLUMNS = ["subject", "label", "dice_before", "dice_after"]


def _weight(fixed_mask: sitk.Image, moved_mask: sitk.Image) -> np.ndarray:
    return (sitk.GetArrayFromImage(fixed_mask) > 0) & (sitk.GetArrayFromImage(moved_mask) > 0)


def displacement_max_mm(field: sitk.Image, mask: sitk.Image | None = None) -> float:
    """The largest displacement length (mm) of a displacement-field image over ``mask > 0`` (every voxel when
    None); nan when the mask is empty. ``mask`` lies on the field's grid."""
    u = sitk.GetArrayViewFromImage(field).astype(np.float64)
    length = np.sqrt(np.square(u).sum(axis=-1)) if field.GetNumberOfComponentsPerPixel() > 1 else np.abs(u)
    if mask is not None:
        if tuple(mask.GetSize()) != tuple(field.GetSize()):
            raise ValueError(
                f"displacement_max_mm: mask size {mask.GetSize()} differs from the field's "
                f"{field.GetSize()}; resample onto the fixed grid first."
            )
        length = length[sitk.GetArrayViewFromImage(mask) > 0]
    return float(length.max()) if length.size else math.nan


def mask_diagonal_mm(mask: sitk.Image) -> float:
    """The diagonal (mm) of the bounding box of ``mask > 0`` along the image's axes; nan when empty."""
    idx = np.nonzero(sitk.GetArrayViewFromImage(mask) > 0)
    if idx[0].size == 0:
        return math.nan
    voxels = np.array([i.max() - i.min() + 1 for i in idx[::-1]], dtype=np.float64)  # x, y[, z]
    return float(np.linalg.norm(voxels * np.asarray(mask.GetSpacing())))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def subject_metrics(
    subject: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    moving_mask: sitk.Image,
    warped: sitk.Image,
    warped_mask: sitk.Image,
    transform: sitk.Transform,
    linear_matrix: np.ndarray,
    report: dict,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    warped_labels: sitk.Image | None = None,
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
    field: sitk.Image | None = None,
    flag_thresholds: dict | None = None,
) -> tuple[dict, pd.DataFrame, dict]:
    """One metrics row (``METRIC_COLUMNS``), the Dice table and the "before" images (and the Jacobian
    determinant map when ``field``, the displacement applied before the linear part, is given).

    ``flags`` is computed from the row by :func:`maskreg.qc.flags.subject_flags` with ``flag_thresholds``
    (config ``qc.flags``; the defaults when None)."""
    identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
    before = warp_image(moving, fixed, identity)
    before_mask = warp_mask(moving_mask, fixed, identity)
    row = {c: math.nan for c in METRIC_COLUMNS}
    row.update(
        subject=subject,
        status="ok",
        device=report.get("device", ""),
        error="",
        seconds=report.get("seconds", math.nan),
        overlap_voxels=report.get("overlap_voxels", math.nan),
        overlap_fraction=_float(report.get("overlap_fraction")),
    )
    row["fixed_mask_diagonal_mm"] = mask_diagonal_mm(fixed_mask)
    row["ncc_before"] = masked_ncc(fixed, before, _weight(fixed_mask, before_mask))
    row["ncc_after"] = masked_ncc(fixed, warped, _weight(fixed_mask, warped_mask))
    # T = L ∘ (id + u): det J_T = det(A) · det(I + ∇u); linear only: det(A) everywhere
    jac = jacobian_map(fixed, linear_matrix, field)
    stats = jacobian_stats(jac, fixed_mask)
    row["jacobian_min"] = stats["jacobian_min"]
    row["jacobian_nonpositive_fraction"] = stats["jacobian_nonpositive_fraction"]
    if field is not None:
        row["displacement_max_mm"] = displacement_max_mm(field, fixed_mask)
    dice_rows = pd.DataFrame(columns=DICE_COLUMNS)
    extra = {"before": before, "before_mask": before_mask, "before_labels": None, "jacobian": jac}
    if fixed_labels is not None and moving_labels is not None and warped_labels is not None:
        common = common_labels(fixed_labels, moving_labels, subject=subject)
        before_labels = warp_labels(moving_labels, fixed, identity, "nearest")
        extra["before_labels"] = before_labels
        d0 = dice_per_label(fixed_labels, before_labels, common)
        d1 = dice_per_label(fixed_labels, warped_labels, common)
        dice_rows = pd.DataFrame(
            {
                "subject": subject,
                "label": common,
                "dice_before": [d0[k] for k in common],
                "dice_after": [d1[k] for k in common],
            }
        )
        row["dice_before"], row["dice_after"] = mean_dice(d0), mean_dice(d1)
    if fixed_points is not None and moving_points is not None:
        # forward transform: fixed-space points -> moving space, compared with the moving landmarks
        t0 = tre(fixed_points, moving_points, subject=subject)
        t1 = tre(warp_points(fixed_points, transform), moving_points, subject=subject)
        row["tre_before_mm"], row["tre_before_max_mm"] = t0["tre_mean_mm"], t0["tre_max_mm"]
        row["tre_after_mm"], row["tre_after_max_mm"] = t1["tre_mean_mm"], t1["tre_max_mm"]
    row["flags"] = qc_flags.format_flags(qc_flags.subject_flags(row, flag_thresholds))
    return row, dice_rows, extra


def jacobian_output(
    fixed: sitk.Image,
    linear_matrix: np.ndarray,
    field: sitk.Image | None = None,
    *,
    include_linear: bool = True,
    log: bool = False,
    full: sitk.Image | None = None,
) -> sitk.Image:
    """The image of ``results/{subject}/transforms/jacobian.nii.gz``: float32 on the fixed grid, the Jacobian
    determinant of the fixed → moving map ``x ↦ A(x + u(x)) + b`` in LPS mm (:func:`maskreg.qc.metrics.jacobian_map`;
    with ``include_linear=False`` the deformable part ``det(I + ∂u/∂x)`` alone), as its logarithm with ``log``
    (:func:`maskreg.qc.metrics.log_jacobian`, floor 0.001 as ANTs). A linear-only registration (``field`` None)
    gets the constant ``det(A)`` (1 without the linear part), so every subject has the file. ``full``: the
    full map already computed (``subject_metrics``' ``extra["jacobian"]``), reused instead of recomputed."""
    if full is not None and include_linear:
        det = full
    else:
        det = jacobian_map(fixed, linear_matrix, field, include_linear=include_linear)
    if log:
        det = log_jacobian(det)
    return sitk.Cast(det, sitk.sitkFloat32)


def read_report(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return json.load(fh)


def failed_row(subject: str, error: str) -> dict:
    row = {c: math.nan for c in METRIC_COLUMNS}
    row.update(subject=subject, status="failed", device="", flags="", error=error)
    return row


def cohort_tables(
    subjects: list[str], results_dir: str | os.PathLike = "results", logs_dir: str | os.PathLike = "logs"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gather every subject's ``qc/metrics.tsv`` and ``qc/dice.tsv``; a subject without them is listed as
    failed with the ``ERROR:`` line of its first failed job's log (or 'not run')."""
    rows, dice = [], []
    for s in subjects:
        m = Path(results_dir, s, "qc", "metrics.tsv")
        if m.exists():
            rows.append(pd.read_csv(m, sep="\t", keep_default_na=True).iloc[0].to_dict())
            d = Path(results_dir, s, "qc", "dice.tsv")
            if d.exists() and d.stat().st_size > 0:
                dd = pd.read_csv(d, sep="\t")
                if len(dd):
                    dice.append(dd)
            continue
        err = None
        for log in sorted(Path(logs_dir, s).glob("*.log")) if Path(logs_dir, s).exists() else []:
            err = logs.last_error(log)
            if err:
                err = f"{log.stem}: {err}"
                break
        rows.append(failed_row(s, err or "not run (an upstream job failed or was not scheduled)"))
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    metrics["flags"] = [qc_flags.format_flags(qc_flags.parse_flags(f)) for f in metrics["flags"]]
    dice_df = pd.concat(dice, ignore_index=True) if dice else pd.DataFrame(columns=DICE_COLUMNS)
    return metrics, dice_df


def write_cohort(
    subjects: list[str],
    metrics_path: str | os.PathLike,
    dice_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    failures_path: str | os.PathLike,
    results_dir: str | os.PathLike = "results",
    logs_dir: str | os.PathLike = "logs",
) -> pd.DataFrame:
    """Write the cohort tables, the summary figure and the table of failed subjects with their one-line
    errors ("no failures" when none); return the metrics table. Used by the cohort rule and, after a failed
    run, by the workflow's error hook."""
    from maskreg.io import write_table
    from maskreg.qc.figures import cohort_summary, failure_table

    metrics, dice = cohort_tables(subjects, results_dir, logs_dir)
    write_table(metrics, metrics_path)
    write_table(dice, dice_path)
    cohort_summary(metrics, summary_path)
    failure_table(metrics, failures_path)
    return metrics
