"""The ``network`` stage: a trained model's field for the pair after its linear stages (:mod:`maskreg.engine.learn`).

The stage reads the fixed and the moving image only (and the fixed mask when the model was trained on the mask's
box, ``learning.grid: box``), never labels or landmarks. Its field lives on the model's training grid for this
pair, in LPS mm: a velocity (a ``syn`` state) or a displacement (a ``greedy`` state), so a deformable stage after
it starts from it (instance optimisation) and, without one, the registration's fields come from it as from any
deformable stage.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from maskreg.engine import fields as dfm
from maskreg.engine.deformable_stage import FieldState
from maskreg.engine.learn.model import Model, load_model
from maskreg.engine.problem import Problem
from maskreg.engine.result import StageReport
from maskreg.errors import ConfigError, where
from maskreg.transforms import LinearTransform

log = logging.getLogger("maskreg")

_MODELS: dict[tuple[str, float, str], Model] = {}  # (path, mtime, device) -> model: a batch job loads it once


def cached_model(path: str, device: torch.device) -> Model:
    """The model at ``path`` on ``device``, loaded once per process and file version."""
    real = os.path.realpath(path)
    pt = os.path.join(real, "model.pt") if os.path.isdir(real) else real
    key = (pt, os.path.getmtime(pt) if os.path.exists(pt) else 0.0, str(device))
    if key not in _MODELS:
        _MODELS[key] = load_model(pt, device)
    return _MODELS[key]


def run_network_stage(prob: Problem, stage: dict, linear: LinearTransform, report: StageReport) -> FieldState:
    """The model's field after ``linear`` (fixed → moving points) as the deformable state the next stages take."""
    t0 = time.perf_counter()
    if not stage.get("model"):
        raise ConfigError(
            ["the network stage needs model: the path of a trained model.pt (the workflow fills it in)"],
            f"stage list ({where(prob.subject).strip().rstrip(':')})" if prob.subject else "stage list",
        )
    model = cached_model(stage["model"], prob.device)
    if int(model.meta["dim"]) != prob.dim:
        raise ConfigError([f"the model {stage['model']} is {model.meta['dim']}D; the images are {prob.dim}D"], "stage")
    grid = model.grid_for(prob.fgrid, prob.fm)
    field = model.predict(prob.f, prob.fgrid, prob.m, prob.mgrid, linear, grid)
    ops = dfm.FieldOps(grid, prob.device, coarse_exp=model.velocity)
    state = FieldState("syn" if model.velocity else "greedy", ops, field)
    report.seconds = round(time.perf_counter() - t0, 3)
    log.info(
        "%sstage network: %s field on a %s grid, max %.2f mm (%.2f s)",
        where(prob.subject),
        model.settings["field"],
        "x".join(map(str, grid.size)),
        float(field.pow(2).sum(1).max().sqrt()),
        report.seconds,
    )
    return state
