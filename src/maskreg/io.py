"""Reading and writing images, landmarks and tables, with checks and atomic writes.

Conventions: images are ``SimpleITK.Image`` objects that keep their geometry (size, spacing in mm, origin in
mm, direction cosines) in ITK's LPS physical space. Array views (``sitk.GetArrayFromImage``) are in
reverse index order: ``[z, y, x]`` for 3D, ``[y, x]`` for 2D. Landmarks are ``(N, dim)`` arrays of LPS mm,
read from CSV or from 3D Slicer's ``.fcsv`` / ``.mrk.json`` files (RAS converted to LPS).
Every writer writes to a temporary name in the destination folder and renames it, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from maskreg.errors import InputError, where

if TYPE_CHECKING:  # pandas is imported where a table is read or written: it slows a warp job's start-up
    import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only when the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.mat``, ...) so writers that choose a format
    by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_image(
    path: str | os.PathLike,
    *,
    subject: str | None = None,
    role: str | None = None,
    dims: tuple[int, ...] = (2, 3),
    check_finite: bool = True,
) -> sitk.Image:
    """Read a scalar 2D or 3D image with SimpleITK, or raise ``InputError`` naming subject, role and file.

    Checks: the file exists and is readable; it is scalar (one component); its dimension is in ``dims``
    (a 3D file with a single slice is accepted as 2D only when ``2`` is allowed and ``3`` is not); voxels
    are finite when ``check_finite``.
    """
    p = str(path)
    at = where(subject, role, p)
    if not os.path.exists(p):
        raise InputError(
            f"{at}file not found. Check the path in the cohort table (relative paths are "
            f"relative to the table's folder)."
        )
    try:
        img = sitk.ReadImage(p)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputError(
            f"{at}cannot be read as an image ({first}). Is the file complete and in a format "
            f"SimpleITK reads (NIfTI, NRRD, MHA, ...)?"
        ) from None
    short = _nifti_truncation(p)
    if short:
        raise InputError(
            f"{at}is truncated: it holds {short}. The file is incomplete (an interrupted copy or "
            f"download?); copy or export it again."
        )
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{at}has {img.GetNumberOfComponentsPerPixel()} components per voxel; maskreg "
            f"needs a scalar image (split the channels first)."
        )
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1 and 3 in dims:
        img = img[:, :, :, 0]
        dim = 3
    if dim not in dims:
        hint = (
            " It looks like a series of volumes (time points, gradient directions, channels): extract "
            "the one volume to register (e.g. with fslroi or SimpleITK's image[:, :, :, i])."
            if dim == 4
            else ""
        )
        raise InputError(
            f"{at}is {dim}D with size {img.GetSize()}; expected a {' or '.join(f'{d}D' for d in dims)} image.{hint}"
        )
    if check_finite and img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(img)
        bad = int(np.count_nonzero(~np.isfinite(arr))) or _nifti_nonfinite(p)
        if bad:
            raise InputError(f"{at}has {bad} NaN or infinite voxel(s); replace them (e.g. by 0) before registration.")
    return img


def _nifti_truncation(path: str) -> str | None:
    """For a NIfTI file (``.nii``, ``.nii.gz``) shorter than its header announces, say how much it holds;
    else None.

    SimpleITK (niftilib) reads a truncated NIfTI without an error and fills the missing voxels, so this is
    checked here from the header (read with nibabel): uncompressed, against the file size; gzip, against the
    uncompressed size (the gzip trailer first, the whole stream when that does not match).
    """
    low = path.lower()
    if not low.endswith((".nii", ".nii.gz")):
        return None
    try:
        import nibabel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proxy = nibabel.load(path).dataobj
            need = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * int(np.dtype(proxy.dtype).itemsize)
    except Exception:  # a header nibabel cannot parse: only the gzip stream's integrity is checked
        need = None
    if low.endswith(".nii"):
        have = os.path.getsize(path)
        return None if need is None or have >= need else f"{have} of the {need} bytes its header announces"
    if need is not None:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == need % 2**32:  # gzip ISIZE: uncompressed size mod 2^32
                return None
    have = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                have += len(chunk)
    except (EOFError, OSError, zlib.error):
        return "a gzip stream that ends before its end marker"
    return None if need is None or have >= need else f"{have} of the {need} bytes (uncompressed) its header announces"


def _nifti_nonfinite(path: str) -> int:
    """Number of NaN/infinite voxels stored in a float NIfTI file (0 for other files).

    SimpleITK's NIfTI reader turns them into finite numbers (NaN → 0), so the stored values are read again
    with nibabel, only for NIfTI files with a floating-point data type.
    """
    if not path.lower().endswith((".nii", ".nii.gz")):
        return 0
    try:
        import nibabel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proxy = nibabel.load(path).dataobj
            if not np.issubdtype(np.dtype(proxy.dtype), np.floating):
                return 0
            return int(np.count_nonzero(~np.isfinite(proxy.get_unscaled())))
    except Exception:  # nibabel cannot read what SimpleITK read: nothing more to check
        return 0


def write_image(image: sitk.Image, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``image`` atomically (temporary file + rename) and return the final path."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return Path(path)


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a tab-separated table atomically (empty cells for missing values)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep="")
    return Path(path)


LANDMARK_FORMATS = (
    "a CSV file with columns x,y[,z] in LPS mm, a 3D Slicer markups point list .mrk.json, or a 3D Slicer fiducial .fcsv"
)
SLICER_SCHEMA = (
    "https://raw.githubusercontent.com/Slicer/Slicer/main/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
# '# CoordinateSystem = ...' of an .fcsv file: Slicer's names, and the numbers older Slicer versions wrote
_SLICER_SYSTEMS = {"RAS": "RAS", "0": "RAS", "LPS": "LPS", "1": "LPS"}


def read_landmarks(
    path: str | os.PathLike, dim: int, *, subject: str | None = None, role: str | None = None
) -> np.ndarray:
    """Read landmarks; return an ``(N, dim)`` float64 array of LPS mm, one row per point in file order.

    The format follows the file name (case-insensitive):

    * ``.fcsv``: 3D Slicer's markups fiducial CSV. ``#`` header lines, of which ``# CoordinateSystem = LPS``
      or ``RAS`` (older Slicer versions: ``1`` = LPS, ``0`` = RAS) is required; then one point per line,
      ``id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID[,...]`` (labels may be quoted).
      x, y, z are read from the columns the ``# columns =`` line names, else from the 2nd to 4th field, as
      Slicer does.
    * ``.json`` (Slicer writes ``.mrk.json``): 3D Slicer's markups JSON, with exactly one point list
      (``"type": "Fiducial"``); its ``coordinateSystem`` (``LPS``, the schema's default, or ``RAS``),
      ``coordinateUnits`` (``mm``, the default, or ``um``) and each control point's ``position``. A control
      point whose ``positionStatus`` is ``undefined`` (never placed) is an error, as rows must correspond.
    * anything else: CSV with a header and columns ``x,y[,z]`` in LPS mm (other columns ignored).

    Slicer's RAS coordinates become LPS by negating x and y. For ``dim = 2`` the first two LPS coordinates are
    kept and a third (Slicer's z, a CSV's ``z`` column) is ignored: a 2D image's physical space is the LPS x-y
    plane. Raises ``InputError`` naming subject, role and file, and what is wrong.
    """
    p = str(path)
    at = where(subject, role, p)
    if not os.path.exists(p):
        raise InputError(f"{at}file not found. Landmarks are {LANDMARK_FORMATS}.")
    low = p.lower()
    if low.endswith(".fcsv"):
        pts = _read_fcsv(p, at)
    elif low.endswith(".json"):
        pts = _read_markups_json(p, at)
    else:
        pts = _read_landmark_csv(p, dim, at)
    return np.ascontiguousarray(pts[:, :dim])


def _read_landmark_csv(p: str, dim: int, at: str) -> np.ndarray:
    """Columns ``x,y[,z]`` (LPS mm) of a CSV file with a header."""
    import pandas as pd

    try:
        df = pd.read_csv(p)
    except Exception as exc:  # pandas raises many types for malformed CSV
        raise InputError(f"{at}is not a readable CSV ({exc}). Landmarks are {LANDMARK_FORMATS}.") from None
    cols = ["x", "y", "z"][:dim]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(
            f"{at}lacks column(s) {', '.join(missing)}; expected columns {','.join(cols)} "
            f"in LPS mm (found {', '.join(map(str, df.columns))}). 3D Slicer files are read by their "
            f"extension: .fcsv or .mrk.json."
        )
    try:
        pts = df[cols].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{at}has non-numeric coordinates in columns {','.join(cols)}.") from None
    if len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise InputError(f"{at}has no landmarks or has empty/non-finite coordinates.")
    return pts


def _slicer_system(value: object, at: str, source: str) -> str:
    """``"LPS"`` or ``"RAS"`` from a Slicer coordinate-system value (name or old numeric code)."""
    system = _SLICER_SYSTEMS.get(str(value).strip().upper())
    if system is None:
        raise InputError(
            f"{at}{source} is {value!r}; expected LPS or RAS (or, in older .fcsv files, 1 = LPS, 0 = RAS)."
        )
    return system


def _read_text(p: str, at: str) -> str:
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{at}cannot be read as text ({exc}).") from None


def _read_fcsv(p: str, at: str) -> np.ndarray:
    """Points of a Slicer ``.fcsv`` file in LPS mm, shape ``(N, 3)``."""
    import csv

    system, columns, rows = None, None, []
    for lineno, line in enumerate(_read_text(p, at).splitlines(), 1):
        if line.startswith("#"):
            name, _, value = line[1:].partition("=")
            if name.strip() == "CoordinateSystem":
                system = _slicer_system(value.strip(), at, f"line {lineno}: '# CoordinateSystem'")
            elif name.strip() == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append((lineno, next(csv.reader([line]))))
    if system is None:
        raise InputError(
            f"{at}has no '# CoordinateSystem = LPS' (or RAS) header line, so LPS and RAS coordinates cannot "
            f"be told apart. Add the line Slicer writes (before the points), or save the points from "
            f"Slicer again."
        )
    xyz = [columns.index(c) for c in "xyz"] if columns and all(c in columns for c in "xyz") else [1, 2, 3]
    if not rows:
        raise InputError(f"{at}holds no points (only header lines).")
    pts = np.empty((len(rows), 3), dtype=np.float64)
    for i, (lineno, fields) in enumerate(rows):
        if len(fields) <= max(xyz):
            raise InputError(
                f"{at}line {lineno} has {len(fields)} field(s); a point line is "
                f"id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID."
            )
        try:
            pts[i] = [float(fields[k]) for k in xyz]
        except ValueError:
            got = ", ".join(repr(fields[k]) for k in xyz)
            raise InputError(f"{at}line {lineno}: x, y, z are {got}, not numbers.") from None
        if not np.all(np.isfinite(pts[i])):
            raise InputError(f"{at}line {lineno}: non-finite coordinate(s) {pts[i].tolist()}.")
    if system == "RAS":
        pts[:, :2] *= -1.0
    return pts


def _markups_point_list(doc: object, at: str) -> dict:
    """The one point list (``"type": "Fiducial"``) of a parsed Slicer markups JSON document."""
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise InputError(
            f"{at}is not a 3D Slicer markups file: it has no top-level 'markups' list. Landmarks are "
            f"{LANDMARK_FORMATS}."
        )
    lists = [m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if len(lists) != 1:
        types = ", ".join(str(m.get("type")) if isinstance(m, dict) else type(m).__name__ for m in markups)
        raise InputError(
            f"{at}holds {len(lists)} point list(s) (markups of type 'Fiducial') among its {len(markups)} "
            f"markup(s) ({types or 'none'}); maskreg reads exactly one point list per file: save each list "
            f"to its own file."
        )
    return lists[0]


def _markups_scale(units: object, at: str) -> float:
    """Millimetres per unit of a markup's ``coordinateUnits`` (a name or a ``[code, scheme, meaning]``
    list)."""
    code = units[0] if isinstance(units, list) and units else units
    scale = {"mm": 1.0, "um": 1e-3}.get(code) if isinstance(code, str) else None
    if scale is None:
        raise InputError(f"{at}'coordinateUnits' is {units!r}; expected 'mm' or 'um'.")
    return scale


def _control_point(cp: object, i: int, at: str) -> list[float]:
    """The ``position`` of control point ``i`` (1 = first) of a Slicer markups JSON point list."""
    label = cp.get("label", "") if isinstance(cp, dict) else ""
    who = f"control point {i}" + (f" ('{label}')" if label else "")
    if not isinstance(cp, dict):
        raise InputError(f"{at}{who} is {type(cp).__name__}, not an object with a 'position'.")
    status = cp.get("positionStatus", "defined")
    if status not in ("defined", "preview"):
        raise InputError(
            f"{at}{who} has positionStatus {status!r}: it was never placed. Place it or delete it in "
            f"Slicer (and the corresponding point of the other landmark file): row i of the fixed and the "
            f"moving landmarks must be the same point."
        )
    pos = cp.get("position")
    ok = isinstance(pos, list) and len(pos) == 3
    if not ok or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in pos):
        raise InputError(f"{at}{who}: 'position' is {pos!r}; expected a list of 3 numbers.")
    if not all(np.isfinite(pos)):
        raise InputError(f"{at}{who}: non-finite position {pos}.")
    return [float(c) for c in pos]


def _read_markups_json(p: str, at: str) -> np.ndarray:
    """Points of a Slicer markups JSON file (``.mrk.json``) in LPS mm, shape ``(N, 3)``."""
    import json

    try:
        doc = json.loads(_read_text(p, at))
    except json.JSONDecodeError as exc:
        raise InputError(f"{at}is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    mk = _markups_point_list(doc, at)
    system = _slicer_system(mk.get("coordinateSystem", "LPS"), at, "'coordinateSystem'")
    scale = _markups_scale(mk.get("coordinateUnits", "mm"), at)
    cps = mk.get("controlPoints", [])
    if not isinstance(cps, list) or not cps:
        raise InputError(f"{at}its point list holds no control points.")
    pts = np.array([_control_point(cp, i, at) for i, cp in enumerate(cps, 1)], dtype=np.float64) * scale
    if system == "RAS":
        pts[:, :2] *= -1.0
    return pts


def read_landmark_pair(
    fixed_path: str | os.PathLike, moving_path: str | os.PathLike, dim: int, *, subject: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read corresponding fixed and moving landmark files (:func:`read_landmarks`; row i ↔ row i, LPS mm);
    raise ``InputError`` naming both files and their row counts when they differ."""
    a = read_landmarks(fixed_path, dim, subject=subject, role="fixed_landmarks")
    b = read_landmarks(moving_path, dim, subject=subject, role="moving_landmarks")
    if len(a) != len(b):
        raise InputError(
            f"{where(subject)}fixed_landmarks '{fixed_path}' has {len(a)} row(s) but "
            f"moving_landmarks '{moving_path}' has {len(b)}; row i of one must be the same point "
            f"as row i of the other, so give both files the same points in the same order."
        )
    return a, b


def write_landmarks(points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``(N, dim)`` array of LPS mm points, atomically, in the format the name asks for: ``.fcsv``
    (3D Slicer fiducials, ``# CoordinateSystem = LPS``) or ``.json`` / ``.mrk.json`` (3D Slicer markups point
    list, ``"coordinateSystem": "LPS"``), with z = 0 for 2D points and labels ``P-1``, ``P-2``, ...; any
    other name: CSV with columns ``x,y[,z]``. :func:`read_landmarks` reads each back."""
    pts = np.asarray(points, dtype=np.float64)
    low = str(path).lower()
    if not low.endswith((".fcsv", ".json")):
        import pandas as pd

        cols = ["x", "y", "z"][: pts.shape[1]]
        with atomic_path(path) as tmp:
            pd.DataFrame(pts, columns=cols).to_csv(tmp, index=False, float_format="%.6f")
        return Path(path)
    xyz = np.zeros((len(pts), 3))
    xyz[:, : pts.shape[1]] = pts
    with atomic_path(path) as tmp:
        tmp.write_text(_fcsv_text(xyz) if low.endswith(".fcsv") else _markups_json_text(xyz))
    return Path(path)


def _fcsv_text(xyz: np.ndarray) -> str:
    lines = [
        "# Markups fiducial file version = 4.11",
        "# CoordinateSystem = LPS",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    lines += [f"{i},{x:.6f},{y:.6f},{z:.6f},0,0,0,1,1,1,0,P-{i},," for i, (x, y, z) in enumerate(xyz, 1)]
    return "\n".join(lines) + "\n"


def _markups_json_text(xyz: np.ndarray) -> str:
    import json

    points = [
        {"id": str(i), "label": f"P-{i}", "position": [round(float(c), 6) for c in p], "positionStatus": "defined"}
        for i, p in enumerate(xyz, 1)
    ]
    markup = {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "controlPoints": points}
    return json.dumps({"@schema": SLICER_SCHEMA, "markups": [markup]}, indent=2) + "\n"


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` share size, spacing, origin and direction (within ``tol``)."""
    return (
        a.GetDimension() == b.GetDimension()
        and a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
