"""Validation of the workflow configuration and the cohort table, reporting every problem at once.

The JSON Schemas live in ``workflow/schemas/``; this module applies them with ``jsonschema`` (collecting
all errors, each with the key path or the table row and column) and adds the checks a schema cannot make:
files exist, subject ids are unique, stage lists are consistent. It knows nothing of Snakemake.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

from maskreg.errors import ConfigError, InputError
from maskreg.io import read_landmarks
from maskreg.learning import learning_problems
from maskreg.stages import stage_list_problems

PATH_COLUMNS = (
    "fixed",
    "moving",
    "fixed_mask",
    "moving_mask",
    "fixed_labels",
    "moving_labels",
    "fixed_landmarks",
    "moving_landmarks",
    "initial_transform",
)
# columns holding a ";"-separated list of files (ANTs' -t order), see maskreg.transforms.read_transform
LIST_COLUMNS = ("initial_transform",)
PAIRED_COLUMNS = (("fixed_landmarks", "moving_landmarks"),)
# per-subject overrides of the mask options: column "{role}_mask_{option}"
MASK_OVERRIDES = {
    "missing": str,
    "kind": str,
    "threshold": float,
    "dilate_mm": float,
    "erode_mm": float,
    "largest_component": lambda v: v.strip().lower() in ("1", "true", "yes"),
    "fill_holes": lambda v: v.strip().lower() in ("1", "true", "yes"),
}


def mask_options(defaults: dict, row: dict, role: str) -> dict:
    """Mask options for one image: the config's ``masks.{role}`` updated by the row's filled
    ``{role}_mask_{option}`` cells (already validated by the cohort schema)."""
    out = dict(defaults)
    for key, conv in MASK_OVERRIDES.items():
        val = row.get(f"{role}_mask_{key}", "")
        if isinstance(val, str) and val.strip():
            out[key] = conv(val.strip())
    return out


def import_from(source: str | os.PathLike) -> None:
    """Put ``source`` (a folder holding the ``maskreg`` package) first on ``PYTHONPATH``, which every job the
    workflow starts inherits: the jobs then import the maskreg the rules were written for, in a conda
    environment or a container that holds only its dependencies too, and never another installed version."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(source)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(source), *rest])


def load_yaml(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key(s)")
    if error.validator == "oneOf":
        return f"{error.instance!r} is not valid here (expected 'dense' or {{random: N}} with N >= 16)"
    return error.message


def schema_problems(data: Any, schema: dict) -> list[str]:
    """Every schema violation as ``'key.path: what is wrong'``."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_key_path(e)}: {_message(e)}" for e in errors]


def stage_problems(config: dict) -> list[str]:
    """Problems of the stage list (:func:`maskreg.stages.stage_list_problems`, the rules maskreg.register and the
    CLI apply too), each labelled ``registration.stages.N (type)``."""
    reg = config.get("registration")
    reg = reg if isinstance(reg, dict) else {}  # a wrong type is the schema's to report
    stages = reg.get("stages")
    if not isinstance(stages, list):
        return []
    return stage_list_problems(stages, reg.get("sampling", "dense"), at="registration.stages.{i}")


_STAGE_ITEM = re.compile(r"registration\.stages\.(\d+)[.: ]")


def network_problems(config: dict) -> list[str]:
    """A network stage needs a model: its own ``model:`` or the cohort's (``learning.enabled``); a cohort that
    trains a model needs a network stage to use it."""
    registration, learning = config.get("registration"), config.get("learning") or {}
    if not isinstance(registration, dict) or not isinstance(learning, dict):
        return []  # the schema reports what they should be
    stages = registration.get("stages")
    if not isinstance(stages, list):
        return []
    enabled = learning.get("enabled") is True
    out = []
    nets = [i for i, st in enumerate(stages) if isinstance(st, dict) and st.get("type") == "network"]
    for i in nets:
        if not stages[i].get("model") and not enabled:
            out.append(
                f"registration.stages.{i} (network): model is null and learning.enabled is false; train the "
                f"cohort's model (learning: {{enabled: true}}) or give model: the path of a model.pt"
            )
    if enabled and not any(not stages[i].get("model") for i in nets):
        out.append(
            "learning.enabled is true but no network stage uses the cohort's model; add {type: network} after "
            "the linear stages of registration.stages"
        )
    return out


def config_problems(config: dict, schema: dict) -> list[str]:
    """Schema violations and stage-list problems. Where :mod:`maskreg.stages` reports a stage, the schema's own
    messages about that stage are left out (one message per problem, worded as register and the CLI word it);
    any other schema message is kept."""
    stage_ps = stage_problems(config) + learning_problems(config.get("learning")) + network_problems(config)
    flagged = {m.group(1) for m in map(_STAGE_ITEM.match, stage_ps) if m}
    kept = [p for p in schema_problems(config, schema) if not ((m := _STAGE_ITEM.match(p)) and m.group(1) in flagged)]
    return kept + stage_ps


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TSV or CSV cohort table as strings; empty cells become absent (no magic strings). Spaces around
    headers and cells are removed, so the values checked are the values used (a subject ``' s1 '`` is
    ``s1``)."""
    sep = "," if str(path).lower().endswith(".csv") else "\t"
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda col: col.map(lambda v: v.strip() if isinstance(v, str) else v))


def _exists(path: Path) -> bool:
    """Whether ``path`` is a file (a folder such as ``..`` is not an image, a mask or a table)."""
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the file system
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _landmark_problems(who: str, fixed: Path, moving: Path) -> list[str]:
    """Readable x,y columns in both landmark files and the same number of rows (row i ↔ row i)."""
    rows, out = {}, []
    for col, path in (("fixed_landmarks", fixed), ("moving_landmarks", moving)):
        try:
            rows[col] = len(read_landmarks(path, 2))
        except InputError as exc:
            out.append(f"{who}, column '{col}': {exc}")
    if not out and rows["fixed_landmarks"] != rows["moving_landmarks"]:
        out.append(
            f"{who}: fixed_landmarks has {rows['fixed_landmarks']} row(s) but moving_landmarks has "
            f"{rows['moving_landmarks']}; row i of one must be the same point as row i of the other "
            f"({fixed}, {moving})"
        )
    return out


def cohort_problems(table: pd.DataFrame, table_dir: Path, schema: dict) -> list[str]:
    """Problems of every row, each naming the row (1 = first data row) and the column."""
    out: list[str] = []
    missing_cols = [c for c in schema.get("required", []) if c not in table.columns]
    for c in missing_cols:
        out.append(f"column '{c}' is missing (the table has: {', '.join(table.columns)})")
    validator = jsonschema.Draft202012Validator(schema)
    seen: dict[str, int] = {}
    for i, row in enumerate(table.to_dict("records"), start=1):
        present = {k: v.strip() for k, v in row.items() if isinstance(v, str) and v.strip() != ""}
        sid = present.get("subject", "")
        who = f"row {i}" + (f" (subject '{sid}')" if sid else "")
        for e in validator.iter_errors(present):
            col = ".".join(str(p) for p in e.absolute_path)
            if e.validator == "required":
                name = e.message.split("'")[1]
                if name in missing_cols:
                    continue
                out.append(f"{who}, column '{name}': empty; a value is required")
            elif col == "subject":
                out.append(
                    f"{who}, column 'subject': '{sid}' is not a safe id (use letters, digits, '.', '_', "
                    f"'-'; no spaces, path separators or '..')"
                )
            else:
                out.append(f"{who}, column '{col}': {e.message}")
        if sid:
            if sid in seen:
                out.append(f"{who}, column 'subject': duplicate of row {seen[sid]}")
            else:
                seen[sid] = i
        found = {}
        for col in PATH_COLUMNS:
            if col in present:
                for value in _cell_paths(col, present[col]):
                    p = Path(value)
                    full = p if p.is_absolute() else table_dir / p
                    if _exists(full):
                        found[col] = full
                    else:
                        what = "is a folder, not a file" if _is_dir(full) else "file not found"
                        out.append(f"{who}, column '{col}': {what}: {value} (looked at {full})")
        for a, b in PAIRED_COLUMNS:
            if (a in present) != (b in present):
                out.append(f"{who}: '{a}' and '{b}' must be given together (one is empty)")
        if "fixed_landmarks" in found and "moving_landmarks" in found:
            out += _landmark_problems(who, found["fixed_landmarks"], found["moving_landmarks"])
    return out


def _cell_paths(column: str, value: str) -> list[str]:
    if column in LIST_COLUMNS:
        return [v.strip() for v in value.split(";") if v.strip()]
    return [value]


def resolve_paths(table: pd.DataFrame, table_dir: Path) -> pd.DataFrame:
    """Absolute paths for every path column; empty cells stay empty strings."""
    table = table.copy()
    for col in PATH_COLUMNS:
        if col not in table.columns:
            table[col] = ""
        table[col] = [
            ";".join(str((table_dir / p).resolve()) for p in _cell_paths(col, v))
            if isinstance(v, str) and v.strip()
            else ""
            for v in table[col].fillna("")
        ]
    return table


def load_and_validate(config: dict, config_schema: dict, cohort_schema: dict) -> pd.DataFrame:
    """Validate the configuration and its cohort table; return the table (indexed by subject, absolute
    paths) or raise :class:`ConfigError` listing every problem of both."""
    if not isinstance(config, dict):
        raise ConfigError([f"config: expected a mapping of keys (YAML), got {type(config).__name__}"], "configuration")
    problems = [f"config {p}" for p in config_problems(config, config_schema)]
    cohort_path = config.get("cohort")
    table = None
    if cohort_path is None:
        problems.append("config cohort: missing; set cohort: to the path of the cohort table (TSV or CSV)")
    elif isinstance(cohort_path, str):
        p = Path(cohort_path)
        if not _exists(p):
            problems.append(
                f"config cohort: table not found: {cohort_path} (relative paths are relative to the "
                f"working directory, {Path.cwd()})"
            )
        else:
            try:
                table = read_table(p)
            except Exception as exc:  # malformed CSV/TSV in many ways
                problems.append(
                    f"cohort table {cohort_path}: cannot be read ({' '.join(str(exc).split())}); "
                    f"it must be a TSV (or .csv) file with a header row"
                )
            else:
                if len(table) == 0:
                    problems.append(f"cohort table {cohort_path}: no subjects")
                problems += [
                    f"cohort table {cohort_path}: {q}"
                    for q in cohort_problems(table, p.resolve().parent, cohort_schema)
                ]
    if problems:
        # one line per problem: control characters in cells or headers (a quoted newline...) are shown escaped
        problems = [re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], q) for q in problems]
        raise ConfigError(problems, "configuration and cohort")
    assert table is not None
    table = resolve_paths(table, Path(cohort_path).resolve().parent)
    return table.set_index("subject", drop=False)
