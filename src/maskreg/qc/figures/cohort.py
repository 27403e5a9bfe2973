"""Cohort figures: the summary plot of every subject's metrics before and after registration and runtime, with
failed and flagged subjects marked, and the table of failed subjects with their one-line errors.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from maskreg.qc.figures.common import C_FAILED, C_FLAGGED, save
from maskreg.qc.flags import parse_flags

_BAR = "#4c72b0"  # runtime bars of subjects that did not fail
_AFTER = "#1f77b4"  # "after" markers


@dataclass
class _Cohort:
    """Subjects of the metrics table, in row order, and which of them failed or were flagged."""

    subjects: list[str]
    failed: np.ndarray  # bool, one per subject
    flag_names: list[list[str]]  # flags of each subject; none for a failed subject
    flagged: np.ndarray  # bool, one per subject

    @property
    def n(self) -> int:
        """Number of subjects."""
        return len(self.subjects)


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    """Column ``name`` as floats (NaN for missing or non-numeric cells, all NaN for a missing column)."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)


def _cohort(df: pd.DataFrame) -> _Cohort:
    """Read subjects, failures (``status`` "failed") and flags (:mod:`maskreg.qc.flags`) from the table."""
    n = len(df)
    subjects = df["subject"].astype(str).tolist() if "subject" in df.columns else [str(i) for i in range(n)]
    status = df["status"].astype(str).str.strip().str.lower() if "status" in df.columns else pd.Series(["ok"] * n)
    failed = (status == "failed").to_numpy()
    flag_names = [
        [] if f else parse_flags(c)
        for f, c in zip(failed, df["flags"] if "flags" in df.columns else [None] * n, strict=False)
    ]
    flagged = np.array([bool(names) for names in flag_names], dtype=bool)
    return _Cohort(subjects, failed, flag_names, flagged)


def _panels(df: pd.DataFrame) -> list[tuple[str, str, str | None, bool]]:
    """Panels top to bottom as (y label, before column, after column or None for runtime, y axis from zero)."""
    panels = [("NCC (masked)", "ncc_before", "ncc_after", False)]
    if np.isfinite(_col(df, "dice_before")).any() or np.isfinite(_col(df, "dice_after")).any():
        panels.append(("mean Dice", "dice_before", "dice_after", False))
    if np.isfinite(_col(df, "tre_before_mm")).any() or np.isfinite(_col(df, "tre_after_mm")).any():
        panels.append(("TRE (mm)", "tre_before_mm", "tre_after_mm", True))
    panels.append(("runtime (s)", "seconds", None, True))
    return panels


def _no_values(ax) -> None:
    """Write "no values" in the middle of an empty panel."""
    ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=10)


def _draw_runtime(ax, y: np.ndarray, failed: np.ndarray) -> None:
    """Draw runtime bars (seconds, one per subject; failed subjects in red, missing values as 0)."""
    colours = [C_FAILED if f else _BAR for f in failed]
    ax.bar(np.arange(len(y)), np.nan_to_num(y, nan=0.0), color=colours, width=0.7)
    if np.isfinite(y).any() and np.nanmax(y) > 0:
        ax.set_ylim(bottom=0)
    else:
        ax.set_ylim(0, 1)
        _no_values(ax)


def _draw_before_after(ax, yb: np.ndarray, ya: np.ndarray, from_zero: bool) -> None:
    """Draw each subject's value before (open) and after (filled) with an arrow between them."""
    x = np.arange(len(yb))
    for i in range(len(yb)):
        if np.isfinite(yb[i]) and np.isfinite(ya[i]):
            ax.annotate(
                "",
                xy=(i, ya[i]),
                xytext=(i, yb[i]),
                arrowprops=dict(arrowstyle="-|>", color="0.45", lw=1, shrinkA=3, shrinkB=3),
            )
    ax.plot(x, yb, "o", mfc="white", mec="0.35", ms=6, ls="none", label="before")
    ax.plot(x, ya, "o", color=_AFTER, ms=6, ls="none", label="after")
    vals = np.concatenate([yb[np.isfinite(yb)], ya[np.isfinite(ya)]])
    if not vals.size:
        _no_values(ax)
        ax.set_ylim(0, 1)
    elif from_zero:
        ax.set_ylim(bottom=0, top=max(float(vals.max()) * 1.1, 1e-6))


def _mark_subjects(ax, co: _Cohort, runtime: bool) -> None:
    """Draw a red ✗ for each failed subject and, above the values, an amber ▲ for each flagged one."""
    ylo, yhi = ax.get_ylim()
    y_failed = 0.0 if runtime else ylo + 0.1 * (yhi - ylo)
    for i in np.flatnonzero(co.failed):
        ax.plot([i], [y_failed], marker="x", color=C_FAILED, ms=10, mew=2.5, ls="none", clip_on=False, zorder=5)
    if co.flagged.any():  # headroom above the values for the flag markers
        yhi = yhi + 0.18 * (yhi - ylo)
    for i in np.flatnonzero(co.flagged):
        y = ylo + 0.93 * (yhi - ylo)
        ax.plot([i], [y], marker="^", color=C_FLAGGED, mec="0.25", ms=9, ls="none", clip_on=False, zorder=5)
    ax.set_ylim(ylo, yhi)


def _draw_metric_panel(ax, df: pd.DataFrame, co: _Cohort, panel: tuple[str, str, str | None, bool]) -> None:
    """Draw one panel of the summary: bands behind failed/flagged subjects, the values, then the markers."""
    ylabel, before, after, from_zero = panel
    for i in np.flatnonzero(co.failed):
        ax.axvspan(i - 0.45, i + 0.45, color=C_FAILED, alpha=0.12, lw=0)
    for i in np.flatnonzero(co.flagged):
        ax.axvspan(i - 0.45, i + 0.45, color=C_FLAGGED, alpha=0.15, lw=0)
    if after is None:
        _draw_runtime(ax, _col(df, before), co.failed)
    else:
        _draw_before_after(ax, _col(df, before), _col(df, after), from_zero)
    _mark_subjects(ax, co, runtime=after is None)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _cohort_legend(fig: Figure, co: _Cohort) -> None:
    """Draw the legend below the panels; failed and flagged entries only when there are such subjects."""
    handles = [
        Line2D([], [], marker="o", mfc="white", mec="0.35", ls="none", label="before"),
        Line2D([], [], marker="o", color=_AFTER, ls="none", label="after"),
    ]
    if co.failed.any():
        handles.append(Line2D([], [], marker="x", color=C_FAILED, mew=2.5, ls="none", label="failed subject"))
    if co.flagged.any():
        handles.append(
            Line2D([], [], marker="^", color=C_FLAGGED, mec="0.25", ls="none", label="flagged subject [flags]")
        )
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9, frameon=False)


def _subject_ticks(ax, co: _Cohort) -> None:
    """Label the subject axis: "(failed)" in red, the flags in amber, slanted when there are many."""
    ax.set_xticks(np.arange(co.n))
    ticks = [
        f"{s} (failed)" if f else (f"{s} [{', '.join(names)}]" if names else s)
        for s, f, names in zip(co.subjects, co.failed, co.flag_names, strict=False)
    ]
    slanted = co.n > 3 or co.flagged.any()
    ax.set_xticklabels(ticks, rotation=45 if slanted else 0, ha="right" if slanted else "center", fontsize=8)
    for lab, f, g in zip(ax.get_xticklabels(), co.failed, co.flagged, strict=False):
        if f or g:
            lab.set_color(C_FAILED if f else C_FLAGGED)
            lab.set_fontweight("bold")
    pad = 0.6 if co.n >= 3 else 1.2
    ax.set_xlim(-pad, co.n - 1 + pad)


def _cohort_title(fig: Figure, co: _Cohort) -> None:
    """Title with the subject count and how many were flagged and failed (red when any failed)."""
    n, n_failed, n_flagged = co.n, int(co.failed.sum()), int(co.flagged.sum())
    head = f"Cohort summary: {n} subject{'s' if n != 1 else ''}"
    if n_flagged:
        head += f", {n_flagged} flagged"
    if n_failed:
        fig.suptitle(f"{head} — {n_failed} FAILED", fontsize=12, fontweight="bold", color=C_FAILED)
    else:
        fig.suptitle(f"{head}, none failed", fontsize=12, fontweight="bold")


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
    co = _cohort(df)
    panels = _panels(df)
    width = float(np.clip(2.0 + 0.35 * co.n, 6.0, 20.0))
    fig = Figure(figsize=(width, 1.9 * len(panels) + 1.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=False):
        _draw_metric_panel(ax, df, co, panel)
    _cohort_legend(fig, co)
    _subject_ticks(axes[-1], co)
    _cohort_title(fig, co)
    return save(fig, out_png)


# ----------------------------------------------------------------------------------------------------------
# failure table


def _failed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the subjects whose ``status`` is "failed" (none without a status column)."""
    if "status" in df.columns:
        return df[df["status"].astype(str).str.strip().str.lower() == "failed"]
    return df.iloc[0:0]


def _error_text(err: object) -> str:
    """A failure's error message on one line, at most 300 characters, wrapped to 110 characters a line."""
    err = "" if (err is None or (isinstance(err, float) and math.isnan(err))) else str(err)
    err = " ".join(err.split()) or "(no error message recorded)"
    if len(err) > 300:
        err = err[:297] + "..."
    return textwrap.fill(err, 110)


def _no_failures(n_subjects: int, out_png: str | os.PathLike) -> Path:
    """Write the green "no failures" banner in place of the table."""
    fig = Figure(figsize=(6, 1.2))
    fig.text(
        0.5,
        0.5,
        f"no failures ({n_subjects} subject{'s' if n_subjects != 1 else ''})",
        ha="center",
        va="center",
        fontsize=14,
        color="#2ca02c",
        fontweight="bold",
    )
    return save(fig, out_png)


def _style_table(table, units: list[float]) -> None:
    """Size each row to its share of text lines; grey bold header, failed subject names in bold red."""
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


def failure_table(metrics: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Write a table image of the failed subjects with their one-line ``error`` ("no failures" if none)."""
    df = metrics.reset_index(drop=True)
    failed = _failed_rows(df)
    if failed.empty:
        return _no_failures(len(df), out_png)
    rows = [[str(row.get("subject", "?")), _error_text(row.get("error", ""))] for _, row in failed.iterrows()]
    n_lines = [r[1].count("\n") + 1 for r in rows]
    units = [1.3] + [n + 0.8 for n in n_lines]  # header, then each row in text lines
    line_in = 0.19  # height of one text line in inches
    table_h = line_in * sum(units)
    fig_h = table_h + 0.75  # the table plus room for the title
    fig = Figure(figsize=(11, fig_h))
    ax = fig.add_axes((0.01, 0.2 / fig_h, 0.98, table_h / fig_h))
    ax.axis("off")
    fig.suptitle(
        f"{len(rows)} of {len(df)} subjects failed",
        fontsize=12,
        fontweight="bold",
        color=C_FAILED,
        y=1 - 0.08 / fig_h,
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
    _style_table(table, units)
    return save(fig, out_png)
