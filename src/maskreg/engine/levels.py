"""What every pyramid level of a stage shares: the iteration loop (stepper, plateau test, progress bar), the
overlap checks at its start and end, and its closing report."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import numpy as np
import torch

from maskreg.engine.grid import Grid
from maskreg.engine.result import LevelReport, StageReport
from maskreg.engine.stepper import Stepper
from maskreg.errors import OverlapError, where

if TYPE_CHECKING:
    from maskreg.engine.problem import Problem

log = logging.getLogger("maskreg")


PLATEAU_WINDOW = 10


def plateau(trace: torch.Tensor, it: int, tol: float, window: int = PLATEAU_WINDOW) -> bool:
    """True when the mean loss of the last ``window`` iterations improved on the ``window`` before by less
    than the fraction ``tol`` (checked every 5 iterations, so the host reads the device trace rarely)."""
    if tol <= 0 or it < 2 * window or it % 5:
        return False
    recent = trace[it - 2 * window : it].cpu()
    prev, last = float(recent[:window].mean()), float(recent[window:].mean())
    return (prev - last) / (abs(prev) + 1e-12) < tol


def level_min_overlap(min_overlap: int, fixed_mask_sum: float, per_voxel: float = 1.0) -> float:
    """The overlap a level needs, in the level's voxels: ``min_overlap_voxels`` full-resolution fixed voxels
    (``per_voxel`` of them in one voxel of the level, so the same volume at every level), or half the level's
    fixed mask (sum of weights) where that is smaller. A small ROI has few voxels at a coarse level (a 15 mm
    ball: ~30 at 8 mm), and failing it for "too little overlap" while 90 % of it overlaps would be wrong; losing
    half of the mask is still an error. Counted in coarse voxels instead, 100 voxels at shrink 4 in 3D would be
    6,400 at full resolution, and masks of different extents (a brain mask eroded through open sulci on one
    side) would fail the coarsest level where ANTs registers them."""
    return min(float(min_overlap) / per_voxel, 0.5 * fixed_mask_sum)


def voxels_per_level_voxel(prob: Problem, grid: Grid) -> float:
    """How many full-resolution fixed voxels one voxel of ``grid`` (a level of the fixed image) holds."""
    return float(np.prod(grid.spacing) / np.prod(prob.fgrid.spacing))


def _needed_text(need: float, min_overlap: int, per_voxel: float = 1.0) -> str:
    if need >= min_overlap / per_voxel - 1e-9:
        if per_voxel <= 1:
            return f"{need:.4g} are needed (min_overlap_voxels)"
        return (
            f"{need:.4g} are needed (min_overlap_voxels = {min_overlap} full-resolution voxels, "
            f"{per_voxel:.3g} in each voxel of this level)"
        )
    return (
        f"{need:.4g} are needed (half the fixed mask at this level, which is smaller than "
        f"min_overlap_voxels = {min_overlap})"
    )


def check_start_overlap(
    prob: Problem, level_name: str, ow: float, fixed_mask_sum: float, min_overlap: int, per_voxel: float = 1.0
) -> None:
    """Raise :class:`OverlapError` when a level starts with too little overlap; the advice depends on whether
    an earlier level had enough (then the optimisation, not the input, lost it)."""
    need = level_min_overlap(min_overlap, fixed_mask_sum, per_voxel)
    if ow >= need:
        return
    head = (
        f"{where(prob.subject)}{level_name}: only {ow:.0f} effective voxels of the fixed mask map inside the "
        f"moving image and its mask ({100 * ow / max(fixed_mask_sum, 1e-9):.1f}% of the fixed mask); at least "
        f"{_needed_text(need, min_overlap, per_voxel)}. "
    )
    if prob.last_level is None:
        raise OverlapError(head + "Check the initial alignment, the masks and the fields of view.")
    name, fraction = prob.last_level
    raise OverlapError(
        head + f"The overlap was {100 * fraction:.1f}% of the fixed mask at the end of {name}, " + _LOST_OVERLAP
    )


_LOST_OVERLAP = (
    "so the optimisation moved the fixed mask off the moving image or its mask: the loss fell by "
    "shrinking the overlap (typical of mse between different subjects or contrasts, or of a too "
    "high learning_rate). Use cc or mi, a lower learning_rate, or masks that exclude what differs."
)


def finish_level(
    prob: Problem,
    report: StageReport,
    level_name: str,
    grid: Grid,
    scale,
    it: int,
    trace: torch.Tensor,
    overlap: tuple[float, int],
    fixed_mask_sum: float,
    t0: float,
    converged: bool,
    loss_name: str,
    start_overlap: float,
    min_overlap: int,
) -> None:
    """Record a level's report (loss trace, ``overlap`` at its end: sum of weights and voxels with weight > 0.5,
    time) and log its one line; raise :class:`OverlapError` when the level ends with less overlap than
    ``min_overlap`` (it started with more)."""
    losses = trace[:it].cpu().tolist()
    ow, ov = overlap
    per_voxel = voxels_per_level_voxel(prob, grid)
    need = level_min_overlap(min_overlap, fixed_mask_sum, per_voxel)
    if ow < need:
        raise OverlapError(
            f"{where(prob.subject)}{level_name}: the overlap fell from {start_overlap:.0f} effective "
            f"voxels at the start of the level to {ow:.0f} after {it} iterations; at least "
            f"{_needed_text(need, min_overlap, per_voxel)}. The loss went from "
            f"{losses[0] if losses else math.nan:.5g} to {losses[-1] if losses else math.nan:.5g}, " + _LOST_OVERLAP
        )
    prob.last_level = (level_name, ow / max(fixed_mask_sum, 1e-9))
    rep = LevelReport(
        int(scale),
        list(grid.shape),
        it,
        losses[0] if losses else math.nan,
        losses[-1] if losses else math.nan,
        round(ow, 1),
        ov,
        round(ow / max(fixed_mask_sum, 1e-9), 4),
        round(time.perf_counter() - t0, 3),
        converged,
        [round(v, 6) for v in losses],
    )
    report.levels.append(rep)
    log.info(
        "%s%s, grid %s: %d iterations%s, %s %.5f -> %.5f, overlap %.0f voxels (%.1f%% of the fixed mask), %.2f s",
        where(prob.subject),
        level_name,
        "x".join(map(str, grid.size)),
        it,
        " (converged)" if converged else "",
        loss_name,
        rep.loss_first,
        rep.loss_last,
        ow,
        100 * rep.overlap_fraction,
        rep.seconds,
    )


def interactive() -> bool:
    return sys.stderr.isatty()


def iterate(
    iteration: Callable[[Hashable], None],
    n_it: int,
    trace: torch.Tensor,
    tol: float,
    device: torch.device,
    *,
    key: Callable[[], Hashable] | None = None,
    optimiser_converged: Callable[[], bool] | None = None,
    graphs: bool = True,
    desc: str | None = None,
) -> tuple[int, bool]:
    """A level's iterations, the loop the linear and deformable stages share: up to ``n_it`` calls of
    ``iteration(key())`` through a :class:`~maskreg.engine.stepper.Stepper` (CUDA-graph replays where ``graphs``),
    which writes iteration ``i``'s loss to ``trace[i]``. The level stops early when the loss plateaus
    (:func:`plateau`, ``tol``) or, with ``tol > 0`` and every 5 iterations, when ``optimiser_converged()``.
    A progress bar (``desc``) shows on a terminal. Returns (iterations done, whether it stopped early)."""
    stepper = Stepper(iteration, device, graphs=graphs)
    bar = None
    if desc is not None and interactive():
        from tqdm import tqdm

        bar = tqdm(total=n_it, desc=desc, leave=False)
    converged, it = False, 0
    for it in range(1, n_it + 1):
        stepper(None if key is None else key())
        if bar is not None:
            bar.update(1)
        # tolerance 0 turns both early stops off (random sampling: a noisy gradient halves the step at random)
        if plateau(trace, it, tol) or (
            optimiser_converged is not None and tol > 0 and it % 5 == 0 and optimiser_converged()
        ):
            converged = True
            break
    if bar is not None:
        bar.close()
    stepper.close()
    return it, converged
