"""Cohort tables from BIDS datasets, with pybids (the optional extra ``maskreg[bids]``).

The cohort table stays the workflow's one input: this module only writes one. Images are selected by BIDS
entities, one filter per column, written ``key=value,key=value`` (``suffix=T1w,datatype=anat``). BIDS' short keys
are accepted (``acq``, ``ses``, ``rec``, ``ce``, ``dir``); ``key=`` asks for the entity to be absent, ``key=*``
for any value, and ``scope=`` picks where to look (``self``: the ``--bids`` dataset itself, raw or derivative;
``raw``, ``derivatives``, ``all`` or a pipeline's name; by default ``self`` for ``fixed``/``moving`` and ``all``
for masks and labels, which finds them in ``derivatives`` too). ``extension`` defaults to ``.nii.gz``/``.nii``.

Rows: one per subject, or one per subject × session where the dataset has sessions (subject id
``sub-01_ses-1``; a subject without sessions keeps ``sub-01``). A filter naming ``session`` (or ``subject``)
pins it: ``--fixed "suffix=T1w,session=1" --moving suffix=T1w`` registers every session to the first, and when
both images pin the session there is one row per subject. With a template (``--fixed-template``) every selected
moving image is registered to that one file.

A filter matching several files for one row is an error that lists the files and the entities that tell them
apart; all such rows are reported at once, and nothing is ever picked silently. A row without a fixed or moving
image is skipped with a warning (or, with ``missing='error'``, an error); a missing mask or label map leaves its
cell empty (the workflow's ``masks.*.missing`` then decides) with a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from maskreg.errors import ConfigError, MaskregError

if TYPE_CHECKING:
    import pandas as pd

ROLES = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels")
REQUIRED = ("fixed", "moving")
TEMPLATE_ROLES = ("fixed", "fixed_mask", "fixed_labels")
# BIDS' key names in file names -> pybids' entity names
ALIASES = {
    "sub": "subject",
    "ses": "session",
    "acq": "acquisition",
    "ce": "ceagent",
    "rec": "reconstruction",
    "dir": "direction",
}
IMAGE_EXTENSIONS = (".nii.gz", ".nii")
INSTALL_HINT = "pip install 'maskreg[bids]' (or pip install pybids)"


@dataclass
class BidsCohort:
    """A cohort table built from a BIDS dataset: ``table`` (absolute paths, one row per subject or
    subject × session) and the ``warnings`` about skipped rows and empty optional cells."""

    table: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def option_name(role: str) -> str:
    """The command-line option of a column: ``fixed_mask`` -> ``--fixed-mask``."""
    return "--" + role.replace("_", "-")


def template_option(role: str) -> str:
    """The command-line option of a template file: ``fixed_mask`` -> ``--fixed-template-mask``."""
    return option_name(role).replace("--fixed", "--fixed-template", 1)


def parse_filter(text: str, option: str = "filter") -> dict[str, str]:
    """``'suffix=T1w,acq=mprage'`` -> ``{'suffix': 'T1w', 'acquisition': 'mprage'}``. Raises MaskregError
    naming ``option`` for an item without ``=``, an empty key or a key given twice."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not eq or not key:
            raise MaskregError(
                f"{option} '{text}': '{item}' is not key=value; write BIDS entities as e.g. "
                f"'suffix=T1w,datatype=anat' (key= for an absent entity, key=* for any value)"
            )
        if key in out:
            raise MaskregError(f"{option} '{text}': '{key}' is given twice")
        out[key] = value.strip()
    if not out:
        raise MaskregError(f"{option} '{text}': no key=value given (e.g. 'suffix=T1w')")
    return out


def _import_pybids():
    try:
        import bids
    except ImportError:
        raise MaskregError(f"reading a BIDS dataset needs pybids, which is not installed: {INSTALL_HINT}") from None
    return bids


def _layout(root: str | os.PathLike, derivatives: list[str]):
    bids = _import_pybids()
    if not Path(root).is_dir():
        raise MaskregError(f"--bids {root}: no such folder")
    for d in derivatives:
        if not Path(d).is_dir():
            raise MaskregError(f"--derivatives {d}: no such folder")
    try:
        # no sidecar metadata is needed to select files, and indexing it is most of a large dataset's indexing time
        indexer = bids.BIDSLayoutIndexer(index_metadata=False)
        return bids.BIDSLayout(str(root), derivatives=[str(d) for d in derivatives] or False, indexer=indexer)
    except Exception as exc:  # pybids raises several types for a folder it cannot index
        raise MaskregError(
            f"--bids {root}: pybids cannot read it as a BIDS dataset ({' '.join(str(exc).split())}); a dataset "
            f"needs dataset_description.json; a derivative one also DatasetType 'derivative' and GeneratedBy"
        ) from None


def _check_keys(filters: dict[str, dict[str, str]], texts: dict[str, str], known: set[str]) -> None:
    problems = []
    for role, flt in filters.items():
        unknown = sorted(k for k in flt if k not in known and k != "scope")
        if unknown:
            problems.append(
                f"{option_name(role)} '{texts[role]}': unknown BIDS entit{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(unknown)} (known here: {', '.join(sorted(known | {'scope'}))})"
            )
    if problems:
        raise ConfigError(problems, "BIDS selection")


def _query_value(value: str, query):
    if value == "":
        return query.NONE
    if value == "*":
        return query.ANY
    return value


def _matches(layout, role: str, flt: dict[str, str], subject: str, session: str | None) -> list:
    """The files of ``role`` for one row: the filter, plus the row's subject and session unless it pins them."""
    from bids.layout import Query

    q = {k: _query_value(v, Query) for k, v in flt.items() if k not in ("scope", "extension")}
    q.setdefault("subject", subject)
    if session is not None:
        q.setdefault("session", session)
    ext = flt.get("extension", "")
    if ext != "*":
        q["extension"] = ("." + ext.lstrip(".")) if ext else list(IMAGE_EXTENSIONS)
    q["scope"] = flt.get("scope") or ("self" if role in REQUIRED else "all")
    return sorted(layout.get(return_type="object", **q), key=lambda f: f.path)


def _row_id(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session is not None else "")


def _ambiguity(who: str, role: str, text: str, files: list) -> str:
    """One line: which row, which option matched which files, and the entities that tell them apart."""
    ents = [f.get_entities() for f in files]
    keys = sorted(set().union(*ents) - {"subject"})
    differ = {k: [e.get(k) for e in ents] for k in keys if len({str(e.get(k)) for e in ents}) > 1}
    opt = option_name(role)
    if differ:
        shown = "; ".join(
            f"{k}: {', '.join('(absent)' if v is None else str(v) for v in vs)}" for k, vs in differ.items()
        )
        k, vs = next(iter(differ.items()))
        example = f"{k}={next(v for v in vs if v is not None)}" + (f" (or {k}= for none)" if None in vs else "")
        how = f"they differ in {shown}; narrow {opt}, e.g. add {example}"
    else:
        how = f"they differ only in the dataset they come from; narrow {opt} with scope=self, raw or a pipeline's name"
    paths = ", ".join(f.path for f in files)
    return f"{who}: {opt} '{text}' matches {len(files)} files, {how} (files: {paths})"


def _row_keys(layout, subjects: list[str], by_session: bool) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = []
    for sub in subjects:
        sessions = sorted(layout.get_sessions(subject=sub)) if by_session else []
        keys += [(sub, ses) for ses in sessions] or [(sub, None)]
    return keys


def _subjects(layout, participants: list[str] | None) -> list[str]:
    present = sorted(layout.get_subjects())
    if not participants:
        if not present:
            raise MaskregError(f"--bids {layout.root}: no subjects (sub-*/ folders) found")
        return present
    wanted = [p.removeprefix("sub-") for p in participants]
    unknown = [p for p in wanted if p not in present]
    if unknown:
        raise MaskregError(
            f"--participant-label: no subject {', '.join(unknown)} in {layout.root} (it has: {', '.join(present)})"
        )
    return list(dict.fromkeys(wanted))


@dataclass
class _Collected:
    rows: list[dict] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)  # role -> row ids
    same: list[str] = field(default_factory=list)  # rows whose fixed and moving are one file


def _collect(layout, keys, filters: dict[str, dict[str, str]], texts: dict[str, str], template: dict) -> _Collected:
    out = _Collected()
    for subject, session in keys:
        rid = _row_id(subject, session)
        row: dict[str, str] = {"subject": rid, **template}
        absent = []
        for role, flt in filters.items():
            files = _matches(layout, role, flt, subject, session)
            if len(files) > 1:
                out.ambiguous.append(_ambiguity(f"subject '{rid}'", role, texts[role], files))
            row[role] = files[0].path if len(files) == 1 else ""
            absent += [] if files else [role]
        skipped = any(r in REQUIRED for r in absent)  # a skipped row's optional cells are not worth a warning
        for role in absent:
            if role in REQUIRED or not skipped:
                out.missing.setdefault(role, []).append(rid)
        if skipped:
            continue
        if row.get("fixed") and os.path.abspath(row["fixed"]) == os.path.abspath(row.get("moving", "")):
            out.same.append(rid)
            continue
        out.rows.append(row)
    return out


def _missing_lines(missing: dict[str, list[str]], texts: dict[str, str], fail: bool) -> list[str]:
    """One line per column with rows that found no file: a warning (what was done) or, with ``fail``, an error."""
    lines = []
    for role in [r for r in ROLES if r in missing]:
        rows, opt = missing[role], f"{option_name(role)} '{texts[role]}'"
        if fail:
            lines.append(f"{len(rows)} row(s) have no {opt} match: {', '.join(rows)}")
        else:
            what = "skipped" if role in REQUIRED else f"left {role} empty for"
            lines.append(f"{what} {len(rows)} row(s) without a {opt} match: {', '.join(rows)}")
    return lines


def _check_template(template: dict[str, str | os.PathLike | None]) -> dict[str, str]:
    out = {}
    for role, path in template.items():
        if path is None or str(path) == "":
            continue
        if role not in TEMPLATE_ROLES:
            raise MaskregError(f"template: '{role}' is not one of {', '.join(TEMPLATE_ROLES)}")
        if not Path(path).is_file():
            raise MaskregError(f"{template_option(role)} {path}: file not found")
        out[role] = os.path.abspath(path)
    return out


def _check_roles(selections: dict[str, str], template: dict[str, str]) -> None:
    unknown = [r for r in selections if r not in ROLES]
    if unknown:
        raise MaskregError(f"selections: unknown column(s) {', '.join(unknown)} (known: {', '.join(ROLES)})")
    if "moving" not in selections:
        raise MaskregError("--moving is required: the filter that selects each row's moving image")
    if ("fixed" in selections) == ("fixed" in template):
        raise MaskregError("give either --fixed FILTER (an image per subject) or --fixed-template PATH (one image)")
    in_template = "fixed" in template
    for role in TEMPLATE_ROLES[1:]:
        if (role in selections and in_template) or (role in template and not in_template):
            raise MaskregError(
                f"{option_name(role)} (a filter) goes with --fixed, {template_option(role)} (a file) with "
                f"--fixed-template"
            )


def bids_cohort(
    root: str | os.PathLike,
    selections: dict[str, str],
    *,
    template: dict[str, str | os.PathLike | None] | None = None,
    derivatives: list[str | os.PathLike] = (),
    participants: list[str] | None = None,
    missing: str = "skip",
) -> BidsCohort:
    """A cohort table from the BIDS dataset ``root``.

    ``selections`` maps a column of :data:`ROLES` to its filter (``{'fixed': 'suffix=T1w', 'moving':
    'suffix=T2w'}``); ``template`` maps ``fixed`` (and ``fixed_mask``, ``fixed_labels``) to one file used for
    every row instead. ``derivatives``: derivative datasets to search too (masks, label maps). ``participants``:
    subject labels to keep (``01`` or ``sub-01``). ``missing``: ``'skip'`` (rows without an image are skipped
    and optional cells left empty, with warnings) or ``'error'``. Raises :class:`ConfigError` listing every
    ambiguous match (and, with ``'error'``, every missing one), or MaskregError.
    """
    if missing not in ("skip", "error"):
        raise MaskregError(f"missing: '{missing}' is not 'skip' or 'error'")
    template = _check_template(template or {})
    _check_roles(selections, template)
    texts = {r: selections[r] for r in ROLES if r in selections}
    filters = {r: parse_filter(t, option_name(r)) for r, t in texts.items()}
    layout = _layout(root, [str(d) for d in derivatives])
    _check_keys(filters, texts, set(layout.get_entities(metadata=False)))
    by_session = bool(layout.get_sessions()) and not all("session" in filters[r] for r in REQUIRED if r in filters)
    keys = _row_keys(layout, _subjects(layout, participants), by_session)
    found = _collect(layout, keys, filters, texts, template)
    lines = _missing_lines(found.missing, texts, missing == "error")
    if found.ambiguous or (missing == "error" and lines):
        raise ConfigError(found.ambiguous + (lines if missing == "error" else []), "BIDS selection")
    warnings = lines + (
        [f"skipped {len(found.same)} row(s) whose fixed and moving image are one file: {', '.join(found.same)}"]
        if found.same
        else []
    )
    if not found.rows:
        raise MaskregError(f"--bids {root}: no row has both a fixed and a moving image ({'; '.join(warnings)})")
    return BidsCohort(_frame(found.rows, [r for r in ROLES if r in texts or r in template]), warnings)


def _frame(rows: list[dict], roles: list[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows, columns=["subject", *roles]).fillna("")


def save_cohort(table: pd.DataFrame, path: str | os.PathLike, *, absolute: bool = False) -> Path:
    """Write ``table`` atomically as TSV (CSV when ``path`` ends in ``.csv``), its paths relative to the table's
    folder (the workflow reads them so) or, with ``absolute``, absolute. Symbolic links in file names (DataLad's
    annexed files) are kept; folders are resolved, as the workflow resolves the table's folder."""
    from maskreg.config import PATH_COLUMNS
    from maskreg.io import atomic_path, write_table

    path = Path(path)
    base = os.path.realpath(path.parent)
    table = table.copy()
    for col in [c for c in PATH_COLUMNS if c in table.columns]:
        table[col] = [_written_path(v, base, absolute) if v else "" for v in table[col]]
    if path.suffix.lower() != ".csv":
        return write_table(table, path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, na_rep="")
    return path


def _written_path(value: str, base: str, absolute: bool) -> str:
    p = Path(value)
    full = os.path.join(os.path.realpath(p.parent), p.name)
    return full if absolute else os.path.relpath(full, base)
