"""Flags: rules that turn one subject's metrics row into the names of what looks wrong with a finished
registration.

A flag does not fail a subject (its status stays ``ok``); it marks a result a person should look at. Each
rule reads only columns of the metrics row (:data:`maskreg.qc.evaluate.METRIC_COLUMNS`), so a flag can be
checked from ``results/cohort/metrics.tsv`` by hand. A rule whose values are missing (no labels, no
landmarks, no deformable field) does not fire; a threshold of ``None`` turns its rule off. Failed subjects
get no flags: their ``error`` says what happened.

| flag | fires when | default threshold |
|---|---|---|
| ``ncc_worse`` | ``ncc_after < ncc_before - t`` (masked NCC) | 0.01 |
| ``dice_worse`` | ``dice_after < dice_before - t`` (mean Dice, when labels exist) | 0.01 |
| ``tre_worse`` | ``tre_after_mm > tre_before_mm + t`` (mm, when landmarks exist) | 0.5 mm |
| ``folding`` | ``jacobian_nonpositive_fraction > t`` (share of the fixed mask with det J ≤ 0) | 0 |
| ``low_overlap`` | ``overlap_fraction < t`` (share of the fixed mask the loss could use at the end) | 0.25 |
| ``large_displacement`` | ``displacement_max_mm > t · fixed_mask_diagonal_mm`` (deformable field) | 0.1 |

``low_overlap`` is lenient by default because a fixed image without a mask counts its whole field of view: the
demo's abdominal CT pair, registered well, ends with well under half of the fixed scan overlapping the smaller
moving scan. With an ROI fixed mask, 0.8 is a stricter choice.

Torch-free and pandas-free (the QC jobs import it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

SEPARATOR = ";"

#: every flag with its default threshold (config ``qc.flags``; the schema repeats these defaults)
DEFAULTS: dict[str, float] = {
    "ncc_worse": 0.01,
    "dice_worse": 0.01,
    "tre_worse": 0.5,
    "folding": 0.0,
    "low_overlap": 0.25,
    "large_displacement": 0.1,
}
FLAG_NAMES = tuple(DEFAULTS)


def thresholds(config: Mapping[str, Any] | None = None) -> dict[str, float | None]:
    """The defaults updated with ``config`` (``qc.flags``); ``None`` turns a flag off. Raises ``ValueError`` for
    an unknown flag name (the workflow's schema reports it earlier)."""
    out: dict[str, float | None] = dict(DEFAULTS)
    for k, v in (config or {}).items():
        if k not in DEFAULTS:
            raise ValueError(f"qc.flags: unknown flag {k!r}; known: {', '.join(FLAG_NAMES)}")
        out[k] = None if v is None else float(v)
    return out


def _num(row: Mapping[str, Any], key: str) -> float:
    v = row.get(key)
    try:
        v = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v


def subject_flags(row: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list[str]:
    """The names of the flags that ``row`` (one subject's metrics) raises, in :data:`FLAG_NAMES` order;
    ``[]`` for a failed subject or a clean one. ``config`` holds thresholds by flag name (``qc.flags``)."""
    if str(row.get("status", "ok")).strip().lower() == "failed":
        return []
    t = thresholds(config)
    v = {
        k: _num(row, k)
        for k in (
            "ncc_before",
            "ncc_after",
            "dice_before",
            "dice_after",
            "tre_before_mm",
            "tre_after_mm",
            "jacobian_nonpositive_fraction",
            "overlap_fraction",
            "displacement_max_mm",
            "fixed_mask_diagonal_mm",
        )
    }
    # a comparison with nan is False: a rule without its values does not fire
    rules = {
        "ncc_worse": lambda x: v["ncc_after"] < v["ncc_before"] - x,
        "dice_worse": lambda x: v["dice_after"] < v["dice_before"] - x,
        "tre_worse": lambda x: v["tre_after_mm"] > v["tre_before_mm"] + x,
        "folding": lambda x: v["jacobian_nonpositive_fraction"] > x,
        "low_overlap": lambda x: v["overlap_fraction"] < x,
        "large_displacement": lambda x: v["displacement_max_mm"] > x * v["fixed_mask_diagonal_mm"],
    }
    return [name for name in FLAG_NAMES if t[name] is not None and bool(rules[name](t[name]))]


def format_flags(names: Iterable[str]) -> str:
    """The ``flags`` cell: names joined by ``;`` (empty when none)."""
    return SEPARATOR.join(names)


def parse_flags(cell: Any) -> list[str]:
    """The names in a ``flags`` cell (empty, ``None`` and NaN give ``[]``)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    return [f.strip() for f in str(cell).split(SEPARATOR) if f.strip()]
