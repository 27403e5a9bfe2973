"""Generic-label interpolation and SimpleITK's ``sitkLabelLinear`` (issue 28).

``sitk.sitkLabelLinear`` (SimpleITK ≥ 2.3: ITK's ``LabelImageGenericInterpolateImageFunction`` with linear
interpolation, ANTs' ``genericLabel``) is the method ``maskreg.warp.warp_labels(..., "generic")`` implements:
each label's indicator interpolated linearly, the largest weight wins, ties to the smaller label value, 0
outside the moving image. ``warp_labels`` uses it for transforms with a displacement field and its own
region-restricted version for linear ones (faster there). These tests hold ``warp_labels``, ``sitkLabelLinear``
and an independent plain reference (every label resampled over the whole grid) to the same labels, on a real
TotalSegmentator map through an affine and through an affine + displacement field that carries part of the
grid past the map, and on a 2D float-typed map with negative labels and no background. Where two differ, both
labels' weights must tie to float32 rounding (ITK compares in double, the others in float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from maskreg import warp


def _weights(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform, value) -> np.ndarray:
    """The linear weight of label ``value`` on ``reference``'s grid (float32; 1 for background outside)."""
    return sitk.GetArrayFromImage(
        sitk.Resample(
            sitk.Cast(labels == float(value), sitk.sitkFloat32),
            reference,
            transform,
            sitk.sitkLinear,
            1.0 if value == 0 else 0.0,
            sitk.sitkFloat32,
        )
    )


def _label_linear(labels, reference, transform) -> np.ndarray:
    return sitk.GetArrayFromImage(
        sitk.Resample(labels, reference, transform, sitk.sitkLabelLinear, 0, labels.GetPixelID())
    )


def _plain_generic(labels, reference, transform) -> np.ndarray:
    """The independent reference: every label's indicator resampled over the whole grid (float32), the largest
    weight wins, ties to the smaller label, 0 outside the moving image."""
    arr = sitk.GetArrayViewFromImage(labels)
    best = np.zeros(tuple(reversed(reference.GetSize())), np.float32)
    out = np.zeros(best.shape, arr.dtype)
    for v in np.unique(arr):
        w = _weights(labels, reference, transform, v)
        better = w > best
        best[better], out[better] = w[better], v
    return out


def _ties_only(a: np.ndarray, b: np.ndarray, labels, reference, transform) -> int:
    """Assert that label arrays ``a`` and ``b`` differ only where their two labels' weights tie to float32
    rounding, at fewer than 1e-4 of the voxels; return the number of differing voxels."""
    differ = np.nonzero(a != b)
    if differ[0].size:
        w = {v: _weights(labels, reference, transform, v)[differ] for v in np.unique(np.r_[a[differ], b[differ]])}
        w_a = np.array([w[v][k] for k, v in enumerate(a[differ])])
        w_b = np.array([w[v][k] for k, v in enumerate(b[differ])])
        assert np.abs(w_a - w_b).max() < 1e-6, "the label maps disagree beyond float32 ties"
        assert differ[0].size < 1e-4 * a.size
    return int(differ[0].size)


def _assert_same_up_to_ties(labels, reference, transform) -> np.ndarray:
    """``warp_labels`` generic, ``sitkLabelLinear`` and the plain reference give the same labels up to ties;
    returns the ``warp_labels`` array."""
    ours = sitk.GetArrayFromImage(warp.warp_labels(labels, reference, transform, "generic"))
    theirs = _label_linear(labels, reference, transform)
    assert ours.dtype == theirs.dtype
    _ties_only(ours, theirs, labels, reference, transform)
    _ties_only(ours, _plain_generic(labels, reference, transform), labels, reference, transform)
    return ours


def _rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.fixture(scope="module")
def ct_labels(shared_data) -> sitk.Image:
    return sitk.ReadImage(str(shared_data("totalseg_ct", "ct_a", "labels.nii.gz")))  # uint8, 122×101×30, 3 mm


@pytest.fixture(scope="module")
def grid(ct_labels) -> sitk.Image:
    """A 3 mm grid, direction cosines rotated 12°, that sticks out of the map by about 6 mm on every side."""
    d = _rotation((1, 2, 3), 12.0) @ np.asarray(ct_labels.GetDirection()).reshape(3, 3)
    size = np.array(ct_labels.GetSize())
    corners = np.array(
        [
            ct_labels.TransformContinuousIndexToPhysicalPoint((c * size - 0.5).tolist())
            for c in np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T
        ]
    )
    local = corners @ d
    lo, hi = local.min(0) - 6.0, local.max(0) + 6.0
    out = sitk.Image([int(np.ceil(n)) for n in (hi - lo) / 3.0], sitk.sitkUInt8)
    out.SetSpacing((3.0, 3.0, 3.0))
    out.SetDirection(d.flatten().tolist())
    out.SetOrigin((d @ (lo + 1.5)).tolist())
    return out


def _affine(ct_labels) -> sitk.AffineTransform:
    centre = ct_labels.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct_labels.GetSize()])
    shear = np.array([[0.05, -0.02, 0.01], [0.03, -0.04, 0.02], [-0.01, 0.02, 0.03]])
    tx = sitk.AffineTransform(3)
    tx.SetCenter(centre)
    tx.SetMatrix((_rotation((0.3, -1, 0.5), 5.0) @ (np.eye(3) + shear)).flatten().tolist())
    tx.SetTranslation((4.0, -7.5, 3.0))
    return tx


def _field(grid: sitk.Image, max_mm: float, seed: int) -> sitk.DisplacementFieldTransform:
    """A smooth random displacement field (LPS mm, at most ``max_mm``) on ``grid``."""
    rng = np.random.default_rng(seed)
    noise = sitk.GetImageFromArray(rng.standard_normal((*reversed(grid.GetSize()), 3)), isVector=True)
    noise.CopyInformation(grid)
    u = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 10.0))  # sigma in mm
    u *= max_mm / np.sqrt((u**2).sum(-1)).max()
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["affine", "affine+field"])
def test_generic_equals_sitk_label_linear_on_real_map(ct_labels, grid, kind):
    tx = _affine(ct_labels)
    if kind == "affine+field":
        chain = sitk.CompositeTransform(3)
        chain.AddTransform(tx)  # applied last to points
        chain.AddTransform(_field(grid, 8.0, seed=28))  # applied first
        tx = chain
    ours = _assert_same_up_to_ties(ct_labels, grid, tx)
    ones = sitk.Image(ct_labels.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(ct_labels)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, grid, tx, sitk.sitkLinear, 0.0)) > 0.5
    assert (~inside).sum() > 0.05 * inside.size  # part of the grid maps past the map's field of view
    assert np.all(ours[~inside] == 0)
    values = set(np.unique(sitk.GetArrayViewFromImage(ct_labels)).tolist())
    assert len(np.unique(ours)) > 30 and set(np.unique(ours).tolist()) <= values


def test_generic_equals_sitk_label_linear_on_odd_labels(odd_label_case):
    """2D float32 map with negative labels and no background 0; half of the grid outside the map."""
    labels, ref, tx, _ = odd_label_case(6)
    ours = _assert_same_up_to_ties(labels, ref, tx)
    assert (ours == 0).any() and (ours != 0).any()


def test_exact_ties_go_to_the_smaller_label_in_both(make_image):
    """A reference voxel halfway between a voxel of label 5 and one of label 2: both weights are exactly 0.5,
    and both implementations pick 2."""
    arr = np.array([[5, 2], [5, 2]], dtype=np.uint8)
    labels = make_image(arr)
    ref = sitk.Image([1, 1], sitk.sitkUInt8)
    ref.SetOrigin((0.5, 0.0))
    ident = sitk.Transform(2, sitk.sitkIdentity)
    assert sitk.GetArrayFromImage(warp.warp_labels(labels, ref, ident, "generic"))[0, 0] == 2
    assert _label_linear(labels, ref, ident)[0, 0] == 2


def test_nearest_is_sitk_nearest(ct_labels, grid):
    tx = _affine(ct_labels)
    ours = sitk.GetArrayFromImage(warp.warp_labels(ct_labels, grid, tx, "nearest"))
    theirs = sitk.Resample(ct_labels, grid, tx, sitk.sitkNearestNeighbor, 0, ct_labels.GetPixelID())
    assert np.array_equal(ours, sitk.GetArrayFromImage(theirs))
