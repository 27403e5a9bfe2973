"""Where the linear stages start: the ``moments`` stage (centres of mass, principal axes) and the random poses of a
stage's ``search``, with the small algebra of linear transforms they need."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from maskreg.engine.dense import DenseSampler
from maskreg.engine.losses import get_loss
from maskreg.engine.moments import weighted_moments
from maskreg.engine.problem import Problem, mask_use, normalised_intensities
from maskreg.errors import where
from maskreg.transforms import LinearTransform

log = logging.getLogger("maskreg")


# (centre of mass (dim,) LPS mm, second moments (dim, dim) mm²) of one image's masked intensities
Moments = tuple[np.ndarray, np.ndarray]


def moments_stage(
    prob: Problem, start: LinearTransform, stage: dict | None = None, alternatives: list[LinearTransform] | None = None
) -> LinearTransform:
    """Translate so the mask-weighted intensity centres of mass correspond: ``T(com_f) = com_m``.

    When only one image has a mask (an all-ones mask is none), its masked centre and the other image's whole
    centre are not the same thing (a hippocampus against a head), so three translations are scored with the
    stage's loss (default ``mi``) at a coarse level and the best is kept: masked centre against whole centre,
    whole against whole, and the start's (no translation). Each candidate is scored with the moving image scaled
    by what it samples, as the next stage would scale it. Scores of unoptimised poses can be close and rank them
    wrongly, so the losers go to ``alternatives``: the next linear stage refines them too at its first level and
    keeps the best optimum (:func:`maskreg.engine.linear_stage.refined_first_level`).

    With ``centre: geometry`` the centres of the two images' extents correspond instead (ITK's ``GEOMETRY``
    initialiser, ANTs' ``--initial-moving-transform [fixed,moving,0]``): neither intensities nor masks are read.
    It suits images cropped around the same anatomy whose headers do not place them (e.g. resampled volumes).

    With ``principal_axes: true`` the rotation that maps the fixed image's principal axes (eigenvectors of the
    mask- and intensity-weighted second moments, in LPS mm) onto the moving image's is added. Each axis is
    known only up to its sign, so every proper rotation ``R = V_m S V_fᵀ`` (``S`` = diag(±1), det R = +1) and
    the rotation-free translation are scored the same way, and the best is kept. When either image has two
    nearly equal moments (ratio > 0.95), their axes have no reliable direction and the rotation is skipped.
    """
    stage = stage or {}
    if stage.get("centre") == "geometry":
        return _translated(start, prob.fgrid.centre(), prob.mgrid.centre())
    use = mask_use(stage)
    fm, mm = (prob.fm if use[0] else prob.ones_f), (prob.mm if use[1] else prob.ones_m)
    pairs = [(_image_moments(prob.f, fm, prob.fgrid), _image_moments(prob.m, mm, prob.mgrid))]
    one_sided = (prob.masked[0] and use[0]) != (prob.masked[1] and use[1])
    if one_sided:  # the whole images' centres too ("ones" is what a missing mask is)
        pairs.append((_image_moments(prob.f, prob.ones_f, prob.fgrid), _image_moments(prob.m, prob.ones_m, prob.mgrid)))
    out = _translated(start, pairs[0][0][0], pairs[0][1][0])
    if not one_sided and not stage.get("principal_axes"):
        return out
    pair = pairs[0]
    if one_sided:
        best = _best_translation(prob, stage, start, pairs, alternatives)
        if best == len(pairs):  # the start's alignment: no centres to turn the axes about
            return start
        pair = pairs[best]
        out = _translated(start, pair[0][0], pair[1][0])
    if not stage.get("principal_axes"):
        return out
    return _principal_axes(prob, stage, start, out, pair)


def _image_moments(img: torch.Tensor, mask: torch.Tensor, grid) -> Moments:
    """The centre and second moments of the intensity above the mask's minimum, times the mask weight (the
    mask's own where that is all zero)."""
    low = torch.where(mask > 0, img, torch.full_like(img, math.inf)).min()
    total, com, cov = weighted_moments((img - low) * mask, grid)
    if not total > 0:
        _, com, cov = weighted_moments(mask, grid)
    return com, cov


def _translated(start: LinearTransform, com_f: np.ndarray, com_m: np.ndarray) -> LinearTransform:
    """``start`` translated so that it maps ``com_f`` onto ``com_m``."""
    return LinearTransform(start.matrix, start.translation + com_m - start.apply(com_f[None])[0], start.center)


def _scores(prob: Problem, stage: dict, candidates: list[LinearTransform]) -> tuple[int, list[float]]:
    """(index of the best, every score): each candidate's loss at the stage's coarse level (the stage's
    ``loss``, default ``mi``), with the moving image scaled by what that candidate samples (one scale for all
    favoured the candidate it was taken under); ``inf`` where it keeps under a quarter of the fixed mask."""
    _, loss_fn = get_loss(stage.get("loss", "mi"))
    fl, ml = prob.levels(int(stage.get("scales", [4])[0]), None, mask_use(stage))
    scores = []
    with torch.no_grad():
        for cand in candidates:
            dense = DenseSampler(fl, ml, *normalised_intensities(fl, ml, cand))
            h = torch.as_tensor(cand.homogeneous(), dtype=torch.float32, device=prob.device)
            fv, wv, w = dense(h)
            ok = float(w.sum()) >= 0.25 * float(fl.mask.sum())  # a candidate must keep a fair overlap
            scores.append(
                float(loss_fn(fv, wv, w, window=int(stage.get("window", 5)), bins=int(stage.get("bins", 32))))
                if ok
                else math.inf
            )
    return int(np.argmin(scores)), scores


def _best_translation(
    prob: Problem,
    stage: dict,
    start: LinearTransform,
    pairs: list[tuple[Moments, Moments]],
    alternatives: list[LinearTransform] | None,
) -> int:
    """Which of the translations of ``pairs`` (masked against whole centre, whole centres) or the start's
    (index ``len(pairs)``) scores best; the others, in order of their scores, go to ``alternatives``."""
    names = ["masked centre against whole centre", "whole centres", "the start's"]
    translations = [_translated(start, cf, cm) for (cf, _), (cm, _) in pairs] + [start]
    best, scores = _scores(prob, stage, translations)
    log.info(
        "%sstage moments: a mask on one side only; translations scored by %s: %s; kept %s",
        where(prob.subject),
        get_loss(stage.get("loss", "mi"))[0],
        ", ".join(f"{n} {v:.4g}" for n, v in zip(names, scores, strict=False)),
        names[best],
    )
    if alternatives is not None:  # the next linear stage refines these too and keeps the best optimum
        alternatives.extend(
            translations[i] for i in np.argsort(scores, kind="stable") if i != best and np.isfinite(scores[i])
        )
    return best


def _principal_axes(
    prob: Problem, stage: dict, start: LinearTransform, out: LinearTransform, pair: tuple[Moments, Moments]
) -> LinearTransform:
    """``out`` or the best-scoring rotation of the fixed principal axes onto the moving ones (about the centres
    of ``pair``); ``out`` when either image's axes are not distinct."""
    (com_f, cov_f), (com_m, cov_m) = pair
    dim = prob.dim
    ev_f, v_f = np.linalg.eigh(cov_f)
    ev_m, v_m = np.linalg.eigh(cov_m)
    if (
        min(ev_f[1:] / np.maximum(ev_f[:-1], 1e-12)).item() < 1 / 0.95
        or min(ev_m[1:] / np.maximum(ev_m[:-1], 1e-12)).item() < 1 / 0.95
    ):
        log.info(
            "%sstage moments: principal axes not distinct (moments %s, %s); rotation skipped",
            where(prob.subject),
            np.array2string(ev_f, precision=1),
            np.array2string(ev_m, precision=1),
        )
        return out
    candidates = [out]
    for signs in np.array(np.meshgrid(*[[1.0, -1.0]] * dim)).reshape(dim, -1).T:
        r = v_m @ np.diag(signs) @ v_f.T
        if np.linalg.det(r) < 0:
            continue
        c = start.center  # T(x) = R (x - com_f) + com_m, written with the start's centre
        candidates.append(LinearTransform(r, r @ (c - com_f) + com_m - c, c))
    best, scores = _scores(prob, stage, candidates)
    rel = candidates[best].matrix @ np.linalg.inv(start.matrix)
    angle = math.degrees(math.acos(float(np.clip((np.trace(rel) - (dim - 2)) / 2, -1.0, 1.0))))
    log.info(
        "%sstage moments: principal axes, %d candidate rotations scored by %s (%s); kept %s (%.1f°)",
        where(prob.subject),
        len(candidates),
        get_loss(stage.get("loss", "mi"))[0],
        ", ".join(f"{v:.4g}" for v in scores),
        "the translation only" if best == 0 else f"candidate {best}",
        angle,
    )
    return candidates[best]


def search_candidates(
    prob: Problem, search: dict, kind: str, start: LinearTransform, seed: int
) -> list[LinearTransform]:
    """``start`` and ``candidates - 1`` random rigid poses around it: ``T_k(x) = start(R_k (x − c) + c + t_k)``
    with ``c`` the fixed mask's centre (LPS mm), ``R_k`` a rotation by an angle uniform in ``±angle_deg`` (3D:
    about a uniformly random axis; none for a ``translation`` stage) and ``t_k`` uniform in the cube
    ``±translation_mm`` (fixed space, mm). Seeded, so a registration stays deterministic."""
    rng = np.random.default_rng(seed)
    dim, c = prob.dim, prob.center
    angle = 0.0 if kind == "translation" else math.radians(float(search["angle_deg"]))
    out = [start]
    for _ in range(int(search["candidates"]) - 1):
        a = rng.uniform(-angle, angle)
        if dim == 2:
            r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        else:
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            r = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k  # Rodrigues
        t = rng.uniform(-1.0, 1.0, dim) * float(search["translation_mm"])
        pose = LinearTransform(r, t, c)  # x -> R (x - c) + c + t
        out.append(compose_linear(start, pose))
    return out


def compose_linear(outer: LinearTransform, inner: LinearTransform) -> LinearTransform:
    """``outer(inner(x))`` as one :class:`LinearTransform` (centre: ``outer``'s)."""
    h = outer.homogeneous() @ inner.homogeneous()
    d = outer.dim
    return recenter(LinearTransform(h[:d, :d], h[:d, d], np.zeros(d)), outer.center)


def recenter(tx: LinearTransform, center: np.ndarray) -> LinearTransform:
    """The same map expressed with another centre."""
    h = tx.homogeneous()
    a = h[: tx.dim, : tx.dim]
    return LinearTransform(a, h[: tx.dim, tx.dim] + a @ center - center, center)
