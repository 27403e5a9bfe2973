"""Tests of maskreg.masks: geometry preservation, exact physical-ball morphology, and actionable errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from maskreg import masks
from maskreg.errors import MaskError

# files of the shared data folder (the ``shared_data`` fixture skips a test whose file is not there)
BRAIN1_LABELS = ("pyradiomics_brain_mr", "brain1", "labels.nii.gz")
OBLIQUE = ("dipy_oblique", "aniso_vox", "image.nii.gz")
BRAIN2D = ("antspy_brain2d", "r16", "image.nii.gz")
CT = ("totalseg_ct", "ct_a", "image.nii.gz")
CT_TABLE = ("totalseg_ct", "ct_b", "image.nii.gz")


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


# ------------------------------------------------------------------------------ ground truth by brute force


def physical_points(img: sitk.Image) -> np.ndarray:
    """(N, dim) LPS mm of every voxel centre, in numpy array (C) order, via TransformIndexToPhysicalPoint."""
    shape = tuple(reversed(img.GetSize()))
    pts = np.empty((int(np.prod(shape)), img.GetDimension()))
    for n, idx_zyx in enumerate(np.ndindex(*shape)):
        pts[n] = img.TransformIndexToPhysicalPoint([int(i) for i in reversed(idx_zyx)])
    return pts


def truth_distance(img: sitk.Image, sources: np.ndarray) -> np.ndarray:
    """Physical distance (mm) from every voxel centre to the nearest ``sources`` voxel centre (k-d tree on
    physical points: independent of the library's distance transform, and it goes through the direction)."""
    pts = physical_points(img)
    d, _ = cKDTree(pts[sources.ravel()]).query(pts)
    return d.reshape(sources.shape)


def check_against_truth(result: np.ndarray, truth: np.ndarray, dist: np.ndarray, r: float, min_spacing: float) -> None:
    diff = result != truth
    # At most a few boundary voxels may differ (ties at exactly r), none deeper than one voxel.
    assert int(diff.sum()) <= 3, f"{int(diff.sum())} voxels differ from the brute-force ball of {r} mm"
    if diff.any():
        assert np.all(np.abs(dist[diff] - r) < min_spacing)


@pytest.fixture(scope="module")
def lesion_crop(shared_data) -> sitk.Image:
    """The brain1 lesion (0.78x0.78x6.5 mm) in a crop with room for a 7.3 mm ball on every side."""
    lab = sitk.ReadImage(str(shared_data(*BRAIN1_LABELS)))
    crop = lab[150:221, 72:166, 9:20]  # slicing keeps physical geometry (origin moves)
    a = arr(crop)
    assert a.sum() == arr(lab).sum(), "crop must contain the whole lesion"
    return crop


@pytest.fixture(scope="module")
def oblique_mask(shared_data) -> sitk.Image:
    img = sitk.ReadImage(str(shared_data(*OBLIQUE)))
    m = sitk.Cast(img > 300, sitk.sitkUInt8)
    assert np.max(np.abs(np.asarray(img.GetDirection()) - np.eye(3).ravel())) > 0.1, "image should be oblique"
    return m


# ------------------------------------------------------------------------------------- morphology: exactness


@pytest.mark.parametrize("r", [5.0, 7.3])
def test_dilate_matches_physical_ball_anisotropic(lesion_crop: sitk.Image, r: float) -> None:
    src = arr(lesion_crop) != 0
    dist = truth_distance(lesion_crop, src)
    out = masks.dilate_mm(lesion_crop, r)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(out, lesion_crop)
    res = arr(out).astype(bool)
    assert set(np.unique(arr(out))) <= {0, 1}
    check_against_truth(res, dist <= r, dist, r, min(lesion_crop.GetSpacing()))
    assert np.all(res[src]), "dilation must keep every original voxel"


def test_dilate_no_hidden_rounding_along_thick_axis(lesion_crop: sitk.Image) -> None:
    src = arr(lesion_crop) != 0
    slices = lambda a: int(np.count_nonzero(a.any(axis=(1, 2))))  # noqa: E731
    cols = lambda a: int(np.count_nonzero(a.any(axis=(0, 1))))  # noqa: E731  (x, 0.78125 mm)
    n_slices, n_cols = slices(src), cols(src)
    d5 = arr(masks.dilate_mm(lesion_crop, 5.0)) != 0
    d7 = arr(masks.dilate_mm(lesion_crop, 7.0)) != 0
    # 5 mm < 6.5 mm slice spacing: no new slice; 7 mm > 6.5 mm: one new slice on each side.
    assert slices(d5) == n_slices
    assert slices(d7) == n_slices + 2
    # In plane: floor(5 / 0.78125) = 6 new columns each side, floor(7 / 0.78125) = 8.
    assert cols(d5) == n_cols + 2 * 6
    assert cols(d7) == n_cols + 2 * 8


@pytest.mark.parametrize("r", [5.0, 7.3])
def test_erode_matches_physical_ball_anisotropic(lesion_crop: sitk.Image, r: float) -> None:
    src = arr(lesion_crop) != 0
    dist = truth_distance(lesion_crop, ~src)  # distance to nearest non-mask voxel of the image
    out = masks.erode_mm(lesion_crop, r)
    assert_same_geometry(out, lesion_crop)
    res = arr(out).astype(bool)
    truth = src & (dist > r)
    assert truth.any()
    check_against_truth(res, truth, dist, r, min(lesion_crop.GetSpacing()))
    assert not np.any(res & ~src), "erosion must not add voxels"


@pytest.mark.parametrize("r", [5.5, 7.3, 9.0])  # not multiples of 4 or 5 mm: no lattice ties at r
def test_dilate_and_erode_exact_on_oblique_grid(oblique_mask: sitk.Image, r: float) -> None:
    src = arr(oblique_mask) != 0
    spacing = min(oblique_mask.GetSpacing())
    d_in = truth_distance(oblique_mask, src)
    dil = masks.dilate_mm(oblique_mask, r)
    assert_same_geometry(dil, oblique_mask)
    check_against_truth(arr(dil) != 0, d_in <= r, d_in, r, spacing)
    d_out = truth_distance(oblique_mask, ~src)
    ero = masks.erode_mm(oblique_mask, r)
    assert_same_geometry(ero, oblique_mask)
    check_against_truth(arr(ero) != 0, src & (d_out > r), d_out, r, spacing)


def test_dilate_2d_exact_and_radius_zero(make_image) -> None:
    a = np.zeros((40, 50), np.uint8)
    a[10:14, 20:23] = 1
    a[30, 5] = 1
    img = make_image(a, spacing=(0.7, 1.3), origin=(3.0, -2.0), direction=(0.0, 1.0, -1.0, 0.0))
    dist = truth_distance(img, a != 0)
    for r in (2.0, 3.3):
        check_against_truth(arr(masks.dilate_mm(img, r)) != 0, dist <= r, dist, r, 0.7)
    same = masks.dilate_mm(img, 0)
    np.testing.assert_array_equal(arr(same), a)
    np.testing.assert_array_equal(arr(masks.erode_mm(img, 0)), a)


def test_erode_allones_stays_allones_and_border_not_eaten(make_image) -> None:
    img = make_image(np.zeros((6, 20, 20), np.int16), spacing=(1.0, 1.0, 2.0))
    ones = masks.allones_like(img)
    assert arr(masks.erode_mm(ones, 4.0)).all()
    a = np.zeros((6, 20, 20), np.uint8)
    a[:, :, :10] = 1  # touches the image border at x = 0
    m = make_image(a, spacing=(1.0, 1.0, 2.0))
    e = arr(masks.erode_mm(m, 3.0))
    assert e[:, :, :7].all() and not e[:, :, 7:].any()  # only the inner edge (x >= 7) is eaten


def test_erosion_that_empties_names_radius_subject_and_inscribed_radius(lesion_crop: sitk.Image) -> None:
    with pytest.raises(MaskError) as info:
        masks.erode_mm(lesion_crop, 40.0, subject="sub-07", role="fixed_mask")
    msg = str(info.value)
    assert "40 mm" in msg and "sub-07" in msg and "fixed_mask" in msg
    assert str(int(arr(lesion_crop).sum())) in msg
    # The inscribed radius it reports really is the limit: erosion just below it keeps voxels.
    inscribed = float(msg.split("inscribed radius is ")[1].split(" mm")[0])
    assert arr(masks.erode_mm(lesion_crop, inscribed * 0.99)).any()
    with pytest.raises(MaskError):
        masks.erode_mm(lesion_crop, inscribed * 1.01)


def test_negative_radius_rejected(make_image) -> None:
    img = make_image(np.ones((5, 5), np.uint8))
    with pytest.raises(MaskError, match="radius"):
        masks.dilate_mm(img, -1.0)


# ------------------------------------------------------------------------------------- sources and geometry


def test_allones_like_exact_geometry(oblique_mask: sitk.Image, shared_data) -> None:
    img = sitk.ReadImage(str(shared_data(*OBLIQUE)))
    m = masks.allones_like(img)
    assert_same_geometry(m, img)
    assert m.GetPixelID() == sitk.sitkUInt8
    assert arr(m).min() == 1 and arr(m).max() == 1


def test_auto_mask_brain2d(shared_data) -> None:
    img = sitk.ReadImage(str(shared_data(*BRAIN2D)))
    m = masks.auto_mask(img)
    assert_same_geometry(m, img)
    assert m.GetPixelID() == sitk.sitkUInt8
    a = arr(m).astype(bool)
    # The slice is skull-stripped: the brain covers about 27 % of it.
    assert 0.2 < a.mean() < 0.7
    assert not a[0].any() and not a[-1].any() and not a[:, 0].any() and not a[:, -1].any()
    # One compact blob without holes.
    n_cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(m)).max()
    assert n_cc == 1
    assert np.array_equal(arr(masks.fill_holes(m)), arr(m))
    # Where the image is background (0), the mask is almost nowhere; the bright brain is all inside.
    im = arr(img)
    assert a[im > 100].mean() > 0.99
    assert a[im == 0].mean() < 0.05


def test_auto_mask_ct_body_not_air(shared_data) -> None:
    img = sitk.ReadImage(str(shared_data(*CT)))
    m = masks.auto_mask(img)
    assert_same_geometry(m, img)
    a, hu = arr(m).astype(bool), arr(img)
    assert 0.3 < a.mean() < 0.9
    assert a[hu > 0].mean() > 0.9, "soft tissue / bone must be in the body mask"
    assert a[hu < -900].mean() < 0.3, "outside air must mostly be out"
    # Each axial slice is essentially one body blob (a stray voxel may join it through a neighbouring slice).
    for k in range(a.shape[0]):
        lab, n = ndimage.label(a[k])
        assert n >= 1 and np.bincount(lab.ravel())[1:].max() >= 0.99 * a[k].sum()


def test_auto_mask_ct_excludes_table(shared_data) -> None:
    img = sitk.ReadImage(str(shared_data(*CT_TABLE)))
    a, hu = arr(masks.auto_mask(img)).astype(bool), arr(img)
    assert a[hu > 0].mean() > 0.8
    # The patient table lies in rows y >= 425 of the axial slices, below the body: dense, yet not in the mask.
    assert np.count_nonzero(hu[:, 430:, :] > -500) > 5000
    assert not a[:, 430:, :].any()


# ------------------------------------------------------------------------------------------ resampling


def test_same_grid_mask_is_cast_and_keeps_geometry(make_image) -> None:
    a = np.zeros((4, 5, 6), np.int16)
    a[1:3, 2:4, 2:5] = 1
    img = make_image(np.zeros((4, 5, 6), np.float32), spacing=(1, 2, 3), origin=(1, 2, 3))
    m = make_image(a, spacing=(1, 2, 3), origin=(1 + 1e-6, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = masks.resample_to_grid(m, img)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(out, img)
    np.testing.assert_array_equal(arr(out), a)


def test_2d_mask_for_3d_image_fails_clearly(make_image) -> None:
    img = make_image(np.zeros((4, 8, 8), np.float32))
    m2 = make_image(np.ones((8, 8), np.uint8))
    with pytest.raises(MaskError, match="2D mask for a 3D image") as info:
        masks.resample_to_grid(m2, img, subject="s1", role="moving_mask")
    assert "s1" in str(info.value) and "moving_mask" in str(info.value)
    with pytest.raises(MaskError, match="2D mask for a 3D image"):
        masks.prepare_mask(img, m2, subject="s1", role="moving_mask")


def test_overlapping_mask_on_other_grid_is_resampled_with_warning(make_image) -> None:
    img = make_image(np.zeros((10, 40, 40), np.float32), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    # Mask on a grid with half the resolution, shifted by 3 mm in x; physical box x in [10, 30) mm.
    a = np.zeros((10, 20, 20), np.uint8)
    a[2:8, 5:15, 5:15] = 1  # x index 5..14 at 2 mm spacing, origin 3 → centres 13..39 mm
    m = make_image(a, spacing=(2.0, 2.0, 2.0), origin=(3.0, 0.0, 0.0))
    with pytest.warns(UserWarning, match=r"spacing \(2, 2, 2\) vs \(1, 1, 2\) mm; origin offset \(3, 0, 0\) mm"):
        out = masks.resample_to_grid(m, img, subject="s2", role="fixed_mask")
    assert_same_geometry(out, img)
    o = arr(out).astype(bool)
    assert out.GetPixelID() == sitk.sitkUInt8 and o.any()
    # Every voxel of the result is physically inside the original box (within one mask voxel).
    ks, js, is_ = np.nonzero(o)
    x_mm, y_mm = is_ * 1.0, js * 1.0
    assert x_mm.min() >= 13 - 1 and x_mm.max() <= 31 + 1
    assert y_mm.min() >= 10 - 1 and y_mm.max() <= 28 + 1
    # Same via prepare_mask; the warning is still emitted.
    with pytest.warns(UserWarning):
        prepared = masks.prepare_mask(img, m)
    np.testing.assert_array_equal(arr(prepared), o)


def test_resample_oblique_label_map_is_binary_on_image_grid(oblique_mask: sitk.Image, shared_data) -> None:
    img = sitk.ReadImage(str(shared_data(*OBLIQUE)))
    lab = sitk.Cast(oblique_mask, sitk.sitkUInt16) * 7  # values {0, 7}
    # Axis-aligned 3 mm grid covering the oblique image.
    ref = sitk.Image([85, 95, 85], sitk.sitkFloat32)
    ref.SetSpacing((3.0, 3.0, 3.0))
    ref.SetOrigin((-125.0, -140.0, -120.0))
    with pytest.warns(UserWarning, match="direction"):
        out = masks.resample_to_grid(lab, ref)
    assert set(np.unique(arr(out))) == {0, 1}
    assert_same_geometry(out, ref)
    # Volumes agree (physical mm³) within 10 %.
    v_src = arr(oblique_mask).sum() * np.prod(img.GetSpacing())
    v_out = arr(out).sum() * 27.0
    assert abs(v_out - v_src) / v_src < 0.1


def test_non_overlapping_mask_raises(make_image) -> None:
    img = make_image(np.zeros((10, 20, 20), np.float32))
    m = make_image(np.ones((10, 20, 20), np.uint8), origin=(500.0, 0.0, 0.0))
    with pytest.warns(UserWarning):
        with pytest.raises(MaskError, match="mask outside the image") as info:
            masks.resample_to_grid(m, img, subject="s3", role="fixed_mask")
    assert "s3" in str(info.value) and "fixed_mask" in str(info.value)


# ----------------------------------------------------------------------------------------------- binarise


def test_binarise_float_mask(make_image) -> None:
    a = np.array([[0.0, 0.2, 0.7], [1.0, 0.5, 0.0]], np.float32)
    m = make_image(a, spacing=(0.5, 2.0), origin=(1.0, 2.0))
    with pytest.raises(MaskError, match="threshold") as info:
        masks.binarise(m, subject="s4", role="moving_mask")
    assert "s4" in str(info.value) and "non-integer" in str(info.value)
    out = masks.binarise(m, threshold=0.5)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(out, m)
    np.testing.assert_array_equal(arr(out), [[0, 0, 1], [1, 0, 0]])
    # A float mask holding integers only is accepted; nonzero → 1 (labels {0, 2, 5}).
    ints = make_image(np.array([[0.0, 2.0], [5.0, 0.0]], np.float64))
    np.testing.assert_array_equal(arr(masks.binarise(ints)), [[0, 1], [1, 0]])
    # Through prepare_mask too.
    with pytest.raises(MaskError, match="threshold"):
        masks.prepare_mask(make_image(np.zeros((2, 3), np.float32)), m)
    np.testing.assert_array_equal(
        arr(
            masks.prepare_mask(
                make_image(np.zeros((2, 3), np.float32), spacing=(0.5, 2.0), origin=(1.0, 2.0)), m, threshold=0.1
            )
        ),
        [[0, 1, 1], [1, 1, 0]],
    )


# ----------------------------------------------------------------------------------- components and holes


def test_keep_largest_component(make_image) -> None:
    a = np.zeros((20, 20), np.uint8)
    a[2:5, 2:5] = 1  # 9 voxels
    a[10:16, 10:15] = 3  # 30 voxels (label value 3: nonzero counts)
    a[0, 19] = 1
    a[16, 15] = 1  # diagonal neighbour only: not face-connected
    out = masks.keep_largest_component(make_image(a, spacing=(2.0, 0.5)))
    expected = np.zeros_like(a)
    expected[10:16, 10:15] = 1
    np.testing.assert_array_equal(arr(out), expected)
    assert out.GetSpacing() == (2.0, 0.5)


def test_fill_holes(make_image) -> None:
    a = np.zeros((5, 12, 12), np.uint8)
    a[1:4, 2:9, 2:9] = 1
    a[2, 4:6, 4:6] = 0  # enclosed 3D cavity
    a[1:4, 5, 7:12] = 0  # a slot open to the background at x = 9: not a hole
    m = make_image(a)
    out = arr(masks.fill_holes(m))
    assert out[2, 4:6, 4:6].all(), "enclosed cavity must be filled"
    assert not out[1:4, 5, 7:9].any(), "a channel open to the outside is not a hole"
    assert np.all(out[a != 0] == 1)
    assert out.sum() == a.sum() + 4


# ----------------------------------------------------------------------------------------- prepare_mask


def test_prepare_mask_dilation_grows_and_keeps(lesion_crop: sitk.Image) -> None:
    img = sitk.Cast(lesion_crop, sitk.sitkFloat32)
    plain = arr(masks.prepare_mask(img, lesion_crop)).astype(bool)
    grown_img = masks.prepare_mask(img, lesion_crop, dilate_mm=3.0, subject="s5", role="fixed_mask")
    grown = arr(grown_img).astype(bool)
    assert_same_geometry(grown_img, img)
    assert grown_img.GetPixelID() == sitk.sitkUInt8
    assert grown.sum() > plain.sum()
    assert np.all(grown[plain])
    np.testing.assert_array_equal(plain, arr(lesion_crop) != 0)
    # dilate then erode by the same radius (a closing) keeps every voxel and stays within the dilation.
    closed = arr(masks.prepare_mask(img, lesion_crop, dilate_mm=3.0, erode_mm=3.0)).astype(bool)
    assert np.all(closed[plain]) and not np.any(closed & ~grown)


def test_prepare_mask_sources_and_errors(shared_data, make_image) -> None:
    img = sitk.ReadImage(str(shared_data(*BRAIN2D)))
    ones = masks.prepare_mask(img)
    assert arr(ones).all()
    assert_same_geometry(ones, img)
    auto = masks.prepare_mask(img, missing="auto")
    np.testing.assert_array_equal(arr(auto), arr(masks.auto_mask(img)))
    with pytest.raises(MaskError, match="unknown value 'none'"):
        masks.prepare_mask(img, missing="none", subject="s6")
    empty = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(img)
    with pytest.raises(MaskError, match="empty") as info:
        masks.prepare_mask(img, empty, subject="s6", role="fixed_mask")
    assert "s6" in str(info.value) and "fixed_mask" in str(info.value)
    with pytest.raises(MaskError, match="erosion by 200 mm"):
        masks.prepare_mask(img, missing="auto", erode_mm=200.0, subject="s6")
    # largest_component + fill_holes options run in the pipeline.
    a = np.zeros((30, 30), np.uint8)
    a[5:20, 5:20] = 1
    a[10:13, 10:13] = 0
    a[25:28, 25:28] = 1
    m = make_image(a)
    out = arr(
        masks.prepare_mask(make_image(np.zeros((30, 30), np.float32)), m, largest_component=True, fill_holes=True)
    )
    assert out.sum() == 15 * 15 and out[5:20, 5:20].all()


def test_check_mask_and_centroid(make_image) -> None:
    a = np.zeros((7, 9, 11), np.uint8)
    a[1:4, 2:5, 6:9] = 1  # centroid z=2, y=3, x=7
    m = make_image(a)
    assert masks.check_mask(m) is m
    assert masks.centroid_index(m) == (7, 3, 2)
    with pytest.raises(MaskError, match="at least 100"):
        masks.check_mask(m, min_voxels=100, subject="s7", role="moving_mask")
    with pytest.raises(MaskError, match="s7"):
        masks.check_mask(make_image(np.zeros((3, 3), np.uint8)), subject="s7")
