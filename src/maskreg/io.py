"""Reading and writing images, landmarks and tables, with checks and atomic writes.

Conventions: images are ``SimpleITK.Image`` objects that keep their geometry (size, spacing in mm, origin in
mm, direction cosines) in ITK's LPS physical space. Array views (``sitk.GetArrayFromImage``) are in
reverse index order: ``[z, y, x]`` for 3D, ``[y, x]`` for 2D. Landmarks are ``(N, dim)`` arrays of LPS mm.
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


def read_landmarks(
    path: str | os.PathLike, dim: int, *, subject: str | None = None, role: str | None = None
) -> np.ndarray:
    """Read a landmark CSV with columns ``x,y[,z]`` in LPS mm; return an ``(N, dim)`` float64 array."""
    p = str(path)
    at = where(subject, role, p)
    if not os.path.exists(p):
        raise InputError(f"{at}file not found.")
    import pandas as pd

    try:
        df = pd.read_csv(p)
    except Exception as exc:  # pandas raises many types for malformed CSV
        raise InputError(f"{at}is not a readable CSV ({exc}).") from None
    cols = ["x", "y", "z"][:dim]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(
            f"{at}lacks column(s) {', '.join(missing)}; expected columns {','.join(cols)} "
            f"in LPS mm (found {', '.join(map(str, df.columns))})."
        )
    try:
        pts = df[cols].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{at}has non-numeric coordinates in columns {','.join(cols)}.") from None
    if len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise InputError(f"{at}has no landmarks or has empty/non-finite coordinates.")
    return pts


def read_landmark_pair(
    fixed_path: str | os.PathLike, moving_path: str | os.PathLike, dim: int, *, subject: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read corresponding fixed and moving landmark CSVs (row i ↔ row i); raise ``InputError`` naming both
    files and their row counts when they differ."""
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
    """Write an ``(N, dim)`` array of LPS mm points as CSV with columns ``x,y[,z]``."""
    import pandas as pd

    cols = ["x", "y", "z"][: points.shape[1]]
    with atomic_path(path) as tmp:
        pd.DataFrame(points, columns=cols).to_csv(tmp, index=False, float_format="%.6f")
    return Path(path)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` share size, spacing, origin and direction (within ``tol``)."""
    return (
        a.GetDimension() == b.GetDimension()
        and a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
