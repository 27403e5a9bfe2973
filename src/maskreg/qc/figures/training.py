"""The loss curve of a model's training: each loss term against the step, and a running mean of the total."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from maskreg.qc.figures.common import save

TERMS = ("loss", "image", "label", "regulariser")


def _running_mean(values: np.ndarray, width: int) -> np.ndarray:
    """The mean of each value and the ``width - 1`` before it (fewer at the start)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    n = np.minimum(np.arange(1, values.size + 1), width)
    return (c[1:] - c[np.arange(values.size) + 1 - n]) / n


def training_curve(history: Sequence[Mapping[str, float]], out_png: str | os.PathLike) -> Path:
    """One panel per loss term that is not always zero (``history``: one mapping per step with ``step`` and the
    terms of :data:`TERMS`), raw values faint and a running mean over 5 % of the steps on top."""
    steps = np.array([h["step"] for h in history], dtype=float)
    shown = [t for t in TERMS if any(abs(h.get(t, 0.0)) > 0 for h in history)] or ["loss"]
    fig = Figure(figsize=(3.2 * len(shown), 2.6))
    width = max(1, len(history) // 20)
    for i, term in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        v = np.array([h.get(term, 0.0) for h in history], dtype=float)
        ax.plot(steps, v, color="0.75", lw=0.6)
        ax.plot(steps, _running_mean(v, width), color="C0", lw=1.4)
        ax.set_title("total" if term == "loss" else term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save(fig, out_png)
