"""Warping moving-space data onto a reference (fixed) grid, and mapping landmarks.

All functions take a SimpleITK transform mapping **fixed/reference points to moving points** (the
registration's result, ``RegistrationResult.transform()``, or one read from ITK/ANTs files) and resample
``moving(T(x))`` at the voxel centres ``x`` of ``reference`` — exactly what ``sitk.Resample`` and
``antsApplyTransforms`` do, so applying our files with either reproduces these outputs.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from maskreg.errors import InputError, where

INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
INTEGER_TYPES = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
                 sitk.sitkUInt64, sitk.sitkInt64)


def warp_image(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
               interpolation: str = "linear", default: float = 0.0) -> sitk.Image:
    """``moving(T(x))`` on ``reference``'s grid; float32 for linear/B-spline, the input type for nearest."""
    if interpolation not in INTERPOLATORS:
        raise ValueError(f"unknown interpolation '{interpolation}'; choose {', '.join(INTERPOLATORS)}")
    if interpolation == "nearest":
        return sitk.Resample(moving, reference, transform, sitk.sitkNearestNeighbor, default, moving.GetPixelID())
    return sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), reference, transform, INTERPOLATORS[interpolation],
                         default, sitk.sitkFloat32)


def warp_mask(mask: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """A binary mask warped linearly then thresholded at 0.5 (uint8 {0, 1})."""
    soft = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)
    return sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


def check_labels(labels: sitk.Image, *, subject: str | None = None, role: str = "labels",
                 path: str | None = None) -> None:
    """Label maps must hold integers: an integer pixel type, or floats that are all whole numbers."""
    if labels.GetPixelID() in INTEGER_TYPES:
        return
    arr = sitk.GetArrayViewFromImage(labels)
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise InputError(f"{where(subject, role, path)}label map holds non-integer values (pixel type "
                         f"{labels.GetPixelIDTypeAsString()}); label maps must be integer-valued. Was an image "
                         f"given in the labels column?")


def _label_set(labels: sitk.Image) -> set[int]:
    return {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))} - {0}


def _fmt_labels(values: set[int], most: int = 12) -> str:
    v = sorted(values)
    return "{" + ", ".join(map(str, v[:most])) + (", ..." if len(v) > most else "") + "}" if v else "none"


def common_labels(fixed_labels: sitk.Image, moving_labels: sitk.Image, *, subject: str | None = None,
                  fixed_path: str | None = None, moving_path: str | None = None) -> list[int]:
    """The nonzero label values present in both label maps (sorted), after :func:`check_labels` on each.

    Raises ``InputError`` naming the subject, both files and both label sets when there is none (Dice would
    be computed over nothing: the maps use different numberings, or one holds only background).
    """
    check_labels(fixed_labels, subject=subject, role="fixed_labels", path=fixed_path)
    check_labels(moving_labels, subject=subject, role="moving_labels", path=moving_path)
    a, b = _label_set(fixed_labels), _label_set(moving_labels)
    common = sorted(a & b)
    if not common:
        names = " and ".join(f"{r} '{p}'" if p else r for r, p in (("fixed_labels", fixed_path),
                                                                   ("moving_labels", moving_path)))
        raise InputError(f"{where(subject)}label maps have no label in common: {names}; fixed has "
                         f"{_fmt_labels(a)}, moving has {_fmt_labels(b)} (background 0 not counted). Both maps "
                         f"must use the same label numbering (the same atlas or lookup table); renumber one, "
                         f"or leave the labels columns empty.")
    return common


def warp_labels(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform, method: str = "generic",
                *, subject: str | None = None, role: str = "moving_labels") -> sitk.Image:
    """Warp an integer label map; the label set and the pixel type are preserved.

    ``generic`` (ANTs' "genericLabel" idea): each label's indicator is interpolated linearly and every voxel
    takes the label with the largest value (background 0 included), so boundaries move smoothly and no new
    label value can appear. Memory stays at two reference-sized float images and one label image, whatever
    the number of labels. ``nearest``: nearest-neighbour resampling.
    """
    check_labels(labels, subject=subject, role=role)
    if method == "nearest":
        return sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    if method != "generic":
        raise ValueError(f"unknown label method '{method}'; choose generic or nearest")
    arr = sitk.GetArrayViewFromImage(labels)
    values = np.unique(arr)
    best = np.zeros(tuple(reversed(reference.GetSize())), dtype=np.float32)
    out = np.zeros_like(best, dtype=arr.dtype)
    # a voxel mapping outside the moving image gets background (0): its weight for 0 is 1 there
    first = True
    for v in values:
        ind = sitk.Cast(labels == int(v), sitk.sitkFloat32)
        default = 1.0 if v == 0 else 0.0
        w = sitk.GetArrayFromImage(sitk.Resample(ind, reference, transform, sitk.sitkLinear, default,
                                                 sitk.sitkFloat32))
        if first:
            best[...] = w
            out[...] = v
            first = False
            continue
        better = w > best
        best[better] = w[better]
        out[better] = v
    if 0 not in values:
        # voxels mapping outside the moving image must not take a label
        ones = sitk.Image(labels.GetSize(), sitk.sitkFloat32) + 1.0
        ones.CopyInformation(labels)
        outside = sitk.GetArrayFromImage(sitk.Resample(ones, reference, transform, sitk.sitkLinear, 0.0))
        out[outside < 0.5] = 0
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(reference)
    return sitk.Cast(result, labels.GetPixelID())


def warp_points(points: np.ndarray, transform: sitk.Transform) -> np.ndarray:
    """Map ``(N, dim)`` LPS mm points with ``transform`` (fixed-space points → moving space for the forward
    registration transform)."""
    return np.array([transform.TransformPoint([float(c) for c in p]) for p in points], dtype=np.float64)
