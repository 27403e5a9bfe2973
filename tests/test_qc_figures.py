"""Tests of maskreg.qc.figures: the PNGs exist, are readable, not blank, and the views are the right ones."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from matplotlib.colors import to_rgb

from maskreg.qc import figures as F
from maskreg.qc.metrics import jacobian_determinant

DATA = Path("/work/shared/data")
BRAIN_FIXED = DATA / "antspy_brain2d/r16/image.nii.gz"
BRAIN_MOVING = DATA / "antspy_brain2d/r64/image.nii.gz"
CT_IMAGE = DATA / "totalseg_ct/ct_a/image.nii.gz"
CT_LABELS = DATA / "totalseg_ct/ct_a/labels.nii.gz"

needs_data = pytest.mark.skipif(
    not (BRAIN_FIXED.exists() and CT_IMAGE.exists()), reason="shared test data not available"
)


def _read_png(path: Path) -> np.ndarray:
    assert path.exists()
    assert path.stat().st_size < 400_000
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img[..., :3]


def _assert_not_blank(img: np.ndarray, min_var: float = 0.01) -> None:
    grey = img.mean(axis=-1)
    assert grey.var() > min_var


def _count_colour(img: np.ndarray, colour: str, tol: float = 0.12) -> int:
    return int(np.count_nonzero(np.all(np.abs(img - np.asarray(to_rgb(colour))) < tol, axis=-1)))


# ------------------------------------------------------------------------------------------ slice choice


def test_slice_indices_off_centre_mask():
    arr = np.zeros((10, 40, 50), np.uint8)  # z, y, x
    arr[2:5, 20:29, 5:10] = 1  # z 2..4, y 20..28, x 5..9
    mask = sitk.GetImageFromArray(arr)
    assert F.slice_indices(mask) == (7, 24, 3)


def test_slice_indices_moves_off_empty_centroid_slice():
    arr = np.zeros((6, 12, 30), np.uint8)
    arr[2:4, 3:9, 0:3] = 1  # x 0..2 (3 voxels)
    arr[2:4, 3:9, 18:23] = 1  # x 18..22 (5 voxels): centroid x = 12.875 -> 13, empty slice
    mask = sitk.GetImageFromArray(arr)
    cx, cy, cz = F.slice_indices(mask)
    assert cx == 18  # nearest occupied slice
    assert (cy, cz) == (6, 2) or (cy, cz) == (6, 3)
    assert arr[:, :, cx].any()


def test_slice_indices_empty_or_none():
    assert F.slice_indices(sitk.Image([8, 6, 4], sitk.sitkUInt8)) == (4, 3, 2)
    assert F.slice_indices(None, (10, 20)) == (5, 10)


def test_view_slices_go_through_centre_with_display_orientation():
    # LPS direction diag(-1, -1, 1) (a RAS-stored NIfTI): display flips x and y to radiological view
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # z, y, x
    img = sitk.GetImageFromArray(arr)
    img.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])
    img.SetSpacing([1.0, 2.0, 3.0])
    cx, cy, cz = 2, 4, 1
    views = dict(F.view_slices(img, (cx, cy, cz)))
    np.testing.assert_array_equal(views["axial"], arr[cz, ::-1, ::-1])  # anterior up, right on left
    np.testing.assert_array_equal(views["coronal"], arr[::-1, cy, ::-1])  # superior up
    np.testing.assert_array_equal(views["sagittal"], arr[::-1, ::-1, cx])  # superior up, anterior left
    # identity direction: only the superior-up flip for coronal and sagittal
    img.SetDirection([1, 0, 0, 0, 1, 0, 0, 0, 1])
    views = dict(F.view_slices(img, (cx, cy, cz)))
    np.testing.assert_array_equal(views["axial"], arr[cz])
    np.testing.assert_array_equal(views["coronal"], arr[::-1, cy, :])
    np.testing.assert_array_equal(views["sagittal"], arr[::-1, :, cx])


# ------------------------------------------------------------------------------------------ image figures


def _threshold_mask(img: sitk.Image, lo: float) -> sitk.Image:
    return sitk.BinaryFillhole(sitk.BinaryThreshold(img, lo, 1e9, 1, 0))


@needs_data
def test_registration_overlay_2d(tmp_path):
    fixed = sitk.ReadImage(str(BRAIN_FIXED), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(BRAIN_MOVING), sitk.sitkFloat32)
    warped = sitk.Resample(moving, fixed, sitk.TranslationTransform(2, (3.0, -2.0)), sitk.sitkLinear, 0.0)
    yy, xx = np.mgrid[:256, :256].astype(float)
    u = np.zeros((256, 256, 2))
    u[..., 0] = -3.0 * (xx - 128) * np.exp(-((xx - 128) ** 2 + (yy - 128) ** 2) / (2 * 8.0**2))
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(fixed)
    out = F.registration_overlay(
        fixed,
        moving,
        warped,
        tmp_path / "qc" / "overlay.png",
        fixed_mask=_threshold_mask(fixed, 20),
        warped_mask=_threshold_mask(warped, 20),
        jacobian=jacobian_determinant(field),
        title="sub-01 (2D)",
    )
    assert out == tmp_path / "qc" / "overlay.png"
    img = _read_png(out)
    _assert_not_blank(img)
    assert _count_colour(img, F.C_EDGE_BEFORE) > 200  # moving edges drawn
    assert _count_colour(img, F.C_EDGE_AFTER) > 200  # warped edges drawn
    assert _count_colour(img, F.C_FOLD) > 20  # folding highlighted
    assert not list((tmp_path / "qc").glob(".*"))  # no temporary files left behind


@needs_data
def test_registration_overlay_3d_and_mask_overview(tmp_path):
    ct = sitk.ReadImage(str(CT_IMAGE), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(CT_LABELS))
    shift = sitk.TranslationTransform(3, (6.0, -4.0, 3.0))
    moved = sitk.Resample(ct, ct, shift, sitk.sitkLinear, -1024.0)
    moved_labels = sitk.Resample(labels, labels, shift, sitk.sitkNearestNeighbor, 0)
    mask = _threshold_mask(ct, -500)
    out = F.registration_overlay(
        ct,
        moved,
        ct,
        tmp_path / "overlay3d.png",
        fixed_mask=mask,
        warped_mask=mask,
        fixed_labels=labels,
        warped_labels=moved_labels,
        title="sub-02 CT",
    )
    img = _read_png(out)
    _assert_not_blank(img)
    assert _count_colour(img, F.C_EDGE_BEFORE) > 200
    assert _count_colour(img, F.C_FIXED_LABEL) > 200

    out2 = F.mask_overview(ct, mask, moved, _threshold_mask(moved, -500), tmp_path / "masks.png", title="sub-02 masks")
    img2 = _read_png(out2)
    _assert_not_blank(img2)
    assert _count_colour(img2, F.C_FIXED_MASK) > 100
    assert _count_colour(img2, F.C_MOVING_MASK) > 100


@needs_data
def test_registration_overlay_default_centre_is_mask_centroid(tmp_path):
    ct = sitk.ReadImage(str(CT_IMAGE), sitk.sitkFloat32)
    arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    arr[20:25, 10:29, 80:99] = 1  # off-centre: x 80..98, y 10..28, z 20..24
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(ct)
    assert F.slice_indices(mask) == (89, 19, 22)  # the mask's centroid, not the image centre (61, 50, 15)

    def render(name: str, **kw) -> np.ndarray:
        return mpimg.imread(str(F.registration_overlay(ct, ct, ct, tmp_path / name, fixed_mask=mask, **kw)))

    default, at_mask, at_image = (
        render("o.png"),
        render("m.png", center=(89, 19, 22)),
        render("i.png", center=(61, 50, 15)),
    )
    np.testing.assert_array_equal(default, at_mask)  # the default views go through the mask's centroid
    assert default.shape != at_image.shape or not np.array_equal(default, at_image)


@needs_data
def test_mask_overview_2d(tmp_path):
    fixed = sitk.ReadImage(str(BRAIN_FIXED), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(BRAIN_MOVING), sitk.sitkFloat32)
    out = F.mask_overview(fixed, _threshold_mask(fixed, 20), moving, None, tmp_path / "m.png", title="x")
    img = _read_png(out)
    _assert_not_blank(img)
    assert _count_colour(img, F.C_FIXED_MASK) > 100


# ------------------------------------------------------------------------------------------ cohort figures


def _metrics(n: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "subject": [f"sub-{i:02d}" for i in range(n)],
            "status": ["ok"] * n,
            "seconds": rng.uniform(10, 60, n),
            "ncc_before": rng.uniform(0.3, 0.6, n),
            "ncc_after": rng.uniform(0.7, 0.9, n),
            "dice_before": np.nan,
            "dice_after": np.nan,
            "tre_before_mm": rng.uniform(5, 10, n),
            "tre_after_mm": rng.uniform(1, 3, n),
            "error": "",
        }
    )
    return df


def test_cohort_summary_with_failure_and_nan_dice(tmp_path):
    df = _metrics()
    df.loc[1, ["status", "error"]] = ["failed", "OverlapError: only 12 voxels overlap"]
    df.loc[1, ["seconds", "ncc_before", "ncc_after", "tre_before_mm", "tre_after_mm"]] = np.nan
    img = _read_png(F.cohort_summary(df, tmp_path / "cohort.png"))
    _assert_not_blank(img, min_var=0.001)
    assert _count_colour(img, F.C_FAILED, tol=0.08) > 50  # the failure is marked in red


def test_cohort_summary_all_failed_and_single(tmp_path):
    df = _metrics(3)
    df["status"] = "failed"
    df[["seconds", "ncc_before", "ncc_after", "tre_before_mm", "tre_after_mm"]] = np.nan
    img = _read_png(F.cohort_summary(df, tmp_path / "all_failed.png"))
    assert _count_colour(img, F.C_FAILED, tol=0.08) > 50
    ok = _read_png(F.cohort_summary(_metrics(1), tmp_path / "single.png"))
    _assert_not_blank(ok, min_var=0.001)
    assert _count_colour(ok, F.C_FAILED, tol=0.08) == 0  # nothing red when nothing failed


def test_cohort_summary_marks_flagged_subjects(tmp_path):
    df = _metrics()
    df["flags"] = ["", "ncc_worse;folding", np.nan, ""]
    df.loc[3, ["status", "error"]] = ["failed", "OverlapError: only 12 voxels overlap"]
    df.loc[3, "flags"] = "folding"  # a failed subject is never drawn as flagged
    img = _read_png(F.cohort_summary(df, tmp_path / "flagged.png"))
    assert _count_colour(img, F.C_FLAGGED, tol=0.08) > 50  # amber triangles and tick label
    assert _count_colour(img, F.C_FAILED, tol=0.08) > 50
    df["flags"] = ""
    plain = _read_png(F.cohort_summary(df, tmp_path / "plain.png"))
    assert _count_colour(plain, F.C_FLAGGED, tol=0.08) == 0  # nothing amber when nothing is flagged


def test_cohort_summary_missing_columns(tmp_path):
    df = pd.DataFrame({"subject": ["a", "b"], "status": ["ok", "failed"]})
    assert (tmp_path / "c.png") == F.cohort_summary(df, tmp_path / "c.png")
    _read_png(tmp_path / "c.png")


def test_failure_table(tmp_path):
    df = _metrics()
    out = F.failure_table(df, tmp_path / "none.png")
    none = mpimg.imread(str(out))[..., :3]
    assert none.shape[0] > 50 and none.mean(axis=-1).var() > 1e-4  # the "no failures" text is there
    assert _count_colour(none, F.C_FAILED, tol=0.08) == 0
    df.loc[2, ["status", "error"]] = ["failed", "InputError: subject 'sub-02', moving 'x.nii.gz': file not found."]
    df.loc[3, ["status", "error"]] = ["failed", np.nan]
    img = _read_png(F.failure_table(df, tmp_path / "failures.png"))
    _assert_not_blank(img, min_var=0.001)
    assert _count_colour(img, F.C_FAILED, tol=0.08) > 20


@pytest.mark.parametrize(
    "direction",
    [
        [-1, 0, 0, 0, -1, 0, 0, 0, 1],
        [0, 0, 1, 1, 0, 0, 0, -1, 0],  # permuted axes (e.g. a sagittal acquisition), one flip
        [0.98, -0.17, 0.0, 0.17, 0.98, 0.0, 0.0, 0.0, 1.0],  # slightly oblique
        [0.6, -0.8, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0],  # strongly oblique, still a permutation
        [0.5**0.5, -(0.5**0.5), 0.0, 0.5**0.5, 0.5**0.5, 0.0, 0.0, 0.0, 1.0],  # 45 deg: DICOMOrient path
    ],
)
def test_view_slices_match_dicom_orient(direction):
    rng = np.random.default_rng(2)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([1.0, 2.0, 3.0])
    img.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    centre = (2, 4, 1)
    oriented = sitk.DICOMOrient(img, "LPS")
    ref = sitk.GetArrayFromImage(oriented)
    k = oriented.TransformPhysicalPointToIndex(img.TransformIndexToPhysicalPoint(centre))
    views = dict(F.view_slices(img, centre))
    np.testing.assert_array_equal(views["axial"], ref[k[2]])
    np.testing.assert_array_equal(views["coronal"], ref[::-1, k[1], :])
    np.testing.assert_array_equal(views["sagittal"], ref[::-1, :, k[0]])
