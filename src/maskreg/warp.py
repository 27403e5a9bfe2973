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
from maskreg.transforms import LinearTransform

INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
INTEGER_TYPES = (
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
)


def warp_image(
    moving: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform,
    interpolation: str = "linear",
    default: float = 0.0,
) -> sitk.Image:
    """``moving(T(x))`` on ``reference``'s grid; float32 for linear/B-spline, the input type for nearest."""
    if interpolation not in INTERPOLATORS:
        raise ValueError(f"unknown interpolation '{interpolation}'; choose {', '.join(INTERPOLATORS)}")
    if interpolation == "nearest":
        return sitk.Resample(moving, reference, transform, sitk.sitkNearestNeighbor, default, moving.GetPixelID())
    return sitk.Resample(
        sitk.Cast(moving, sitk.sitkFloat32),
        reference,
        transform,
        INTERPOLATORS[interpolation],
        default,
        sitk.sitkFloat32,
    )


def warp_mask(mask: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """A binary mask warped linearly then thresholded at 0.5 (uint8 {0, 1})."""
    soft = sitk.Resample(
        sitk.Cast(mask > 0, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    return sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


def check_labels(
    labels: sitk.Image, *, subject: str | None = None, role: str = "labels", path: str | None = None
) -> None:
    """Label maps must hold integers: an integer pixel type, or floats that are all whole numbers."""
    if labels.GetPixelID() in INTEGER_TYPES:
        return
    arr = sitk.GetArrayViewFromImage(labels)
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise InputError(
            f"{where(subject, role, path)}label map holds non-integer values (pixel type "
            f"{labels.GetPixelIDTypeAsString()}); label maps must be integer-valued. Was an image "
            f"given in the labels column?"
        )


def _label_set(labels: sitk.Image) -> set[int]:
    return {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))} - {0}


def _fmt_labels(values: set[int], most: int = 12) -> str:
    v = sorted(values)
    return "{" + ", ".join(map(str, v[:most])) + (", ..." if len(v) > most else "") + "}" if v else "none"


def common_labels(
    fixed_labels: sitk.Image,
    moving_labels: sitk.Image,
    *,
    subject: str | None = None,
    fixed_path: str | None = None,
    moving_path: str | None = None,
) -> list[int]:
    """The nonzero label values present in both label maps (sorted), after :func:`check_labels` on each.

    Raises ``InputError`` naming the subject, both files and both label sets when there is none (Dice would
    be computed over nothing: the maps use different numberings, or one holds only background).
    """
    check_labels(fixed_labels, subject=subject, role="fixed_labels", path=fixed_path)
    check_labels(moving_labels, subject=subject, role="moving_labels", path=moving_path)
    a, b = _label_set(fixed_labels), _label_set(moving_labels)
    common = sorted(a & b)
    if not common:
        names = " and ".join(
            f"{r} '{p}'" if p else r for r, p in (("fixed_labels", fixed_path), ("moving_labels", moving_path))
        )
        raise InputError(
            f"{where(subject)}label maps have no label in common: {names}; fixed has "
            f"{_fmt_labels(a)}, moving has {_fmt_labels(b)} (background 0 not counted). Both maps "
            f"must use the same label numbering (the same atlas or lookup table); renumber one, "
            f"or leave the labels columns empty."
        )
    return common


def warp_labels(
    labels: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform,
    method: str = "generic",
    *,
    subject: str | None = None,
    role: str = "moving_labels",
) -> sitk.Image:
    """Warp an integer label map; the label set and the pixel type are preserved.

    ``generic`` (ANTs' "genericLabel" idea): each label's indicator is interpolated linearly and every voxel
    takes the label with the largest value (background 0 included; ties go to the smaller label value), so
    boundaries move smoothly and no new label value can appear. A voxel mapping outside the moving image gets
    0. The result equals ANTs' ``genericLabel`` interpolation (linear). Two implementations of this one
    method, chosen by the transform's cost:

    * a linear transform (affine, rigid, ..., or a composite of them): :func:`generic_label_regions` resamples
      each label only over the part of the reference grid that can see it, so time grows with the labels'
      sizes rather than their number times the grid (``sitkLabelLinear`` interpolates every label at every
      voxel, which costs far more than a linear transform);
    * any other transform (a displacement field in the chain): SimpleITK's ``sitkLabelLinear`` (ITK's
      ``LabelImageGenericInterpolateImageFunction`` with linear interpolation, SimpleITK ≥ 2.3), which
      evaluates the transform once per voxel, where the region version evaluates it once per label region
      that covers the voxel; its memory is the output alone.

    Both give the same labels except where two labels' weights tie to float32 rounding (ITK compares them in
    double); ``tests/test_label_interpolation.py`` holds them together and ``benchmarks/bench_warp.py``
    (methods ``maskreg-regions``, ``sitk-labelLinear``) times both. ``nearest``: nearest-neighbour
    resampling.
    """
    check_labels(labels, subject=subject, role=role)
    if method == "nearest":
        return sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    if method != "generic":
        raise ValueError(f"unknown label method '{method}'; choose generic or nearest")
    try:
        LinearTransform.from_sitk(transform)
    except ValueError:  # not linear: the transform is the costly part, evaluate it once per voxel
        return sitk.Resample(labels, reference, transform, sitk.sitkLabelLinear, 0, labels.GetPixelID())
    return generic_label_regions(labels, reference, transform)


def generic_label_regions(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """:func:`warp_labels`' generic method with each label resampled only over the reference region that can see
    it (its bounding box, see :func:`_reach`), for any transform (``warp_labels`` runs it for linear ones);
    memory stays at two reference-sized float images (running maximum, background weight) and the output,
    whatever the number of labels."""
    arr = sitk.GetArrayViewFromImage(labels)
    values = np.unique(arr)
    shape = tuple(reversed(reference.GetSize()))
    best = np.zeros(shape, dtype=np.float32)  # largest weight so far (0 where nothing reached yet)
    out = np.zeros(shape, dtype=arr.dtype)
    boxes = _label_boxes(arr, values)
    reach = _reach(labels, reference, transform) if boxes else None
    for v in values:  # ascending, and only a strictly larger weight replaces: ties keep the smaller label
        if v == 0:
            # background everywhere, weight 1 where T(x) falls outside the moving image
            w_img = sitk.Resample(
                sitk.Cast(labels == 0, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 1.0, sitk.sitkFloat32
            )
            region = tuple(slice(0, n) for n in shape)
        else:
            region = _region(reach, boxes[v], shape)
            if region is None:  # no reference voxel sees this label
                continue
            # the label's box grown by 2 voxels (clipped): the indicator is 0 on the crop's rim, so linear
            # interpolation in the crop equals that in the whole image wherever the label has weight
            lo = [max(a - 2, 0) for a, _ in boxes[v]]
            hi = [min(b + 2, n - 1) for (_, b), n in zip(boxes[v], arr.shape, strict=False)]
            crop = sitk.RegionOfInterest(labels, [b - a + 1 for a, b in zip(lo, hi, strict=False)][::-1], lo[::-1])
            start = [s.start for s in region][::-1]
            size = [s.stop - s.start for s in region][::-1]
            w_img = sitk.Resample(
                sitk.Cast(crop == int(v), sitk.sitkFloat32),
                size,
                transform,
                sitk.sitkLinear,
                reference.TransformIndexToPhysicalPoint(start),
                reference.GetSpacing(),
                reference.GetDirection(),
                0.0,
                sitk.sitkFloat32,
            )
        w = sitk.GetArrayViewFromImage(w_img)
        b_view, o_view = best[region], out[region]
        better = w > b_view
        np.copyto(b_view, w, where=better)
        np.copyto(o_view, v, where=better, casting="unsafe")
        del w, w_img, better
    # without label 0, voxels outside the moving image have weight 0 for every label and keep out = 0
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(reference)
    return sitk.Cast(result, labels.GetPixelID())


_REACH_BLOCK = 4  # reference voxels per block side for the label-region search


def _label_boxes(arr: np.ndarray, values: np.ndarray) -> dict:
    """Nonzero label value -> its bounding box in the label map, ``((lo, hi), ...)`` inclusive, numpy axis
    order."""
    from scipy import ndimage

    if np.issubdtype(arr.dtype, np.integer) and values[0] >= 0 and values[-1] <= (1 << 16):
        objs, pos = ndimage.find_objects(arr), {v: int(v) - 1 for v in values}
    else:  # negative, huge or float-typed values: number them 1..n first
        idx = np.searchsorted(values, arr).astype(np.int32)
        idx += 1
        objs, pos = ndimage.find_objects(idx), {v: i for i, v in enumerate(values)}
        del idx
    return {v: tuple((s.start, s.stop - 1) for s in objs[pos[v]]) for v in values if v != 0}


def _block_minmax(a: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum of ``a`` over blocks of ``b`` voxels a side (the last block of an axis may be
    shorter)."""
    mn = mx = a
    for ax in range(a.ndim):
        starts = np.arange(0, a.shape[ax], b)
        mn = np.minimum.reduceat(mn, starts, axis=ax)
        mx = np.maximum.reduceat(mx, starts, axis=ax)
    return mn, mx


def _reach(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> list:
    """For each moving axis, the smallest and largest moving voxel index nearest to ``T(x)`` over each block
    of the reference grid (``-2`` where ``T(x)`` leaves the moving image).

    A label has a nonzero linear weight at ``x`` only if a corner of the moving cell holding ``T(x)`` lies in
    the label's box; the nearest voxel is within one voxel of every corner, so the reference voxels that can
    see a label all lie in blocks whose index ranges meet the label's box grown by one (:func:`_region`).
    """
    shape = tuple(reversed(labels.GetSize()))
    dtype, pid = (np.int16, sitk.sitkInt16) if max(shape) < 32000 else (np.int32, sitk.sitkInt32)
    out = []
    for ax in range(len(shape)):
        idx = np.arange(shape[ax], dtype=dtype).reshape([-1 if i == ax else 1 for i in range(len(shape))])
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.broadcast_to(idx, shape)))
        img.CopyInformation(labels)
        nearest = sitk.Resample(img, reference, transform, sitk.sitkNearestNeighbor, -2, pid)
        del img
        out.append(_block_minmax(sitk.GetArrayViewFromImage(nearest), _REACH_BLOCK))
        del nearest
    return out


def _region(reach: list, box: tuple, shape: tuple) -> tuple[slice, ...] | None:
    """The reference-grid region (numpy slices) holding every voxel that can see the label in ``box``, or
    None when there is none."""
    hit = None
    for (mn, mx), (lo, hi) in zip(reach, box, strict=False):
        h = (mx >= lo - 1) & (mn <= hi + 1)
        hit = h if hit is None else hit & h
    if not hit.any():
        return None
    region = []
    for ax in range(hit.ndim):
        blocks = np.flatnonzero(hit.any(axis=tuple(i for i in range(hit.ndim) if i != ax)))
        region.append(slice(int(blocks[0]) * _REACH_BLOCK, min((int(blocks[-1]) + 1) * _REACH_BLOCK, shape[ax])))
    return tuple(region)


def warp_points(points: np.ndarray, transform: sitk.Transform) -> np.ndarray:
    """Map ``(N, dim)`` LPS mm points with ``transform`` (fixed-space points → moving space for the forward
    registration transform)."""
    return np.array([transform.TransformPoint([float(c) for c in p]) for p in points], dtype=np.float64)
