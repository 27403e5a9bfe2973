"""Mask preparation: binary masks on their image's exact grid.

Conventions
-----------
* Every function takes and returns ``SimpleITK.Image`` objects, 2D or 3D. Geometry (size, spacing in mm,
  origin in mm, direction cosines, ITK LPS) of the output is always that of the reference image, exactly.
* A prepared mask is ``sitk.sitkUInt8`` with values {0, 1}.
* Radii are in **mm** and describe a ball in physical space. Array views (``sitk.GetArrayViewFromImage``) are
  in reverse index order (``[z, y, x]``), so spacing is reversed when used with numpy/scipy.
* Errors that a user can act on are :class:`maskreg.errors.MaskError` and name the subject and role
  (``fixed_mask``, ``moving_mask``, ...) when they are given.

Preparation order (:func:`prepare_mask`): source (given mask, else all-ones or auto) → binarise (on the mask's
own grid) → resample to the image grid → keep largest component → fill holes → dilate → erode → check.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from maskreg.errors import MaskError, where
from maskreg.io import same_grid

__all__ = [
    "allones_like",
    "resample_to_grid",
    "binarise",
    "keep_largest_component",
    "fill_holes",
    "dilate_mm",
    "erode_mm",
    "auto_mask",
    "check_mask",
    "prepare_mask",
    "centroid_index",
]

_MISSING = ("allones", "auto")
# Relative tolerance on the radius when comparing distances: a voxel centre at exactly r mm (a lattice tie)
# is inside the ball even after float32 rounding of squared distances.
_RTOL = 1e-6


# ----------------------------------------------------------------------------------------------- helpers


def _from_array(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """uint8 {0,1} image from a boolean/0-1 array in array order, with ``ref``'s exact geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.uint8))
    out.CopyInformation(ref)
    return out


def _as_bool(mask: sitk.Image) -> np.ndarray:
    """Boolean array (array order) of the nonzero voxels of ``mask``."""
    return sitk.GetArrayViewFromImage(mask) != 0


def _spacing_zyx(image: sitk.Image) -> tuple[float, ...]:
    """Spacing in array order (``[z, y, x]``), in mm."""
    return tuple(float(s) for s in reversed(image.GetSpacing()))


def _is_binary01(arr: np.ndarray) -> bool:
    if arr.dtype == np.bool_:
        return True
    return bool(np.all((arr == 0) | (arr == 1)))


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    """``(1.0, 2.5, 3.0)``-style tuple of plain rounded floats."""
    return (
        "("
        + ", ".join(f"{round(float(v), digits):g}" if abs(float(v)) < 1e6 else f"{float(v):.6g}" for v in values)
        + ")"
    )


def _grid_summary(img: sitk.Image) -> str:
    return f"size {tuple(img.GetSize())}, spacing {_fmt(img.GetSpacing())} mm, origin {_fmt(img.GetOrigin(), 2)} mm"


def _direction_matrix(img: sitk.Image) -> np.ndarray:
    d = img.GetDimension()
    return np.asarray(img.GetDirection(), dtype=np.float64).reshape(d, d)


def _grid_difference(mask: sitk.Image, image: sitk.Image) -> str:
    """Human-readable differences between two grids of the same dimension."""
    parts = []
    if mask.GetSize() != image.GetSize():
        parts.append(f"size {tuple(mask.GetSize())} vs {tuple(image.GetSize())}")
    sm, si = np.asarray(mask.GetSpacing()), np.asarray(image.GetSpacing())
    if not np.allclose(sm, si, atol=1e-4):
        parts.append(f"spacing {_fmt(sm)} vs {_fmt(si)} mm")
    off = np.asarray(mask.GetOrigin()) - np.asarray(image.GetOrigin())
    if not np.allclose(off, 0, atol=1e-4):
        parts.append(f"origin offset {_fmt(off, 3)} mm (|offset| {np.linalg.norm(off):.3f} mm)")
    dm, di = _direction_matrix(mask), _direction_matrix(image)
    ddiff = float(np.max(np.abs(dm - di)))
    if ddiff > 1e-4:
        rel = dm.T @ di
        if mask.GetDimension() == 3:
            angle = math.degrees(math.acos(float(np.clip((np.trace(rel) - 1) / 2, -1, 1))))
        else:
            angle = math.degrees(math.atan2(rel[1, 0], rel[0, 0]))
        parts.append(f"direction differs (max cosine difference {ddiff:.4f}, rotation {abs(angle):.2f}°)")
    return "; ".join(parts) if parts else "no difference beyond 1e-4"


def _any_voxel_inside(mask_bool: np.ndarray, mask: sitk.Image, image: sitk.Image, max_points: int = 200_000) -> bool:
    """True when the centre of some nonzero voxel of ``mask`` lies within ``image``'s physical extent."""
    idx = np.argwhere(mask_bool)[:, ::-1].astype(np.float64)  # sitk order (x, y[, z])
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(np.int64)]
    a_m = _direction_matrix(mask) * np.asarray(mask.GetSpacing())[None, :]
    pts = idx @ a_m.T + np.asarray(mask.GetOrigin())
    a_i = _direction_matrix(image) * np.asarray(image.GetSpacing())[None, :]
    cidx = np.linalg.solve(a_i, (pts - np.asarray(image.GetOrigin())).T).T
    size = np.asarray(image.GetSize(), dtype=np.float64)
    inside = np.all((cidx >= -0.5) & (cidx <= size - 0.5), axis=1)
    return bool(np.any(inside))


def _check_dimension(mask: sitk.Image, image: sitk.Image, subject: str | None, role: str | None) -> None:
    md, idim = mask.GetDimension(), image.GetDimension()
    if md != idim:
        raise MaskError(
            f"{where(subject, role)}{md}D mask for a {idim}D image (mask size "
            f"{tuple(mask.GetSize())}, image size {tuple(image.GetSize())}). Give a {idim}D "
            f"mask on the image's grid (or one that overlaps it physically)."
        )


# ------------------------------------------------------------------------------------------- sources


def allones_like(image: sitk.Image) -> sitk.Image:
    """All-ones uint8 mask on ``image``'s exact grid (size, spacing, origin, direction)."""
    shape = tuple(reversed(image.GetSize()))
    return _from_array(np.ones(shape, dtype=np.uint8), image)


# ------------------------------------------------------------------------------- grid and binarisation


def resample_to_grid(
    mask: sitk.Image, image: sitk.Image, *, subject: str | None = None, role: str | None = None
) -> sitk.Image:
    """Put ``mask`` on ``image``'s grid.

    * Same grid (:func:`maskreg.io.same_grid`, tolerance 1e-4): the mask is returned with its values unchanged;
      it is cast to uint8 when its values are already in {0, 1}, and its geometry is copied from ``image``
      so that it matches exactly.
    * Otherwise the mask is resampled with the identity transform (physical space, LPS mm): the binary
      indicator (nonzero → 1 when all values are integers) is interpolated linearly and thresholded at
      ``>= 0.5``; a mask with non-integer values (e.g. a probability map) has its values interpolated
      linearly and is returned as float32 for :func:`binarise`. A ``UserWarning`` states how the grids
      differed (size, spacing, origin offset in mm, direction).

    Raises ``MaskError`` when the dimensions differ (e.g. "2D mask for a 3D image") and when a non-empty
    mask lands empty because it does not overlap the image physically ("mask outside the image").
    """
    _check_dimension(mask, image, subject, role)
    at = where(subject, role)
    arr = sitk.GetArrayViewFromImage(mask)
    if same_grid(mask, image):
        if arr.dtype != np.uint8 and _is_binary01(arr):
            out = sitk.Cast(mask, sitk.sitkUInt8)
        else:
            out = sitk.Image(mask)
        out.CopyInformation(image)
        return out

    warnings.warn(
        f"{at}mask grid differs from the image grid ({_grid_difference(mask, image)}); "
        f"resampling the mask onto the image grid (identity transform, linear interpolation, "
        f"threshold 0.5).",
        UserWarning,
        stacklevel=2,
    )
    integer_valued = bool(np.all(np.isfinite(arr))) and (
        np.issubdtype(arr.dtype, np.integer) or bool(np.all(arr == np.round(arr)))
    )
    src_bool = arr != 0
    if integer_valued:
        src = sitk.GetImageFromArray(src_bool.astype(np.float32))
        src.CopyInformation(mask)
    else:
        src = sitk.Cast(mask, sitk.sitkFloat32)
    res = sitk.Resample(
        src, image, sitk.Transform(image.GetDimension(), sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    res.CopyInformation(image)
    res_arr = sitk.GetArrayViewFromImage(res)
    out = _from_array(res_arr >= 0.5, image) if integer_valued else res
    if src_bool.any() and not np.any(res_arr >= 0.5 if integer_valued else res_arr != 0):
        if not _any_voxel_inside(src_bool, mask, image):
            raise MaskError(
                f"{at}mask outside the image: none of its {int(src_bool.sum())} voxels lies "
                f"within the image's physical extent (mask {_grid_summary(mask)}; image "
                f"{_grid_summary(image)}). Check that mask and image share the same physical "
                f"space (origin and direction in the headers)."
            )
        raise MaskError(
            f"{at}mask became empty when resampled onto the image grid: its "
            f"{int(src_bool.sum())} voxel(s) are too small or thin for the image's voxels "
            f"(mask {_grid_summary(mask)}; image {_grid_summary(image)})."
        )
    return out


def binarise(
    mask: sitk.Image, *, threshold: float | None = None, subject: str | None = None, role: str | None = None
) -> sitk.Image:
    """Binary uint8 {0,1} mask with ``mask``'s geometry.

    ``threshold=None``: the mask must be integer-valued (float voxel types are allowed when every value is an
    integer); nonzero → 1. Non-integer values raise ``MaskError`` suggesting the ``threshold`` option.
    With a threshold: value ``> threshold`` → 1.
    """
    arr = sitk.GetArrayViewFromImage(mask)
    at = where(subject, role)
    if threshold is not None:
        if not np.isfinite(threshold):
            raise MaskError(f"{at}mask threshold must be a finite number, got {threshold!r}.")
        with np.errstate(invalid="ignore"):
            return _from_array(arr > threshold, mask)
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        finite = np.isfinite(arr)
        if not np.all(finite):
            raise MaskError(
                f"{at}mask has {int((~finite).sum())} NaN or infinite voxel(s); fix the file "
                f"or set the mask `threshold` option (values > threshold become 1)."
            )
        frac = arr != np.round(arr)
        if np.any(frac):
            example = float(arr[frac].flat[0])
            raise MaskError(
                f"{at}mask has {int(frac.sum())} non-integer voxel value(s) (e.g. {example:g}), "
                f"so it is not a binary mask; set the mask `threshold` option (values > "
                f"threshold become 1), e.g. threshold: 0.5 for a probability map."
            )
    return _from_array(arr != 0, mask)


# ------------------------------------------------------------------------------------------ morphology


def keep_largest_component(mask: sitk.Image, *, fully_connected: bool = False) -> sitk.Image:
    """Keep the largest connected component of the nonzero voxels (face connectivity unless
    ``fully_connected``). An empty mask is returned empty."""
    binary = _from_array(_as_bool(mask), mask)
    cc = sitk.ConnectedComponent(binary, fully_connected)
    rel = sitk.RelabelComponent(cc, sortByObjectSize=True)
    return _from_array(sitk.GetArrayViewFromImage(rel) == 1, mask)


def fill_holes(mask: sitk.Image) -> sitk.Image:
    """Fill holes: background regions not connected to the image border (``sitk.BinaryFillhole``, fully
    connected), in the image's full dimension (a 3D hole must be closed in 3D; per-slice holes open along
    the slice axis are not filled)."""
    binary = _from_array(_as_bool(mask), mask)
    filled = sitk.BinaryFillhole(binary, fullyConnected=True, foregroundValue=1)
    return _from_array(sitk.GetArrayViewFromImage(filled) != 0, mask)


def _crop_bounds(bool_arr: np.ndarray, radius_mm: float, spacing_zyx: Sequence[float]) -> tuple[slice, ...]:
    """Bounding box of the nonzero voxels grown by every voxel within ``radius_mm`` along each axis."""
    slices = []
    for ax, s in enumerate(spacing_zyx):
        other = tuple(a for a in range(bool_arr.ndim) if a != ax)
        nz = np.flatnonzero(np.any(bool_arr, axis=other))
        grow = int(math.floor(radius_mm * (1 + _RTOL) / s)) + 1
        slices.append(slice(max(int(nz[0]) - grow, 0), min(int(nz[-1]) + 1 + grow, bool_arr.shape[ax])))
    return tuple(slices)


def _sq_distance_to(sources: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Exact squared Euclidean distance (mm²) from each voxel centre to the nearest ``True`` voxel centre.

    ITK's Maurer distance map (exact, linear time, multi-threaded) with the voxel spacing; values at source
    voxels are <= 0 and mean "distance 0". The caller guarantees that at least one source exists.
    """
    img = sitk.GetImageFromArray(sources.astype(np.uint8))
    img.SetSpacing(tuple(reversed([float(s) for s in spacing_zyx])))
    dmap = sitk.SignedMaurerDistanceMap(
        img, insideIsPositive=False, squaredDistance=True, useImageSpacing=True, backgroundValue=0.0
    )
    return sitk.GetArrayFromImage(dmap)  # a copy: a view would dangle once ``dmap`` is freed


def _validate_radius(radius_mm: float, what: str) -> float:
    r = float(radius_mm)
    if not math.isfinite(r) or r < 0:
        raise MaskError(f"{what} radius must be a finite number of mm >= 0, got {radius_mm!r}.")
    return r


def dilate_mm(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """Dilate by a ball of ``radius_mm`` mm in physical space.

    A voxel is in the result iff its centre lies within ``radius_mm`` (Euclidean, mm) of the centre of some
    mask voxel. Anisotropic spacing is exact: no rounding of the radius to whole voxels along any axis.
    Direction cosines do not matter: the direction matrix is orthonormal, so distances between voxel centres
    of one grid depend only on index differences times spacing. The distance transform (exact Euclidean, ITK
    Maurer) runs only within the mask's bounding box grown by the radius, which is exact. Returns a uint8
    {0,1} mask on the same grid; ``radius_mm == 0`` returns the binarised mask unchanged.
    """
    r = _validate_radius(radius_mm, "dilation")
    src = _as_bool(mask)
    if r == 0 or not src.any():
        return _from_array(src, mask)
    spacing = _spacing_zyx(mask)
    crop = _crop_bounds(src, r, spacing)
    d2 = _sq_distance_to(src[crop], spacing)
    out = np.zeros(src.shape, dtype=bool)
    out[crop] = d2 <= (r * (1 + _RTOL)) ** 2
    return _from_array(out, mask)


def erode_mm(mask: sitk.Image, radius_mm: float, *, subject: str | None = None, role: str | None = None) -> sitk.Image:
    """Erode by a ball of ``radius_mm`` mm in physical space: the complement of the dilation of the complement.

    A mask voxel stays iff no non-mask voxel *of the image* has its centre within ``radius_mm`` mm. Voxels
    outside the image count as inside the mask, so an all-ones mask stays all ones and a mask touching the
    image border is not eaten from the border. Exact for anisotropic spacing and oblique directions (see
    :func:`dilate_mm`). Raises ``MaskError`` when the erosion empties the mask, naming the radius, the
    subject/role, the voxel count before, and the largest inscribed radius (the largest distance, in mm, from
    a mask voxel to the nearest non-mask voxel: any radius below it keeps some voxels).
    """
    r = _validate_radius(radius_mm, "erosion")
    src = _as_bool(mask)
    if r == 0 or not src.any() or src.all():
        return _from_array(src, mask)
    spacing = _spacing_zyx(mask)
    crop = _crop_bounds(src, r, spacing)
    inside = src[crop]  # holds a non-mask voxel: the mask is not all ones, so its grown box has one
    out = np.zeros(src.shape, dtype=bool)
    d2 = _sq_distance_to(~inside, spacing)
    kept = inside & (d2 > (r * (1 + _RTOL)) ** 2)
    if not kept.any():
        n_before = int(src.sum())
        inscribed = math.sqrt(max(float(np.max(np.where(inside, d2, 0.0))), 0.0))
        raise MaskError(
            f"{where(subject, role)}erosion by {r:g} mm empties the mask ({n_before} voxel(s) "
            f"before). Its largest inscribed radius is {inscribed:.3g} mm: use an erosion "
            f"radius below that (or none)."
        )
    out[crop] = kept
    return _from_array(out, mask)


# ---------------------------------------------------------------------------------------- automatic mask


def auto_mask(image: sitk.Image, *, closing_mm: float | None = None) -> sitk.Image:
    """Automatic foreground mask for an image that comes without one.

    Otsu threshold (foreground = above), keep the largest component (face connectivity), a small closing
    (dilate then erode by ``closing_mm``, default 2 × the median spacing in mm), fill holes in the full
    dimension, then in 3D fill holes slice by slice along the last index axis (``z``; e.g. the lungs of an
    axial CT, open at the top and bottom of the field of view). Returns a uint8 {0,1} mask on ``image``'s
    exact grid; raises ``MaskError`` when no foreground is found (e.g. a constant image).
    """
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0 or float(np.min(arr)) == float(np.max(arr)):
        raise MaskError(
            f"auto mask: the image is constant ({float(np.min(arr)) if arr.size else 'empty'}); "
            f"there is no foreground to find. Give a mask or use missing: allones."
        )
    img = sitk.Cast(image, sitk.sitkFloat32)
    otsu = sitk.OtsuThreshold(img, 0, 1, 256)  # insideValue=0 below threshold, outsideValue=1 above
    m = keep_largest_component(otsu)
    r = float(np.median(image.GetSpacing())) * 2.0 if closing_mm is None else float(closing_mm)
    if r > 0:
        m = erode_mm(dilate_mm(m, r), r)
    m = fill_holes(m)
    if image.GetDimension() == 3:
        b = sitk.GetArrayFromImage(m).astype(bool)
        for k in range(b.shape[0]):
            if b[k].any() and not b[k].all():
                sl = _from_array(b[k], image[:, :, k])
                filled = sitk.BinaryFillhole(sl, fullyConnected=True, foregroundValue=1)
                b[k] = sitk.GetArrayViewFromImage(filled) != 0  # ``filled`` must outlive the view
        m = _from_array(b, image)
    return m


# ------------------------------------------------------------------------------------ checks and driver

# prepare_mask's keyword arguments shadow these names inside it.
_fill_holes = fill_holes
_dilate_mm = dilate_mm
_erode_mm = erode_mm


def check_mask(
    mask: sitk.Image, *, subject: str | None = None, role: str | None = None, min_voxels: int = 1
) -> sitk.Image:
    """Return ``mask`` unchanged, or raise ``MaskError`` (naming subject and role) when it has fewer than
    ``min_voxels`` nonzero voxels."""
    n = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    if n < min_voxels:
        what = "is empty" if n == 0 else f"has only {n} voxel(s)"
        raise MaskError(
            f"{where(subject, role)}mask {what}; at least {min_voxels} needed. Check the mask "
            f"file and the mask preparation options (threshold, erode_mm)."
        )
    return mask


def prepare_mask(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    missing: str = "allones",
    threshold: float | None = None,
    largest_component: bool = False,
    fill_holes: bool = False,
    dilate_mm: float = 0.0,
    erode_mm: float = 0.0,
    subject: str | None = None,
    role: str | None = None,
) -> sitk.Image:
    """Prepare the mask of ``image``: a uint8 {0,1} mask on the image's exact grid.

    Order: source (``mask``, else ``missing``: ``"allones"`` → :func:`allones_like`, ``"auto"`` →
    :func:`auto_mask`) → :func:`binarise` with ``threshold`` (on the mask's own grid, so label maps and
    thresholded probability maps are never interpolated as intensities) → :func:`resample_to_grid` →
    :func:`keep_largest_component` (if ``largest_component``) → :func:`fill_holes` (if ``fill_holes``) →
    dilate by ``dilate_mm`` mm → erode by ``erode_mm`` mm → :func:`check_mask`.
    """
    at = where(subject, role)
    if missing not in _MISSING:
        raise MaskError(f"{at}unknown value {missing!r} for `missing`; expected one of {', '.join(_MISSING)}.")
    if mask is None:
        if missing == "allones":
            src = allones_like(image)
        else:
            try:
                src = auto_mask(image)
            except MaskError as exc:
                raise MaskError(f"{at}{exc}") from None
    else:
        _check_dimension(mask, image, subject, role)
        src = binarise(mask, threshold=threshold, subject=subject, role=role)
    m = resample_to_grid(src, image, subject=subject, role=role)
    m = binarise(m, subject=subject, role=role)
    if largest_component:
        m = keep_largest_component(m)
    if fill_holes:
        m = _fill_holes(m)
    if dilate_mm:
        m = _dilate_mm(m, dilate_mm)
    if erode_mm:
        m = _erode_mm(m, erode_mm, subject=subject, role=role)
    return check_mask(m, subject=subject, role=role)


def centroid_index(mask: sitk.Image) -> tuple[int, ...]:
    """Centroid of the nonzero voxels as a rounded voxel index in sitk order ``(x, y[, z])``.

    Raises ``MaskError`` for an empty mask.
    """
    arr = _as_bool(mask)
    if not arr.any():
        raise MaskError("centroid of an empty mask is undefined.")
    idx = np.argwhere(arr).mean(axis=0)
    return tuple(int(round(float(v))) for v in idx[::-1])
