"""Tests of maskreg.qc.metrics against analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from maskreg.qc.metrics import dice_per_label, jacobian_determinant, jacobian_stats, masked_ncc, mean_dice, tre

# ------------------------------------------------------------------------------------------------- Dice


def _two_boxes(shift: int = 0) -> np.ndarray:
    lab = np.zeros((12, 20, 30), dtype=np.uint8)  # z, y, x
    lab[2:8, 3:9, 5 + shift : 15 + shift] = 1  # box of length L=10 along x
    lab[2:6, 12:18, 4:8] = 2
    return lab


def test_dice_self_is_one(make_image):
    lab = make_image(_two_boxes())
    d = dice_per_label(lab, lab)
    assert d == {1: 1.0, 2: 1.0}
    assert mean_dice(d) == 1.0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_dice_shifted_box_is_analytic(k, make_image):
    ref = make_image(_two_boxes())
    moved = make_image(_two_boxes(shift=k))
    d = dice_per_label(ref, moved)
    assert d[1] == pytest.approx((10 - k) / 10, abs=1e-12)
    assert d[2] == 1.0
    assert mean_dice(d) == pytest.approx(((10 - k) / 10 + 1) / 2)


def test_dice_default_labels_are_those_in_both(make_image):
    a = _two_boxes()
    b = _two_boxes()
    b[b == 2] = 0
    b[0, 0, 0] = 5
    d = dice_per_label(make_image(a), make_image(b))
    assert set(d) == {1}
    explicit = dice_per_label(make_image(a), make_image(b), labels=[1, 2, 7])
    assert explicit[1] == 1.0 and explicit[2] == 0.0 and math.isnan(explicit[7])


def test_dice_empty_and_mean_nan(make_image):
    z = make_image(np.zeros((4, 5, 6), np.uint8))
    assert dice_per_label(z, z) == {}
    assert math.isnan(mean_dice({}))


def test_dice_rejects_other_grid(make_image):
    a = make_image(_two_boxes())
    b = make_image(_two_boxes()[:, :, :-1].copy())
    with pytest.raises(ValueError):
        dice_per_label(a, b)


# -------------------------------------------------------------------------------------------------- TRE


def test_tre_translation_equals_displacement():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-50, 50, size=(7, 3))
    t = np.array([3.0, 4.0, 12.0])
    r = tre(pts, pts + t)
    assert r["tre_mean_mm"] == pytest.approx(13.0)
    assert r["tre_max_mm"] == pytest.approx(13.0)


def test_tre_rotation_known_distances():
    # rotation by theta about z through the origin: a point at radius r in the xy-plane moves 2 r sin(theta/2)
    theta = math.radians(30)
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    pts = np.array([[10.0, 0, 5], [0, 20.0, -3], [0, 0, 40.0]])
    moved = pts @ rot.T + np.array([0.0, 0.0, 0.0])
    expected = np.array([10, 20, 0]) * 2 * math.sin(theta / 2)
    r = tre(pts, moved)
    assert r["tre_mean_mm"] == pytest.approx(expected.mean())
    assert r["tre_max_mm"] == pytest.approx(expected.max())


def test_tre_shape_mismatch():
    with pytest.raises(ValueError):
        tre(np.zeros((3, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        tre(np.zeros((3, 3)), np.zeros((3, 2)))


# -------------------------------------------------------------------------------------------------- NCC


def _smooth_random(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, 2.0)).astype(np.float64)


def test_ncc_self_affine_negative(make_image):
    a = _smooth_random((10, 24, 28))
    mask = np.zeros(a.shape, np.uint8)
    mask[2:8, 4:20, 5:22] = 1
    ia, m = make_image(a), make_image(mask)
    assert masked_ncc(ia, ia, m) == pytest.approx(1.0, abs=1e-12)
    assert masked_ncc(ia, make_image(3.5 * a - 200.0), m) == pytest.approx(1.0, abs=1e-12)
    assert masked_ncc(ia, make_image(-a), m) == pytest.approx(-1.0, abs=1e-12)
    # numpy mask works as well
    assert masked_ncc(ia, make_image(2 * a + 1), mask) == pytest.approx(1.0, abs=1e-12)


def test_ncc_mask_restricts(make_image):
    a = _smooth_random((40, 50), seed=3)
    b = _smooth_random((40, 50), seed=4)  # unrelated outside the mask
    mask = np.zeros(a.shape, np.uint8)
    mask[5:25, 10:40] = 1
    b[mask > 0] = 2.0 * a[mask > 0] + 7.0
    inside = masked_ncc(make_image(a), make_image(b), make_image(mask))
    whole = masked_ncc(make_image(a), make_image(b))
    assert inside == pytest.approx(1.0, abs=1e-12)
    assert whole < 0.95
    assert whole == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)


def test_ncc_weights_are_weights(make_image):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 7))
    b = a + rng.normal(size=(6, 7))
    w = rng.integers(0, 4, size=(6, 7)).astype(float)
    # integer weights = voxels repeated that many times
    ra = np.repeat(a.ravel(), w.ravel().astype(int))
    rb = np.repeat(b.ravel(), w.ravel().astype(int))
    assert masked_ncc(make_image(a), make_image(b), make_image(w)) == pytest.approx(
        np.corrcoef(ra, rb)[0, 1], abs=1e-12
    )
    assert masked_ncc(make_image(a), make_image(b), make_image(w)) != pytest.approx(
        np.corrcoef(a.ravel(), b.ravel())[0, 1]
    )


def test_ncc_nan_cases(make_image):
    a = _smooth_random((8, 9))
    one = np.zeros(a.shape)
    one[3, 3] = 1
    assert math.isnan(masked_ncc(make_image(a), make_image(a), make_image(one)))
    assert math.isnan(masked_ncc(make_image(a), make_image(np.full(a.shape, 4.0))))


# ------------------------------------------------------------------------------------------------ Jacobian


def _rot3(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _physical_points(ref: sitk.Image) -> np.ndarray:
    """Physical coordinates (x, y[, z]) of every voxel, in array order [..., dim]."""
    dim = ref.GetDimension()
    grids = np.meshgrid(*[np.arange(n) for n in ref.GetSize()[::-1]], indexing="ij")
    idx = np.stack(grids[::-1], axis=-1).astype(np.float64)  # (x, y[, z]) index per voxel
    d = np.asarray(ref.GetDirection()).reshape(dim, dim)
    return np.asarray(ref.GetOrigin()) + (idx * np.asarray(ref.GetSpacing())) @ d.T


def _linear_displacement(ref: sitk.Image, a: np.ndarray) -> np.ndarray:
    """``u(x) = (A - I) x`` at every voxel of ``ref`` (array order, components x, y[, z] last): det J = det A."""
    return _physical_points(ref) @ (a - np.eye(a.shape[0])).T


@pytest.mark.parametrize("pixel", [sitk.sitkVectorFloat64, sitk.sitkVectorFloat32])
def test_jacobian_linear_field_oblique_3d(pixel, make_image):
    ref = sitk.Image([18, 16, 14], sitk.sitkFloat32)
    ref.SetSpacing([0.7, 1.3, 2.1])
    ref.SetOrigin([3.0, -5.0, 7.0])
    ref.SetDirection(_rot3(0.3, -0.4, 0.5).ravel().tolist())
    a = np.array([[1.2, 0.3, 0.1], [-0.2, 0.9, 0.25], [0.1, -0.15, 1.1]])
    det = jacobian_determinant(sitk.Cast(make_image(_linear_displacement(ref, a), like=ref, vector=True), pixel))
    arr = sitk.GetArrayFromImage(det)[1:-1, 1:-1, 1:-1]
    assert det.GetSize() == ref.GetSize()
    np.testing.assert_allclose(det.GetDirection(), ref.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(arr, np.linalg.det(a), atol=1e-3)


def test_jacobian_linear_field_oblique_2d(make_image):
    ref = sitk.Image([20, 17], sitk.sitkFloat32)
    ref.SetSpacing([0.6, 1.7])
    ref.SetOrigin([-4.0, 9.0])
    th = 0.6
    ref.SetDirection([math.cos(th), -math.sin(th), math.sin(th), math.cos(th)])
    a = np.array([[1.1, 0.4], [-0.3, 0.8]])
    det = sitk.GetArrayFromImage(jacobian_determinant(make_image(_linear_displacement(ref, a), like=ref, vector=True)))
    np.testing.assert_allclose(det[1:-1, 1:-1], np.linalg.det(a), atol=1e-3)


def test_jacobian_identity_and_fold(make_image):
    ref = sitk.Image([40, 40], sitk.sitkFloat32)
    ref.SetSpacing([1.0, 1.0])
    zero = sitk.Cast(sitk.Compose(ref * 0, ref * 0), sitk.sitkVectorFloat64)
    zero.CopyInformation(ref)
    st = jacobian_stats(jacobian_determinant(zero))
    assert st["jacobian_min"] == pytest.approx(1.0) and st["jacobian_max"] == pytest.approx(1.0)
    assert st["jacobian_nonpositive_fraction"] == 0.0

    # a sharp local push along x: du_x/dx = -3 at the centre, so det = 1 - 3 < 0 there (a fold)
    yy, xx = np.mgrid[:40, :40].astype(float)
    r2 = (xx - 20) ** 2 + (yy - 20) ** 2
    u = np.zeros((40, 40, 2))
    u[..., 0] = -3.0 * (xx - 20) * np.exp(-r2 / (2 * 4.0**2))
    det = jacobian_determinant(make_image(u, vector=True))
    st = jacobian_stats(det)
    assert 0.0 < st["jacobian_nonpositive_fraction"] < 0.2
    assert st["jacobian_min"] < 0 < st["jacobian_max"]
    assert sitk.GetArrayFromImage(det)[20, 20] == pytest.approx(-2.0, abs=0.15)  # central differences
    # the mask restricts the statistics
    mask = np.zeros((40, 40), np.uint8)
    mask[:8, :8] = 1
    m = make_image(mask)
    st_m = jacobian_stats(det, m)
    assert st_m["jacobian_nonpositive_fraction"] == 0.0
    assert st_m["jacobian_min"] > 0.99
    empty = jacobian_stats(det, m * 0)
    assert math.isnan(empty["jacobian_min"])
