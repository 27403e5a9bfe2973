"""Quantitative QC metrics: Dice, masked NCC, Jacobian determinant of a displacement field or transform, TRE.

Inputs are SimpleITK images on the *same* grid (the fixed grid) unless stated. Arrays follow SimpleITK's
array order (``[z, y, x]`` for 3D, ``[y, x]`` for 2D); points are ``(N, dim)`` arrays in LPS mm.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk

from maskreg.errors import InputError, where

__all__ = [
    "dice_per_label",
    "mean_dice",
    "masked_ncc",
    "jacobian_determinant",
    "jacobian_map",
    "log_jacobian",
    "jacobian_stats",
    "tre",
]


def _array(img: sitk.Image | np.ndarray) -> np.ndarray:
    if isinstance(img, sitk.Image):
        return sitk.GetArrayViewFromImage(img)
    return np.asarray(img)


def _grid_shape(img: sitk.Image | np.ndarray) -> tuple[int, ...]:
    """The array shape of the grid (``[z,] y, x``), without the components of a vector image."""
    if isinstance(img, sitk.Image):
        return tuple(img.GetSize())[::-1]
    return np.shape(img)


def _check_same_grid(a: sitk.Image | np.ndarray, b: sitk.Image | np.ndarray, what: str, tol: float = 1e-3) -> None:
    sa, sb = _grid_shape(a), _grid_shape(b)
    if sa != sb:
        raise ValueError(f"{what}: arrays differ in shape {sa} vs {sb}; resample onto the fixed grid first.")
    if isinstance(a, sitk.Image) and isinstance(b, sitk.Image):
        if not (
            np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
        ):
            raise ValueError(
                f"{what}: images have the same size but different geometry (spacing, origin "
                f"or direction); resample onto the fixed grid first."
            )


def _integer_labels(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return arr.astype(np.int64, copy=False).ravel()
    # float label maps (e.g. written by a generic resampler) are rounded to the nearest integer
    return np.rint(arr).astype(np.int64).ravel()


def dice_per_label(reference: sitk.Image, test: sitk.Image, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)`` per label value.

    By default the labels evaluated are the nonzero values present in *both* images (empty dict if none).
    With explicit ``labels``, a label present in only one image gets 0.0 and a label present in neither gets
    ``nan``. Float label maps are rounded to integers.
    """
    _check_same_grid(reference, test, "dice_per_label")
    a = _integer_labels(_array(reference))
    b = _integer_labels(_array(test))
    if labels is None:
        wanted = np.intersect1d(np.unique(a), np.unique(b))
        wanted = [int(v) for v in wanted if v != 0]
    else:
        wanted = [int(v) for v in labels]
    if not wanted:
        return {}
    lo = min(int(a.min()), int(b.min()), min(wanted))
    hi = max(int(a.max()), int(b.max()), max(wanted))
    out: dict[int, float] = {}
    if hi - lo < 10_000_000:  # counting with bincount: one pass over the data for all labels
        n = hi - lo + 1
        ca = np.bincount(a - lo, minlength=n)
        cb = np.bincount(b - lo, minlength=n)
        same = a == b
        ci = np.bincount(a[same] - lo, minlength=n)
        for v in wanted:
            i = v - lo
            denom = int(ca[i]) + int(cb[i])
            out[v] = float(2.0 * ci[i] / denom) if denom else float("nan")
    else:  # pathological label values: per-label comparison
        for v in wanted:
            ma, mb = a == v, b == v
            denom = int(ma.sum()) + int(mb.sum())
            out[v] = float(2.0 * np.count_nonzero(ma & mb) / denom) if denom else float("nan")
    return out


def mean_dice(d: dict) -> float:
    """Mean of the finite Dice values in ``d``; ``nan`` when there are none."""
    vals = np.array([v for v in d.values() if v is not None], dtype=float)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def masked_ncc(a: sitk.Image, b: sitk.Image, weight: sitk.Image | np.ndarray | None = None) -> float:
    """Weighted Pearson correlation of the intensities of ``a`` and ``b``.

    Only voxels with ``weight > 0`` take part, each with its weight (all voxels, weight 1, when ``weight`` is
    None). Invariant to a positive (negative) affine intensity change of either image up to sign. Returns
    ``nan`` when fewer than 2 voxels take part or either image is constant over them.
    """
    _check_same_grid(a, b, "masked_ncc")
    xa = _array(a).astype(np.float64, copy=False).ravel()
    xb = _array(b).astype(np.float64, copy=False).ravel()
    if weight is None:
        w = np.ones_like(xa)
    else:
        _check_same_grid(a, weight, "masked_ncc weight")
        w = _array(weight).astype(np.float64, copy=False).ravel()
    sel = w > 0
    sel &= np.isfinite(xa) & np.isfinite(xb) & np.isfinite(w)
    if np.count_nonzero(sel) < 2:
        return float("nan")
    xa, xb, w = xa[sel], xb[sel], w[sel]
    if np.ptp(xa) == 0 or np.ptp(xb) == 0:
        return float("nan")
    wsum = w.sum()
    da = xa - (w @ xa) / wsum
    db = xb - (w @ xb) / wsum
    saa = w @ (da * da)
    sbb = w @ (db * db)
    if saa <= 0 or sbb <= 0:
        return float("nan")
    r = float((w @ (da * db)) / np.sqrt(saa * sbb))
    return float(np.clip(r, -1.0, 1.0))


def jacobian_determinant(displacement: sitk.Image) -> sitk.Image:
    """Jacobian determinant of ``x -> x + u(x)`` in physical space, as a float64 image on the field's grid.

    ``displacement`` is a vector image (components x, y[, z] in LPS mm). ITK's
    ``DisplacementFieldJacobianDeterminantFilter`` differentiates along the *index* axes (it honours spacing
    but ignores direction cosines), so the vectors are first expressed in the image-axis frame
    (``v = Dᵀ u``): then ``I + ∂v/∂ξ S⁻¹ = Dᵀ (I + ∂u/∂x) D``, which has the same determinant as the
    physical Jacobian. Central differences inside; at the outermost voxel layer ITK uses a zero-flux
    boundary, which halves the derivative there.
    """
    if not isinstance(displacement, sitk.Image):
        raise TypeError("jacobian_determinant expects a SimpleITK vector image")
    dim = displacement.GetDimension()
    if displacement.GetNumberOfComponentsPerPixel() != dim:
        raise ValueError(
            f"displacement field must have {dim} components per voxel (one per axis), "
            f"got {displacement.GetNumberOfComponentsPerPixel()}"
        )
    direction = np.asarray(displacement.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if np.allclose(direction, np.eye(dim), atol=1e-12):
        field = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    else:
        u = sitk.GetArrayViewFromImage(displacement).astype(np.float64, copy=False)
        v = u @ direction  # row-vector form of Dᵀ u for every voxel
        field = sitk.GetImageFromArray(v, isVector=True)
        field.CopyInformation(displacement)
    det = sitk.DisplacementFieldJacobianDeterminant(field, True)
    return sitk.Cast(det, sitk.sitkFloat64)


def jacobian_map(
    reference: sitk.Image,
    linear_matrix: np.ndarray,
    displacement: sitk.Image | None = None,
    *,
    include_linear: bool = True,
) -> sitk.Image:
    """Jacobian determinant of the fixed → moving point map of a registration, float64 on ``reference``'s grid.

    The map is ``T(x) = A (x + u(x)) + b``: ``u`` the displacement field (``warp.nii.gz``, vector image on the
    fixed grid, LPS mm; None for a linear-only registration) applied first to points, then the linear part
    (``affine.mat``) with its ``(dim, dim)`` matrix ``linear_matrix`` = ``A``. ``x`` and ``T(x)`` are physical
    LPS points in mm, so spacing and direction cosines are included and the value does not depend on how
    either image's voxels are laid out:

        det J_T(x) = det(A) · det(I + ∂u/∂x)

    is the volume in moving space that a unit of fixed-space volume around ``x`` maps to: > 1 where the moving
    anatomy is larger than the fixed, < 1 where smaller, ≤ 0 where the map folds (or ``A`` mirrors).
    ``include_linear=False`` leaves ``det(A)`` out: the deformable part alone, what ANTs'
    ``CreateJacobianDeterminantImage`` computes from ``warp.nii.gz``. Without a field the map is constant
    (``det(A)``, or 1). ``det(I + ∂u/∂x)`` is :func:`jacobian_determinant`'s (ITK's 3-point central differences,
    zero-flux boundary), the one the QC folding figure counts; ANTs uses 5-point differences (and clips det at 0),
    so the two agree where the field is quadratic along each axis and part by truncation error elsewhere. The
    displacement field must lie on ``reference``'s grid.
    """
    dim = reference.GetDimension()
    matrix = np.asarray(linear_matrix, dtype=np.float64)
    if matrix.shape != (dim, dim):
        raise ValueError(f"jacobian_map: linear_matrix must be {dim}x{dim}, got shape {matrix.shape}")
    det_linear = float(np.linalg.det(matrix)) if include_linear else 1.0
    if displacement is None:
        out = sitk.Image(reference.GetSize(), sitk.sitkFloat64)
        out.CopyInformation(reference)
        return out + det_linear
    _check_same_grid(reference, displacement, "jacobian_map displacement")
    det = jacobian_determinant(displacement)
    det.CopyInformation(reference)
    return det * det_linear if det_linear != 1.0 else det


def log_jacobian(det: sitk.Image, floor: float = 1e-3) -> sitk.Image:
    """``log(max(det, floor))`` voxel by voxel, as ANTs' ``CreateJacobianDeterminantImage ... doLog=1`` writes it
    (floor 0.001: folded voxels get log 0.001 ≈ -6.9 rather than nan). Same grid and pixel type as ``det``."""
    return sitk.Log(sitk.Maximum(det, float(floor)))


def jacobian_stats(det: sitk.Image, mask: sitk.Image | None = None) -> dict:
    """Min, max and share of voxels with determinant ≤ 0 over ``mask > 0`` (all voxels when None).

    Values are ``nan`` when the mask is empty.
    """
    d = _array(det).astype(np.float64, copy=False)
    if mask is not None:
        _check_same_grid(det, mask, "jacobian_stats")
        d = d[_array(mask) > 0]
    d = d.ravel()
    if d.size == 0:
        nan = float("nan")
        return {"jacobian_min": nan, "jacobian_max": nan, "jacobian_nonpositive_fraction": nan}
    return {
        "jacobian_min": float(np.nanmin(d)),
        "jacobian_max": float(np.nanmax(d)),
        "jacobian_nonpositive_fraction": float(np.count_nonzero(d <= 0) / d.size),
    }


def tre(
    points_a: np.ndarray,
    points_b: np.ndarray,
    *,
    subject: str | None = None,
    names: tuple[str, str] = ("fixed_landmarks", "moving_landmarks"),
) -> dict:
    """Target registration error between corresponding rows of two ``(N, dim)`` point arrays (mm).

    Returns ``{"tre_mean_mm", "tre_max_mm"}``. Raises :class:`~maskreg.errors.InputError` (a ``ValueError``)
    naming ``subject`` and the two point sets ``names`` (e.g. their files) when the row counts or the
    dimensions differ or there are no points.
    """
    a = np.asarray(points_a, dtype=np.float64)
    b = np.asarray(points_b, dtype=np.float64)
    at = where(subject)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] == 0 or b.shape[0] == 0:
        raise InputError(
            f"{at}tre: expected (N, dim) point arrays with N ≥ 1, got shapes {a.shape} ({names[0]}) "
            f"and {b.shape} ({names[1]})."
        )
    if a.shape[0] != b.shape[0]:
        raise InputError(
            f"{at}{names[0]} has {a.shape[0]} landmark row(s) but {names[1]} has {b.shape[0]}; "
            f"row i of one must be the same point as row i of the other, so give both the same "
            f"points in the same order."
        )
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"{at}{names[0]} has {a.shape[1]} coordinate(s) per point but {names[1]} has "
            f"{b.shape[1]}; both must have the image's dimension."
        )
    dist = np.linalg.norm(a - b, axis=1)
    return {"tre_mean_mm": float(dist.mean()), "tre_max_mm": float(dist.max())}
