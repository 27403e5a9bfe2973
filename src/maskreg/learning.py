"""Learning settings, in one torch-free place: the ``learning:`` section of the workflow's config and the settings
of :func:`maskreg.train` and ``maskreg train``, their defaults, their resolution and what is wrong with them.

A network learns the deformation left after a pair's linear stages: it reads the fixed image and the moving image
resampled through the linear transform, both on a *training grid* (the fixed image's extent, or the fixed mask's
box grown by ``margin_mm``, cut into ``shape`` voxels), and predicts a field on that grid (a stationary velocity,
integrated by scaling and squaring, or a displacement), in mm along the grid's axes. Training minimises
``image_weight · image loss + label_weight · multi-scale soft Dice + regulariser_weight · regulariser``.

Importing this module imports neither torch nor numpy (a config check runs before any job).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maskreg.checks import int_at_least, is_int, is_num, list_of, num_at_least, show
from maskreg.errors import ConfigError
from maskreg.loss_names import canonical
from maskreg.stages import DEFORMABLE_STAGES, NETWORK

NETWORKS = ("localnet", "regunet")
FIELDS = ("velocity", "displacement")
GRIDS = ("image", "box")
REGULARISERS = ("bending", "gradient")

AUGMENT_DEFAULTS: dict[str, Any] = {
    "rotation_deg": 5.0,  # each image turned about its grid's centre by up to this, per axis
    "scale": 0.05,  # and scaled by 1 ± up to this
    "translation_mm": 2.0,  # and shifted by up to this along each axis
    "intensity": 0.1,  # intensities: gain 1 ± up to this, and a gamma of exp(± up to this)
}

LEARNING_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "folds": 1,  # 1: rows with split 'train' train one model; k >= 2: k models, each row registered out of fold
    "grid": "image",  # the training grid: the fixed image's extent, or the fixed mask's box ('box' reads masks)
    "margin_mm": 10.0,  # around the fixed mask's box (grid: box)
    "shape": None,  # voxels (x, y[, z]); null: the first training pair's fixed grid, halved to at most 40 per axis
    "network": "localnet",
    "channels": 8,  # the network's first-level channels
    "levels": 4,  # resolution levels of the network (the training grid is padded to a multiple of 2^(levels-1))
    "field": "velocity",
    "image_loss": "cc",
    "image_weight": 1.0,
    "label_weight": 1.0,
    "label_scales": [0, 1, 2, 4],  # voxels of the training grid: Gaussian sigmas of the multi-scale soft Dice
    "regulariser": "bending",
    "regulariser_weight": 0.5,
    "steps": 1000,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "augment": True,
    "seed": 0,
}

_RULES: dict[str, tuple[Any, str]] = {
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
    "folds": (int_at_least(1), "an integer >= 1"),
    "grid": (lambda v: v in GRIDS, f"one of {', '.join(GRIDS)}"),
    "margin_mm": (num_at_least(0), "a number >= 0 (mm)"),
    "shape": (list_of(int_at_least(8), 2), "a list of 2 or 3 integers >= 8 (voxels, x first) or null"),
    "network": (lambda v: v in NETWORKS, f"one of {', '.join(NETWORKS)}"),
    "channels": (int_at_least(2), "an integer >= 2"),
    "levels": (lambda v: is_int(v) and 1 <= v <= 6, "an integer from 1 to 6"),
    "field": (lambda v: v in FIELDS, f"one of {', '.join(FIELDS)}"),
    "image_weight": (num_at_least(0), "a number >= 0"),
    "label_weight": (num_at_least(0), "a number >= 0"),
    "label_scales": (list_of(num_at_least(0)), "a non-empty list of numbers >= 0 (voxels)"),
    "regulariser": (lambda v: v in REGULARISERS, f"one of {', '.join(REGULARISERS)}"),
    "regulariser_weight": (num_at_least(0), "a number >= 0"),
    "steps": (int_at_least(1), "an integer >= 1"),
    "batch_size": (int_at_least(1), "an integer >= 1"),
    "learning_rate": (lambda v: is_num(v) and v > 0, "a number > 0"),
    "seed": (int_at_least(0), "an integer >= 0"),
}
_AUGMENT_RULES = {k: (num_at_least(0), "a number >= 0") for k in AUGMENT_DEFAULTS}


def learning_problems(section: Any, at: str = "learning") -> list[str]:
    """Every problem of a ``learning`` mapping, each as ``'{at}.{key}: what is wrong'``; ``[]`` when it is
    usable. ``None`` (no section) has none."""
    if section is None:
        return []
    if not isinstance(section, Mapping):
        return [f"{at}: expected a mapping of learning settings, got {show(section)}"]
    out = []
    for key, value in section.items():
        if key not in LEARNING_DEFAULTS:
            out.append(f"{at}: unknown key {show(key)}; it takes {', '.join(LEARNING_DEFAULTS)}")
        elif value is None:
            continue
        elif key == "image_loss":
            try:
                canonical(value) if isinstance(value, str) else canonical(show(value))
            except ValueError as exc:
                out.append(f"{at}.image_loss: {exc}")
        elif key == "augment":
            out += _augment_problems(value, f"{at}.augment")
        elif not _RULES[key][0](value):
            out.append(f"{at}.{key} {show(value)} must be {_RULES[key][1]}")
    weights = {k: section.get(k, LEARNING_DEFAULTS[k]) for k in ("image_weight", "label_weight")}
    if all(is_num(w) and w == 0 for w in weights.values()):
        out.append(f"{at}: image_weight and label_weight are both 0; nothing would drive the training")
    return out


def _augment_problems(value: Any, at: str) -> list[str]:
    if isinstance(value, bool):
        return []
    if not isinstance(value, Mapping):
        return [f"{at} {show(value)} must be true, false or a mapping with keys {', '.join(AUGMENT_DEFAULTS)}"]
    out = []
    for key, v in value.items():
        if key not in _AUGMENT_RULES:
            out.append(f"{at}: unknown key {show(key)}; it takes {', '.join(AUGMENT_DEFAULTS)}")
        elif v is not None and not _AUGMENT_RULES[key][0](v):
            out.append(f"{at}.{key} {show(v)} must be {_AUGMENT_RULES[key][1]}")
    return out


def resolve_learning(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The learning settings with every default filled in; ``augment`` becomes ``False`` or a mapping with every
    key of :data:`AUGMENT_DEFAULTS`, ``image_loss`` its canonical name. Raises
    :class:`~maskreg.errors.ConfigError` listing the problems (:func:`learning_problems`)."""
    problems = learning_problems(section)
    if problems:
        raise ConfigError(problems, "learning")
    given = {k: v for k, v in (section or {}).items() if v is not None}
    out = {**copy.deepcopy(LEARNING_DEFAULTS), **copy.deepcopy(given)}
    out["image_loss"] = canonical(out["image_loss"])
    augment = out["augment"]
    if augment is True:
        out["augment"] = dict(AUGMENT_DEFAULTS)
    elif isinstance(augment, Mapping):
        out["augment"] = {**AUGMENT_DEFAULTS, **{k: float(v) for k, v in augment.items() if v is not None}}
    return out


def fold_of(index: int, folds: int) -> int:
    """The fold of the cohort's ``index``-th row (from 0) among ``folds``: rows are dealt round-robin."""
    return index % max(folds, 1)


@dataclass
class LearningPlan:
    """Which rows train which model and which model registers which row.

    ``folds: 1``: one model, ``model``, trained on the rows whose ``split`` is ``train``; every other row is
    registered with it. ``folds: k >= 2`` (cross-validation): rows are dealt into k folds in cohort order; model
    ``fold{j}`` trains on the training rows outside fold j, and every row is registered by the model of its own
    fold, so no row is registered by a model that saw it. Without a ``split`` column every row is a training row.
    """

    train: dict[str, list[str]]  # model name -> training subjects
    model_of: dict[str, str]  # registered subject -> model name

    @property
    def registered(self) -> list[str]:
        return list(self.model_of)


def plan(subjects: list[str], splits: list[str] | None, folds: int) -> LearningPlan:
    """The :class:`LearningPlan` of a cohort (``splits``: each row's ``split`` cell, or none without the
    column). Raises :class:`~maskreg.errors.ConfigError` when a model would have no training row."""
    is_train = [True] * len(subjects) if splits is None else [str(v).strip().lower() == "train" for v in splits]
    if folds <= 1:
        train = {"model": [s for s, t in zip(subjects, is_train, strict=True) if t]}
        model_of = {s: "model" for s, t in zip(subjects, is_train, strict=True) if not t}
    else:
        names = [f"fold{j}" for j in range(folds)]
        fold = {s: fold_of(i, folds) for i, s in enumerate(subjects)}
        train = {
            n: [s for s, t in zip(subjects, is_train, strict=True) if t and fold[s] != j] for j, n in enumerate(names)
        }
        model_of = {s: names[fold[s]] for s in subjects}
    empty = [n for n, rows in train.items() if not rows]
    if empty:
        raise ConfigError(
            [f"model {n} has no training row: give rows split 'train' (learning.folds {folds})" for n in empty],
            "learning",
        )
    return LearningPlan(train, model_of)


def linear_part(stages: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """The stages a network's pairs go through first: the list up to its ``network`` stage (or its first
    deformable stage)."""
    out = []
    for st in stages or []:
        if st.get("type") == NETWORK or st.get("type") in DEFORMABLE_STAGES:
            break
        out.append(dict(st))
    return out
