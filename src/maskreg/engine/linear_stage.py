"""Linear stages (translation, rigid, similarity, affine): level by level from a start, the first level from
several starts when a ``search`` or the moments stage offers them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maskreg.engine import linear as lin
from maskreg.engine.dense import DenseSampler, dense_overlap, level_maps, level_theta
from maskreg.engine.initial import search_candidates
from maskreg.engine.levels import check_start_overlap, finish_level, iterate, level_min_overlap, voxels_per_level_voxel
from maskreg.engine.losses import VALUE_AND_GRAD, get_loss, local_cc_over_region
from maskreg.engine.optimisers import Adam, RegularStep, schedule
from maskreg.engine.points import PointLoss
from maskreg.engine.problem import Problem, mask_use, normalised_intensities
from maskreg.engine.result import StageReport
from maskreg.errors import MaskregError, OverlapError, where
from maskreg.loss_names import NEEDS_DENSE
from maskreg.transforms import LinearTransform

log = logging.getLogger("maskreg")


@dataclass
class LinearRun:
    """What the levels of one linear stage share: the stage, its loss, the sampling and the point generator."""

    stage: dict
    loss_name: str
    loss_fn: Any
    random_n: int | None
    fraction: float
    seed: int
    min_overlap: int
    gen: torch.Generator

    def level_key(self, li: int) -> tuple:
        sigmas = self.stage.get("smoothing_sigmas") or [None] * len(self.stage["scales"])
        return int(self.stage["scales"][li]), sigmas[li], mask_use(self.stage)


def run_linear_stage(
    prob: Problem,
    stage: dict,
    start: LinearTransform,
    sampling,
    min_overlap: int,
    seed: int,
    report: StageReport,
    alternatives: Sequence[LinearTransform] = (),
) -> LinearTransform:
    """A linear stage from ``start`` (fixed → moving points), level by level; its first level also refines
    ``alternatives`` and the poses of a ``search`` (:func:`refined_first_level`)."""
    kind = stage["type"]
    loss_name, loss_fn = get_loss(stage["loss"])
    random_n = sampling.get("random") if isinstance(sampling, dict) else None
    fraction = float(sampling.get("fraction", 1.0)) if isinstance(sampling, dict) else 1.0
    if random_n and loss_name in NEEDS_DENSE:
        raise MaskregError(
            f"stage {kind}: loss '{loss_name}' needs dense sampling (it uses neighbourhoods); "
            f"use mse, gc, mi or nmi with random sampling."
        )
    gen = torch.Generator(device=prob.device)
    gen.manual_seed(seed)
    run = LinearRun(stage, loss_name, loss_fn, random_n, fraction, seed, min_overlap, gen)
    current = start
    for li in range(len(stage["scales"])):
        if li == 0 and (stage.get("search") or alternatives):
            current = refined_first_level(prob, run, current, list(alternatives), report)
        else:
            current = run_linear_level(prob, run, li, current, report)
    return current


def pose_score(prob: Problem, run: LinearRun, level_key: tuple, tx: LinearTransform, min_weight: float) -> float:
    """The stage's loss of ``tx`` on every fixed-mask voxel of the level (dense), with the moving image scaled
    by what ``tx`` samples (as :func:`maskreg.engine.initial.moments_stage` scores its candidates); ``inf`` when
    the weight sum is below ``min_weight`` (a pose that keeps little of the fixed mask cannot win by what it
    leaves out)."""
    fl, ml = prob.levels(*level_key)
    with torch.no_grad():
        dense = DenseSampler(fl, ml, *normalised_intensities(fl, ml, tx))
        fv, wv, w = dense(torch.as_tensor(tx.homogeneous(), dtype=torch.float32, device=prob.device))
        if float(w.sum()) < min_weight:
            return math.inf
        if run.loss_name in NEEDS_DENSE:  # as the stage optimises it: over the whole fixed mask (overlap-aware)
            return float(local_cc_over_region(fv, wv, w, float(fl.mask.sum()), int(run.stage["window"])))
        return float(run.loss_fn(fv, wv, w, window=int(run.stage["window"]), bins=int(run.stage["bins"])))


def refined_first_level(
    prob: Problem, run: LinearRun, start: LinearTransform, alternatives: list[LinearTransform], report: StageReport
) -> LinearTransform:
    """The stage's first (coarsest) level optimised from several starts, and the best optimum kept: ``start``,
    the ``alternatives`` (other starts the moments stage scored) and, with ``search``, the best ``keep`` of the
    :func:`search_candidates` poses scored by the stage's masked loss on the level (:func:`pose_score`): a
    global search for starts beyond gradient descent's reach (greedy's ``-search``, ANTs' ``antsAI``). The
    optima are compared by :func:`pose_score`; the kept run's level report is the stage's first."""
    kind = run.stage["type"]
    search = run.stage.get("search") or {"candidates": 1, "keep": 1, "angle_deg": 0.0, "translation_mm": 0.0}
    level_key = run.level_key(0)
    fl, ml = prob.levels(*level_key)
    t0 = time.perf_counter()
    candidates = search_candidates(prob, search, kind, start, run.seed)
    h_start = torch.as_tensor(start.homogeneous(), dtype=torch.float32, device=prob.device)
    fsum = float(fl.mask.sum())
    start_weight = dense_overlap(DenseSampler(fl, ml, fl.image, ml.image), h_start, fsum)[0]
    min_weight = max(
        0.5 * start_weight, level_min_overlap(run.min_overlap, fsum, voxels_per_level_voxel(prob, fl.grid))
    )
    scores = np.array([pose_score(prob, run, level_key, c, min_weight) for c in candidates])
    keep = int(search["keep"])
    order = [int(i) for i in np.argsort(scores, kind="stable")[:keep] if np.isfinite(scores[i])]
    if 0 not in order:  # the start itself is always refined: the search can only add to it
        order = order[: keep - 1] + [0]
    if run.stage.get("search"):
        log.info(
            "%sstage %s: search scored %d poses (±%g°, ±%g mm) by %s in %.2f s; start %.5g, best %.5g",
            where(prob.subject),
            kind,
            len(candidates),
            search["angle_deg"],
            search["translation_mm"],
            run.loss_name,
            time.perf_counter() - t0,
            scores[0],
            float(np.min(scores)),
        )
    candidates += alternatives
    order += list(range(len(candidates) - len(alternatives), len(candidates)))
    best: tuple[float, LinearTransform, StageReport, int] | None = None
    first_error: OverlapError | None = None
    for i in order:
        rep = StageReport(report.type, report.loss, 0.0)
        try:
            end = run_linear_level(prob, run, 0, candidates[i], rep)
        except OverlapError as exc:
            first_error = first_error or exc
            continue
        score = pose_score(prob, run, level_key, end, 0.0)
        if best is None or score < best[0]:
            best = (score, end, rep, i)
    if best is None:
        assert first_error is not None
        raise first_error
    log.info(
        "%sstage %s: level 1 optimised from %d starts; kept %s (%s %.5g)",
        where(prob.subject),
        kind,
        len(order),
        "the start" if best[3] == 0 else f"start {order.index(best[3]) + 1}",
        run.loss_name,
        best[0],
    )
    report.levels.extend(best[2].levels)
    return best[1]


class LinearLevel:
    """One pyramid level of a linear stage from ``current`` (fixed → moving points). Pointwise losses evaluate
    jittered fixed-mask points, their gradient through the moving gradient image (:mod:`maskreg.engine.points`:
    no interpolation bias, no ``grid_sample`` backward); cc evaluates every voxel, its gradient through autograd."""

    def __init__(self, prob: Problem, run: LinearRun, li: int, current: LinearTransform):
        self.prob, self.run_, self.li, self.current = prob, run, li, current
        self.t0 = time.perf_counter()
        stage = run.stage
        self.kind, self.scale, self.n_it = stage["type"], int(stage["scales"][li]), int(stage["iterations"][li])
        self.level_key = run.level_key(li)
        # a valid moving mask: a field of view's edge is an artefact and must not pull (only an ROI's may)
        self.valid_moving = prob.kinds["moving"] == "valid" and self.level_key[2][1]
        self.fl, self.ml = prob.levels(*self.level_key)
        self.maps = level_maps(self.fl.grid, self.ml.grid, prob.device)
        self.fsum = float(self.fl.mask.sum())
        self.p = torch.zeros(lin.n_params(self.kind, prob.dim), device=prob.device, requires_grad=True)
        self.points, self.dense = self._samplers()
        self.name = f"stage {self.kind}, level {li + 1}/{len(stage['scales'])} (scale {self.scale})"

    def _samplers(self) -> tuple[PointLoss | None, DenseSampler | None]:
        """(points, dense): the level's point sampler for pointwise losses, or its dense sampler for cc."""
        run, prob = self.run_, self.prob
        f_n, m_n = prob.normalised(self.level_key, self.current)
        if run.loss_name in NEEDS_DENSE:
            return None, DenseSampler(self.fl, self.ml, f_n, m_n)
        if run.random_n:
            return PointLoss(f_n, self.fl.mask, m_n, self.ml.mask, run.gen, run.random_n), None
        return prob.point_loss(self.level_key, run.fraction, run.seed, self.current), None

    def overlap(self, h: torch.Tensor) -> tuple[float, int]:
        """(sum of weights, voxels with weight > 0.5) of the homogeneous fixed → moving matrix ``h``."""
        if self.points is None:
            return dense_overlap(self.dense, h, self.fsum)[:2]
        return self.points.overlap(level_theta(h, self.maps, self.prob.dim)[0])

    def iteration(self, _key) -> None:  # graph-safe: see maskreg.engine.stepper
        """Evaluate the loss and its parameter gradient, record the loss, step."""
        run = self.run_
        h = lin.homogeneous(self.kind, self.p, self.start_t, self.prob.radius)
        if self.points is not None:
            theta = level_theta(h, self.maps, self.prob.dim)[0]
            loss, dtheta = self.points(theta, VALUE_AND_GRAD[run.loss_name], bins=int(run.stage["bins"]))
            # chain through θ as a scalar: autograd.grad with grad_outputs imports sympy on first use (a slow start)
            (grad,) = torch.autograd.grad((theta * dtheta).sum(), [self.p])
        else:
            fixed_v, warped_v, w = self.dense(h)  # cc, the one loss that runs densely here
            if self.valid_moving:
                w = w.detach()
            loss = local_cc_over_region(fixed_v, warped_v, w, self.fsum, int(run.stage["window"]))
            (grad,) = torch.autograd.grad(loss, [self.p])
        self.trace.index_copy_(0, self.opt.t, loss.detach().reshape(1))
        self.opt.step(grad)

    def run(self, report: StageReport) -> LinearTransform:
        """Check the overlap at the start, iterate, check it at the end and report; returns the level's
        transform."""
        prob, run, stage, dev = self.prob, self.run_, self.run_.stage, self.prob.device
        ow = self.overlap(lin.homogeneous(self.kind, self.p.detach(), self.current, prob.radius))[0]
        check_start_overlap(prob, self.name, ow, self.fsum, run.min_overlap, voxels_per_level_voxel(prob, self.fl.grid))
        lr = stage["learning_rate"][self.li] * float(np.mean(self.fl.grid.spacing))
        self.opt = (RegularStep if stage["optimizer"] == "regular_step" else Adam)(self.p, schedule(lr, self.n_it, dev))
        self.trace = torch.zeros(max(self.n_it, 1), device=dev)
        self.start_t = lin.start_tensors(self.current, dev)
        # random sampling draws new points at every iteration: not graph-safe, so eager. Its loss is noisy by
        # construction, so a plateau test would stop at random: it runs the level's whole (decayed) schedule
        tol = 0.0 if run.random_n else float(stage["tolerance"])
        it, converged = iterate(
            self.iteration,
            self.n_it,
            self.trace,
            tol,
            dev,
            optimiser_converged=self.opt.converged,
            graphs=not run.random_n,
            desc=f"{self.kind} s{self.scale}",
        )
        current = lin.to_linear(self.kind, self.p.detach(), self.current, prob.radius)
        end_overlap = self.overlap(lin.homogeneous(self.kind, torch.zeros_like(self.p), current, prob.radius))
        finish_level(
            prob,
            report,
            self.name,
            self.fl.grid,
            self.scale,
            it,
            self.trace,
            end_overlap,
            self.fsum,
            self.t0,
            converged,
            run.loss_name,
            ow,
            run.min_overlap,
        )
        return current


def run_linear_level(
    prob: Problem, run: LinearRun, li: int, current: LinearTransform, report: StageReport
) -> LinearTransform:
    """One pyramid level of a linear stage from ``current``; appends its
    :class:`~maskreg.engine.result.LevelReport` to ``report`` and returns the level's transform (fixed → moving
    points)."""
    return LinearLevel(prob, run, li, current).run(report)
