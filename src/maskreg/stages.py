"""Stage rules, in one torch-free place: the stage types, their defaults, how a stage's settings resolve and
what is wrong with a stage list.

:func:`maskreg.register`, the command line and the workflow's config validation all check a stage list with
:func:`stage_list_problems`, so a bad list is refused with the same message text wherever it is given (only the
label differs: ``stage 1 (rigid): ...`` from Python and the CLI, ``registration.stages.1 (rigid): ...`` in the
workflow; the index is the list's, counted from 0). The engine runs each stage as :func:`resolve_stage` returns
it. Importing this module imports neither torch nor numpy (a config check runs before any job).

A setting given as ``None`` means its default. Values shown in messages are written as in YAML.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from maskreg.checks import int_at_least, is_int, is_list, is_num, list_of, num_at_least, show
from maskreg.errors import ConfigError
from maskreg.loss_names import NEEDS_DENSE, canonical

MOMENTS = "moments"
LINEAR_STAGES = ("translation", "rigid", "similarity", "affine")
DEFORMABLE_STAGES = ("greedy", "syn")
# a trained network's field (maskreg.learning): after the linear stages, before any deformable one
NETWORK = "network"
STAGE_TYPES = (MOMENTS,) + LINEAR_STAGES + (NETWORK,) + DEFORMABLE_STAGES
# which masks a stage's loss uses (as ANTs allows per stage); use_mask: false is "none"
MASK_USES = ("both", "fixed", "moving", "none")
OPTIMIZERS = ("regular_step", "adam")
CENTRES = ("mass", "geometry")  # moments: centres of mass, or the centres of the images' extents

# linear stages. 32 bins and learning rate 0.25 (voxels of each level) suit inter-subject, multi-contrast pairs
# better than 16 bins and 0.1; with jittered points (maskreg.engine.points) and regular steps, 32 bins recover a
# known affine to a small fraction of a voxel (figures: benchmarks/bench_linear.py).
LINEAR_DEFAULTS: dict[str, Any] = {
    "loss": "mi",
    "scales": [4, 2, 1],
    "iterations": [100, 50, 25],
    "learning_rate": 0.25,
    "optimizer": "regular_step",
    "tolerance": 1e-5,
    "window": 5,
    "bins": 32,
    "smoothing_sigmas": None,
    "use_mask": True,
    "masks": "both",
    "search": False,
}
# the coarse global search of a linear stage (search: true, or a mapping overriding some of these): candidate
# rotations up to angle_deg and translations up to translation_mm, the best `keep` refined
SEARCH_DEFAULTS: dict[str, Any] = {"candidates": 200, "angle_deg": 30.0, "translation_mm": 20.0, "keep": 3}

DEFORMABLE_DEFAULTS: dict[str, Any] = {
    "loss": "cc",
    "scales": [4, 2, 1],
    "iterations": [80, 40, 20],
    "learning_rate": 0.5,
    "fluid_sigma": 1.5,
    "elastic_sigma": 0.5,
    # updates fade out where the map's local volume ratio nears this (or its inverse): no folding (fields.fold_gate)
    "jacobian_floor": 0.04,
    "tolerance": 1e-4,
    "window": 5,
    "bins": 16,
    "smoothing_sigmas": None,
    "use_mask": True,
    "masks": "both",
    "bending_weight": 0.0,
    "gradient_weight": 0.0,
    "label_weight": 0.0,
}
# per-type defaults over DEFORMABLE_DEFAULTS. SyN moves both images half-way, so a one-voxel step moves each image
# half a voxel: it takes larger rates. The coarsest level gains nothing from more than 40 iterations. The
# full-resolution level costs most per iteration, and its few iterations do not converge at the coarser levels'
# rate, so its rate alone is raised (a larger fluid_sigma instead lowers the accuracy). Figures:
# benchmarks/bench_deformable.py. A default list is counted from the finest level (resolve_stage), so it suits any
# number of scales.
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {"syn": {"learning_rate": [1.5, 1.5, 3.0], "iterations": [40, 40, 10]}}

# moments: what the engine assumes for a key left out (it scores candidate translations/rotations with the
# stage's loss at the first of its scales). resolve_stage returns a moments stage as given.
MOMENTS_DEFAULTS: dict[str, Any] = {
    "loss": "mi",
    "scales": [4],
    "window": 5,
    "bins": 32,
    "principal_axes": False,
    "centre": "mass",  # which centres correspond: the intensities' centres of mass, or the images' extents
    "use_mask": True,
    "masks": "both",
}

# network: the model (model.pt of maskreg train, or its folder); null in the workflow means the cohort's model
NETWORK_DEFAULTS: dict[str, Any] = {"model": None}

# maskreg.register's stages when none are given
DEFAULT_STAGES: list[dict[str, Any]] = [
    {"type": "moments"},
    {"type": "rigid", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]},
    {"type": "affine", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]},
]


# named stage lists for the command line (``maskreg register --preset``); ``syn`` is the workflow's default
# (config/config.yaml and the schema's default; tests/test_cli.py keeps the three equal)
PRESETS: dict[str, list[dict[str, Any]]] = {
    "rigid": [{"type": "moments"}, {"type": "rigid", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]}],
    "affine": DEFAULT_STAGES,
    "syn": [
        {"type": "moments"},
        {"type": "rigid", "loss": "mi", "scales": [4, 2], "iterations": [100, 50]},
        {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [100, 50]},
        {"type": "syn", "loss": "cc", "window": 5, "scales": [4, 2, 1], "iterations": [40, 40, 10]},
    ],
}
WORKFLOW_PRESET = "syn"


def stage_keys(kind: str) -> tuple[str, ...]:
    """The keys a stage of type ``kind`` takes (``type`` included); empty for an unknown type."""
    if kind == MOMENTS:
        return ("type",) + tuple(MOMENTS_DEFAULTS)
    if kind in LINEAR_STAGES:
        return ("type",) + tuple(LINEAR_DEFAULTS)
    if kind in DEFORMABLE_STAGES:
        return ("type",) + tuple(DEFORMABLE_DEFAULTS)
    if kind == NETWORK:
        return ("type",) + tuple(NETWORK_DEFAULTS)
    return ()


def defaults_for(kind: str) -> dict[str, Any]:
    """A fresh copy of the defaults of a stage type (deformable: the type's own over the common ones)."""
    if kind == MOMENTS:
        return copy.deepcopy(MOMENTS_DEFAULTS)
    if kind in LINEAR_STAGES:
        return copy.deepcopy(LINEAR_DEFAULTS)
    if kind in DEFORMABLE_STAGES:
        return copy.deepcopy({**DEFORMABLE_DEFAULTS, **TYPE_DEFAULTS.get(kind, {})})
    if kind == NETWORK:
        return copy.deepcopy(NETWORK_DEFAULTS)
    raise ConfigError([f"unknown stage type {show(kind)}; choose one of {', '.join(STAGE_TYPES)}"], "stage")


# ---------------------------------------------------------------------------------------------- resolution


def resolve_stage(stage: Mapping[str, Any]) -> dict[str, Any]:
    """A stage as the engine runs it: every setting, defaults filled in.

    * ``learning_rate``: one value per level of ``scales``. A number applies to every level; a list given in the
      stage has one value per scale; a default list is counted from the finest level (its first value repeated
      for extra coarse levels).
    * ``smoothing_sigmas``: one value per scale, or ``None`` (each axis then uses half its shrink factor).
    * ``masks``: one of :data:`MASK_USES`; ``use_mask`` is kept in step (``False`` exactly when ``masks`` is
      ``"none"``; a ``use_mask: false`` alone means ``"none"``).
    * ``search`` (linear stages): ``False``, or a mapping with every key of :data:`SEARCH_DEFAULTS`
      (``True`` is all defaults).

    ``moments`` takes no level settings and comes back as given (``masks``/``use_mask`` put in step when given).
    Raises :class:`~maskreg.errors.ConfigError` listing the stage's problems (:func:`stage_list_problems`).
    """
    problems = stage_list_problems([stage], at="stage")
    if problems:
        raise ConfigError(problems, "stage")
    kind = stage["type"]
    given = {k: v for k, v in stage.items() if v is not None}
    if kind == NETWORK:
        return {**defaults_for(kind), **given}
    if kind == MOMENTS:
        out = dict(stage)
        if "masks" in given or "use_mask" in given:
            out["masks"] = _mask_use(given)
            out["use_mask"] = out["masks"] != "none"
        return out
    s = {**defaults_for(kind), **copy.deepcopy(given)}
    n = len(s["scales"])
    rate = s["learning_rate"]
    if not isinstance(rate, (list, tuple)):
        s["learning_rate"] = [float(rate)] * n
    else:  # a given list has n values (checked); a default one is counted from the finest level
        s["learning_rate"] = ([float(rate[0])] * n + [float(r) for r in rate])[-n:]
    s["masks"] = _mask_use(given)
    s["use_mask"] = s["masks"] != "none"
    if kind in LINEAR_STAGES:
        s["search"] = _search(s["search"])
    return s


def _mask_use(given: Mapping[str, Any]) -> str:
    if given.get("masks") is not None:
        return given["masks"]
    return "none" if given.get("use_mask") is False else "both"


def _search(value: Any) -> dict[str, Any] | bool:
    if value is False or value is None:
        return False
    given = {} if value is True else {k: v for k, v in value.items() if v is not None}
    out = {**SEARCH_DEFAULTS, **given}
    return {
        "candidates": int(out["candidates"]),
        "angle_deg": float(out["angle_deg"]),
        "translation_mm": float(out["translation_mm"]),
        "keep": int(out["keep"]),
    }


# -------------------------------------------------------------------------------------------------- problems


# key -> (test of a given, non-null value, what it must be)
_VALUE_RULES: dict[str, tuple[Any, str]] = {
    "scales": (list_of(int_at_least(1)), "a non-empty list of positive integers (shrink factors, e.g. [4, 2, 1])"),
    "iterations": (list_of(int_at_least(0)), "a non-empty list of integers >= 0 (one per scale)"),
    "learning_rate": (
        lambda v: (is_num(v) and v > 0) or list_of(lambda x: is_num(x) and x > 0)(v),
        "a number > 0 or a list of numbers > 0 (one per scale)",
    ),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "tolerance": (num_at_least(0), "a number >= 0"),
    "window": (int_at_least(3), "an integer >= 3 (voxels)"),
    "bins": (lambda v: is_int(v) and 8 <= v <= 256, "an integer from 8 to 256"),
    "smoothing_sigmas": (list_of(num_at_least(0), 0), "a list of numbers >= 0 (voxels, one per scale) or null"),
    "use_mask": (lambda v: isinstance(v, bool), "true or false"),
    "masks": (lambda v: isinstance(v, str) and v in MASK_USES, f"one of {', '.join(MASK_USES)}"),
    "principal_axes": (lambda v: isinstance(v, bool), "true or false"),
    "centre": (lambda v: v in CENTRES, f"one of {', '.join(CENTRES)}"),
    "fluid_sigma": (num_at_least(0), "a number >= 0 (voxels)"),
    "elastic_sigma": (num_at_least(0), "a number >= 0 (voxels)"),
    "jacobian_floor": (lambda v: is_num(v) and 0 <= v < 1, "a number from 0 (off) to below 1"),
    "bending_weight": (num_at_least(0), "a number >= 0"),
    "gradient_weight": (num_at_least(0), "a number >= 0"),
    "label_weight": (num_at_least(0), "a number >= 0"),
    "model": (lambda v: isinstance(v, str) and v != "", "a path to a model.pt (or its folder), or null"),
}
_SEARCH_RULES: dict[str, tuple[Any, str]] = {
    "candidates": (int_at_least(1), "an integer >= 1"),
    "angle_deg": (num_at_least(0), "a number >= 0 (degrees)"),
    "translation_mm": (num_at_least(0), "a number >= 0 (mm)"),
    "keep": (int_at_least(1), "an integer >= 1"),
}


def _unknown_key(key: Any, kind: str) -> str:
    """Why ``key`` is refused on a ``kind`` stage: the stage types that take it, or the closest known key."""
    takers = [t for t in STAGE_TYPES if key in stage_keys(t)]
    if takers:
        return f"{show(key)} does not apply to a {kind} stage (only to {', '.join(takers)})"
    known = stage_keys(kind)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {show(close[0])}? " if close else ""
    return f"unknown key {show(key)}; {hint}a {kind} stage takes {', '.join(known)}"


def _one_stage_problems(st: Mapping[str, Any], random_sampling: bool) -> list[str]:
    """Problems of one stage mapping, without its label."""
    kind = st.get("type")
    if kind not in STAGE_TYPES:
        if kind is None:
            return [f"'type' is missing; choose one of {', '.join(STAGE_TYPES)}"]
        return [f"unknown stage type {show(kind)}; choose one of {', '.join(STAGE_TYPES)}"]
    out = []
    known = stage_keys(kind)
    for key in st:
        if key not in known:
            out.append(_unknown_key(key, kind))
    given = {k: v for k, v in st.items() if k in known and k != "type" and v is not None}
    bad = set()
    for key, value in given.items():
        rule = _VALUE_RULES.get(key)
        if rule is not None and not rule[0](value):
            out.append(f"{key} {show(value)} must be {rule[1]}")
            bad.add(key)
    loss = given.get("loss")
    if loss is not None:
        try:
            loss = canonical(loss) if isinstance(loss, str) else canonical(show(loss))
        except ValueError as exc:
            out.append(str(exc))
            bad.add("loss")
            loss = None
    if "search" in given:
        out += _search_problems(given["search"])
    if (
        "use_mask" in given
        and "masks" in given
        and "use_mask" not in bad
        and "masks" not in bad
        and given["use_mask"] != (given["masks"] != "none")
    ):
        out.append(
            f"use_mask {show(given['use_mask'])} and masks {show(given['masks'])} disagree; give masks "
            f"alone (use_mask: false is masks: none)"
        )
    # per-level lists: one value per scale (strict: no level is dropped)
    if kind == NETWORK:
        pass
    elif kind != MOMENTS:
        scales = given.get("scales", defaults_for(kind)["scales"])
        if "scales" not in bad:
            if any(b > a for a, b in zip(scales[:-1], scales[1:], strict=True)):
                out.append(f"scales {show(scales)} must not increase (coarse to fine, e.g. [4, 2, 1])")
            iters = given.get("iterations", defaults_for(kind)["iterations"])
            if "iterations" not in bad and len(iters) != len(scales):
                out.append(f"scales {show(scales)} and iterations {show(iters)} must have the same length")
            sig = given.get("smoothing_sigmas")
            if sig is not None and "smoothing_sigmas" not in bad and len(sig) != len(scales):
                out.append(f"smoothing_sigmas {show(sig)} must have one value per scale {show(scales)}")
            rate = given.get("learning_rate")
            if is_list(rate) and "learning_rate" not in bad and len(rate) != len(scales):
                out.append(f"learning_rate {show(rate)} must be one number or one value per scale {show(scales)}")
    elif (
        "scales" in given
        and "scales" not in bad
        and any(b > a for a, b in zip(given["scales"][:-1], given["scales"][1:], strict=True))
    ):
        out.append(f"scales {show(given['scales'])} must not increase (coarse to fine, e.g. [4, 2, 1])")
    if kind == MOMENTS and given.get("centre") == "geometry" and given.get("principal_axes"):
        out.append(
            "principal_axes turns the images about their centres of mass; it does not apply with centre 'geometry'"
        )
    if random_sampling and kind in LINEAR_STAGES and loss in NEEDS_DENSE:
        out.append(
            f"loss {show(st.get('loss'))} needs dense sampling (it uses neighbourhoods); use mse, gc, mi or nmi "
            f"with random sampling"
        )
    return out


def _search_problems(value: Any) -> list[str]:
    if isinstance(value, bool):
        return []
    if not isinstance(value, Mapping):
        return [f"search {show(value)} must be true, false or a mapping with keys {', '.join(SEARCH_DEFAULTS)}"]
    out = []
    for key, v in value.items():
        if key not in _SEARCH_RULES:
            out.append(f"search: unknown key {show(key)}; it takes {', '.join(SEARCH_DEFAULTS)}")
        elif v is not None and not _SEARCH_RULES[key][0](v):
            out.append(f"search.{key} {show(v)} must be {_SEARCH_RULES[key][1]}")
    return out


def stage_list_problems(stages: Iterable[Any] | None, sampling: Any = "dense", *, at: str = "stage {i}") -> list[str]:
    """Every problem of a stage list, each as ``'{label} ({type}): what is wrong'``; ``[]`` when it can run.

    ``at`` makes a stage's label from its index ``i`` in the list (from 0): ``"stage {i}"`` (Python, CLI) or
    ``"registration.stages.{i}"`` (workflow). ``sampling`` is :func:`maskreg.register`'s: random sampling
    (``{"random": N}``) cannot drive a neighbourhood loss (``cc``) in a linear stage. Checked: the stage type,
    keys that the type does not take, every value's type and range, one value per scale in ``iterations``,
    ``learning_rate`` (a list) and ``smoothing_sigmas``, scales that do not increase, ``masks``/``use_mask``
    agreeing, ``search``, the loss name, linear stages before deformable ones, one deformable type per list, at
    most one network stage, after the linear ones and before the deformable ones.
    ``None`` (the default list) has no problems."""
    if stages is None:
        return []
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Iterable):
        return [f"{at.format(i='').rstrip(' .[')}: expected a list of stages, got {show(stages)}"]
    random_sampling = isinstance(sampling, Mapping) and sampling.get("random") is not None
    out = []
    deformable_seen = None
    network_seen = False
    for i, st in enumerate(stages):
        label = at.format(i=i)
        if not isinstance(st, Mapping):
            out.append(f"{label}: expected a mapping such as {{type: rigid, scales: [4, 2, 1]}}, got {show(st)}")
            continue
        kind = st.get("type")
        shown = kind if isinstance(kind, str) else "?"
        if kind in DEFORMABLE_STAGES:
            if deformable_seen is not None and deformable_seen != kind:
                out.append(f"{label} ({shown}): cannot follow a {deformable_seen} stage; use one deformable type")
            deformable_seen = kind
        elif kind == NETWORK:
            if network_seen:
                out.append(f"{label} ({shown}): a stage list takes one network stage")
            if deformable_seen is not None:
                out.append(f"{label} ({shown}): the network stage must come before the deformable ones")
            network_seen = True
        elif kind in STAGE_TYPES and deformable_seen is not None:
            out.append(f"{label} ({shown}): linear stages must come before deformable ones")
        elif kind in STAGE_TYPES and network_seen:
            out.append(f"{label} ({shown}): linear stages must come before the network stage")
        out += [f"{label} ({shown}): {p}" for p in _one_stage_problems(st, random_sampling)]
    return out


def check_stages(
    stages: Iterable[Any] | None, sampling: Any = "dense", where: str = "", *, at: str = "stage {i}"
) -> None:
    """Raise :class:`~maskreg.errors.ConfigError` listing every problem of ``stages`` at once (see
    :func:`stage_list_problems`); ``where`` (e.g. ``"subject 's1'"``) says whose stage list it is."""
    problems = stage_list_problems(stages, sampling, at=at)
    if problems:
        who = where.strip().rstrip(":").strip()
        raise ConfigError(problems, f"stage list ({who})" if who else "stage list")
