"""Bad input (issue 9): every case fails with the right exception and a message that names the subject, the
file, role or key, what is wrong and what to do. Tiny synthetic data only; the cohort/config validator is
also fed random malformed tables and configs (hypothesis) and must answer with a ConfigError, never a
traceback.

Covered elsewhere (not repeated here): a 2D mask for a 3D image and the mask-outside-image message in
test_masks.py; the overlap failure of a translation stage in test_engine.py; Snakemake refusing a bad
cohort before any job in test_config.py.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maskreg
from maskreg import io, masks
from maskreg.config import load_and_validate, load_yaml
from maskreg.engine import pick_device
from maskreg.errors import ConfigError, InputError, MaskError, MaskregError, OverlapError
from maskreg.qc.metrics import tre
from maskreg.transforms import LinearTransform
from maskreg.warp import check_labels, common_labels, warp_labels

ROOT = Path(__file__).resolve().parents[1]  # the repository: the schemas and the config are read at import
CONFIG_SCHEMA = load_yaml(ROOT / "workflow/schemas/config.schema.yaml")
COHORT_SCHEMA = load_yaml(ROOT / "workflow/schemas/cohort.schema.yaml")
BASE_CONFIG = load_yaml(ROOT / "config/config.yaml")
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


# ------------------------------------------------------------------------------------------------ helpers


def blob(shape=(24, 24), seed=0) -> np.ndarray:
    """A smooth non-constant float32 image."""
    rng = np.random.default_rng(seed)
    a = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(a, 2.0)) * 100 + 50


def write(image: sitk.Image, path: Path, compress: bool = True) -> Path:
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def says(msg: str, *parts: str) -> None:
    """Every part (subject, file/role/key, what is wrong, what to do) is in the message."""
    missing = [p for p in parts if p not in msg]
    assert not missing, f"{missing} not in message:\n{msg}"


def overlap_error(fixed, moving, fixed_mask=None, moving_mask=None, **kw) -> str:
    """The message of the OverlapError that registering these images on the CPU raises (``kw``: stages, subject,
    min_overlap_voxels, ... as ``maskreg.register`` takes them)."""
    with pytest.raises(OverlapError) as info:
        maskreg.register(fixed, moving, fixed_mask, moving_mask, device="cpu", **kw)
    return str(info.value)


def cfg_with(cohort: Path) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["cohort"] = str(cohort)
    return cfg


def cohort(tmp: Path, rows: list[list[str]], header=("subject", "fixed", "moving"), name="cohort.tsv") -> Path:
    """A cohort table whose image files (any content: validation does not read images) exist."""
    for f in ("f.nii.gz", "m.nii.gz"):
        (tmp / f).touch()
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    (tmp / name).write_text("\n".join(lines) + "\n")
    return tmp / name


def problems(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_and_validate(cfg, CONFIG_SCHEMA, COHORT_SCHEMA)
    return info.value.problems


LINEAR = [{"type": "rigid", "loss": "mse", "scales": [1], "iterations": [2]}]


# ------------------------------------------------------------------------------------ images: files


@pytest.mark.parametrize("role", ["fixed", "moving_mask", "fixed_labels"])
def test_missing_image_file(tmp_path, role):
    p = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError) as info:
        io.read_image(p, subject="sub-01", role=role)
    says(str(info.value), "subject 'sub-01'", f"{role} '{p}'", "file not found", "Check the path")


@pytest.mark.parametrize("content", [b"", b"not an image at all", bytes(range(256)) * 4])
def test_unreadable_image(tmp_path, content):
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(content)
    with pytest.raises(InputError) as info:
        io.read_image(p, subject="sub-01", role="moving")
    msg = str(info.value)
    says(msg, "subject 'sub-01'", f"moving '{p}'", "cannot be read as an image", "format SimpleITK reads")
    assert "\n" not in msg  # SimpleITK's multi-line trace is cut to one line


@pytest.mark.parametrize(
    "suffix, keep", [(".nii", 0.5), (".nii", 0.999), (".nii.gz", 0.5), (".nii.gz", 0.01), (".nrrd", 0.5)]
)
def test_truncated_image(tmp_path, suffix, keep, make_image):
    """SimpleITK reads a truncated NIfTI without complaint (filling the missing voxels): read_image does not."""
    full = write(make_image(blob((8, 20, 20))), tmp_path / f"full{suffix}", compress=suffix.endswith(".gz"))
    io.read_image(full)  # the complete file is fine
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as info:
        io.read_image(cut, subject="sub-02", role="fixed")
    msg = str(info.value)
    says(msg, "subject 'sub-02'", f"fixed '{cut}'")
    assert re.search(r"truncated|cannot be read", msg), msg
    assert "\n" not in msg


def test_4d_image(tmp_path, make_image):
    p = write(make_image(np.zeros((3, 4, 8, 8), np.float32) + np.arange(8)), tmp_path / "dwi.nii.gz")
    with pytest.raises(InputError) as info:
        io.read_image(p, subject="sub-03", role="moving")
    says(
        str(info.value),
        "subject 'sub-03'",
        f"moving '{p}'",
        "is 4D with size (8, 8, 4, 3)",
        "expected a 2D or 3D image",
        "extract the one volume",
    )
    # a 4D file with a single volume is a 3D image
    one = write(make_image(np.zeros((1, 4, 8, 8), np.float32) + np.arange(8)), tmp_path / "one.nii.gz")
    assert io.read_image(one).GetDimension() == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad, make_image):
    a = blob()
    a[3, 4] = bad
    a[5, 6] = bad
    p = write(make_image(a), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError) as info:
        io.read_image(p, subject="sub-04", role="fixed")
    says(str(info.value), "subject 'sub-04'", f"fixed '{p}'", "2 NaN or infinite voxel(s)", "replace them")


# ------------------------------------------------------------------------------------ images: pairs


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_constant_image(role, make_image):
    good, flat = make_image(blob()), make_image(np.full((24, 24), 7.0, np.float32))
    pair = (flat, good) if role == "fixed" else (good, flat)
    with pytest.raises(InputError) as info:
        maskreg.register(*pair, stages=LINEAR, device="cpu", subject="sub-05")
    says(str(info.value), f"subject 'sub-05', {role}: image is constant (7.0)", "nothing to register")
    # and an automatic mask of it says the same
    with pytest.raises(MaskError) as info:
        masks.prepare_mask(flat, missing="auto", subject="sub-05", role=f"{role}_mask")
    says(str(info.value), "subject 'sub-05'", f"{role}_mask", "constant")


@pytest.mark.parametrize("dims", [("3D", "2D"), ("2D", "3D")])
def test_2d_image_with_3d_image(dims, make_image):
    two, three = make_image(blob()), make_image(blob((6, 24, 24)))
    pair = (three, two) if dims[0] == "3D" else (two, three)
    with pytest.raises(InputError) as info:
        maskreg.register(*pair, stages=LINEAR, device="cpu", subject="sub-06")
    says(
        str(info.value),
        "subject 'sub-06'",
        f"the fixed image is {dims[0]} but the moving image is {dims[1]}",
        "same dimension",
    )


def test_no_physical_overlap_after_initialisation(make_image):
    """The images overlap as given, but the initial transform maps the fixed mask far outside the moving image:
    the one hard failure, with subject, stage, level, counts and what to check."""
    a = make_image(blob((32, 32)))
    far = LinearTransform(np.eye(2), np.array([500.0, 0.0]))
    says(
        overlap_error(a, a, stages=LINEAR, subject="sub-07", initial=far, min_overlap_voxels=50),
        "subject 'sub-07'",
        "stage rigid, level 1/1",
        "only 0 effective voxels",
        "at least 50 are needed (min_overlap_voxels)",
        "Check the initial alignment",
    )


def test_overlap_lost_during_optimisation_is_not_blamed_on_the_input(make_image):
    """Masked MSE can lower its weighted mean by sliding the fixed mask off the moving mask (here: a bright
    moving region outside the moving mask pulls the fixed mask out of it). The overlap was fine at the start,
    so the error must say that the optimisation lost it, not "check the initial alignment"."""
    n = 96
    fixed = np.full((n, n), 100, np.float32)
    fixed[:, 64] = 0  # one dark column: the fixed image's robust scale spans 0..100, as the moving one's does
    fixed_mask = np.zeros((n, n), np.uint8)
    fixed_mask[30:66, 30:66] = 1
    moving = np.zeros((n, n), np.float32)
    moving[:, :40] = 100
    moving_mask = np.zeros((n, n), np.uint8)
    moving_mask[:, 30:] = 1
    stages = [{"type": "translation", "loss": "mse", "scales": [2, 1], "iterations": [60, 30], "learning_rate": 1.0}]
    msg = overlap_error(
        make_image(fixed),
        make_image(moving),
        make_image(fixed_mask),
        make_image(moving_mask),
        stages=stages,
        subject="sub-08",
        min_overlap_voxels=700,
    )
    start = re.search(r"the overlap fell from (\d+) effective voxels", msg)
    assert start and 300 <= int(start.group(1)) <= 324  # 18 x 18 voxels at scale 2, read from jittered points
    says(
        msg,
        "subject 'sub-08'",
        "stage translation, level 1/2",
        "at least 162 are needed (half the fixed mask at this level, which is smaller than min_overlap_voxels = 700)",
        "shrinking the overlap",
        "Use cc or mi",
    )
    assert "Check the initial alignment" not in msg


def test_a_small_roi_is_not_failed_at_coarse_levels_for_being_small(make_image):
    """A 10 × 10 voxel ROI has ~6 voxels at scale 4: fewer than min_overlap_voxels (100) however well it
    overlaps. A level needs at most half its fixed mask, so the registration runs, and still aligns."""
    n = 96
    fixed = blob((n, n), seed=3)
    moving = np.roll(fixed, (2, -1), axis=(0, 1))
    roi = np.zeros((n, n), np.uint8)
    roi[40:50, 44:54] = 1
    stages = [{"type": "translation", "loss": "mse", "scales": [4, 2, 1], "iterations": [40, 40, 40]}]
    res = maskreg.register(
        make_image(fixed), make_image(moving), make_image(roi), None, stages=stages, device="cpu", subject="sub-10"
    )
    first = res.stages[0].levels[0]
    assert first.overlap_weight < 100 and first.overlap_fraction > 0.9
    np.testing.assert_allclose(res.linear.translation, [-1.0, 2.0], atol=0.3)


def test_overlap_too_small_after_a_good_level_names_that_level(make_image):
    """A level that starts with too little overlap after an earlier level ended with enough: the error names that
    level and its overlap, and blames the optimisation, not the input. Here the first stage weighs the loss by the
    fixed mask only (full overlap), and the second by both masks, which overlap in a 4 x 4 voxel corner."""
    n = 48
    image = make_image(blob((n, n), seed=4))
    fixed_mask, moving_mask = np.zeros((n, n), np.uint8), np.zeros((n, n), np.uint8)
    fixed_mask[10:30, 10:30] = 1
    moving_mask[26:46, 26:46] = 1
    stages = [
        {"type": "translation", "loss": "mse", "scales": [2, 1], "iterations": [5, 5], "masks": "fixed"},
        {"type": "rigid", "loss": "mse", "scales": [2, 1], "iterations": [5, 5]},
    ]
    msg = overlap_error(
        image,
        image,
        make_image(fixed_mask),
        make_image(moving_mask),
        stages=stages,
        subject="sub-09",
        min_overlap_voxels=50,
    )
    says(
        msg,
        "subject 'sub-09'",
        "stage rigid, level 1/2",
        "The overlap was 100.0% of the fixed mask at the end of stage translation, level 2/2",
        "shrinking the overlap",
    )
    # the corner: 16 voxels at full resolution, 4 at scale 2; 10 % at most of the fixed mask
    start = re.search(r"only (\d+) effective voxels .* \(([\d.]+)% of the fixed mask\)", msg)
    assert start and int(start.group(1)) <= 6 and float(start.group(2)) <= 10.0, msg
    assert "Check the initial alignment" not in msg


def test_device_cuda_without_cuda(make_image):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for requested in ("cuda", "cuda:0"):
        with pytest.raises(MaskregError) as info:
            pick_device(requested)
        says(str(info.value), "device 'cuda' was requested", "no usable CUDA device", "device: auto or cpu")
    with pytest.raises(MaskregError, match="no usable CUDA device"):
        maskreg.register(make_image(blob()), make_image(blob(seed=1)), stages=LINEAR, device="cuda", subject="sub-08")


# ---------------------------------------------------------------------------------------------- masks


def test_mask_all_zeros(make_image):
    image = make_image(blob())
    empty = make_image(np.zeros((24, 24), np.uint8))
    with pytest.raises(MaskError) as info:
        masks.prepare_mask(image, empty, subject="sub-09", role="fixed_mask")
    says(str(info.value), "subject 'sub-09', fixed_mask: mask is empty", "Check the mask file")


@pytest.mark.parametrize("values", [(0.0, 0.3), (0.0, np.nan)])
def test_mask_non_binary_values(values, make_image):
    a = np.zeros((24, 24), np.float32)
    a[5:15, 5:15] = 1.0
    a[6, 6] = values[1]
    with pytest.raises(MaskError) as info:
        masks.prepare_mask(make_image(blob()), make_image(a), subject="sub-10", role="moving_mask")
    msg = str(info.value)
    says(msg, "subject 'sub-10', moving_mask", "threshold")
    assert re.search(r"1 non-integer voxel value|1 NaN or infinite voxel", msg), msg
    # integer labels other than 0/1 are a binary mask (nonzero = inside), not an error
    lab = np.zeros((24, 24), np.uint8)
    lab[5:15, 5:15] = 7
    assert np.array_equal(sitk.GetArrayFromImage(masks.prepare_mask(make_image(blob()), make_image(lab))), lab > 0)


def test_mask_on_another_grid_warns_or_fails(make_image):
    image = make_image(blob((40, 40)))
    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = 1
    near = make_image(m, spacing=(2.0, 2.0), origin=(3.0, 0.0))
    with pytest.warns(UserWarning) as rec:
        out = masks.prepare_mask(image, near, subject="sub-11", role="fixed_mask")
    says(
        str(rec[0].message),
        "subject 'sub-11', fixed_mask",
        "mask grid differs",
        "spacing (2, 2) vs (1, 1)",
        "resampling the mask onto the image grid",
    )
    assert out.GetSize() == image.GetSize() and sitk.GetArrayFromImage(out).any()
    far = make_image(m, spacing=(2.0, 2.0), origin=(900.0, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MaskError) as info:
            masks.prepare_mask(image, far, subject="sub-11", role="fixed_mask")
    says(str(info.value), "subject 'sub-11', fixed_mask", "mask outside the image", "same physical space")


# --------------------------------------------------------------------------------------------- labels


def test_float_label_map(make_image):
    lab = np.zeros((24, 24), np.float32)
    lab[4:10, 4:10] = 1.5
    with pytest.raises(InputError) as info:
        check_labels(make_image(lab), subject="sub-12", role="fixed_labels", path="lab.nii.gz")
    says(
        str(info.value),
        "subject 'sub-12', fixed_labels 'lab.nii.gz'",
        "non-integer values",
        "32-bit float",
        "integer-valued",
    )
    with pytest.raises(InputError, match="subject 'sub-12', moving_labels: label map holds non-integer"):
        warp_labels(make_image(lab), make_image(blob()), sitk.Transform(2, sitk.sitkIdentity), subject="sub-12")
    # a float map holding whole numbers is a label map
    assert common_labels(make_image(np.round(lab)), make_image(np.round(lab))) == [2]


def test_label_maps_with_no_label_in_common(make_image):
    a = np.zeros((24, 24), np.uint8)
    a[2:8, 2:8], a[10:20, 10:20] = 1, 2
    b = np.zeros((24, 24), np.uint8)
    b[2:8, 2:8], b[10:20, 10:20] = 11, 12
    with pytest.raises(InputError) as info:
        common_labels(
            make_image(a), make_image(b), subject="sub-13", fixed_path="f_lab.nii.gz", moving_path="m_lab.nii.gz"
        )
    says(
        str(info.value),
        "subject 'sub-13'",
        "fixed_labels 'f_lab.nii.gz'",
        "moving_labels 'm_lab.nii.gz'",
        "no label in common",
        "fixed has {1, 2}, moving has {11, 12}",
        "same label numbering",
    )
    with pytest.raises(InputError, match=r"fixed has \{1, 2\}, moving has none"):
        common_labels(make_image(a), make_image(np.zeros_like(b)), subject="sub-13")
    b[10:20, 10:20] = 2
    assert common_labels(make_image(a), make_image(b)) == [2]


# ------------------------------------------------------------------------------------------ landmarks


@pytest.mark.parametrize(
    "text, what",
    [
        ("x,y\n1,2\n3,4\n", "lacks column(s) z"),
        ("a;b;c\n1;2;3\n", "lacks column(s) x, y, z"),
        ("x,y,z\n1,2,three\n", "non-numeric coordinates"),
        ("x,y,z\n", "no landmarks"),
        ("x,y,z\n1,2,\n", "empty/non-finite coordinates"),
        ("", "is not a readable CSV"),
        ('x,y,z\n"1,2,3\n', "is not a readable CSV"),
    ],
)
def test_landmark_csv_malformed(tmp_path, text, what):
    p = tmp_path / "fixed.csv"
    p.write_text(text)
    with pytest.raises(InputError) as info:
        io.read_landmarks(p, 3, subject="sub-14", role="fixed_landmarks")
    says(str(info.value), f"subject 'sub-14', fixed_landmarks '{p}'", what)
    assert "Traceback" not in str(info.value)


def test_landmark_files_with_different_row_counts(tmp_path):
    fa, fb = tmp_path / "f.csv", tmp_path / "m.csv"
    io.write_landmarks(np.zeros((3, 3)), fa)
    io.write_landmarks(np.ones((4, 3)), fb)
    with pytest.raises(InputError) as info:
        io.read_landmark_pair(fa, fb, 3, subject="sub-15")
    says(
        str(info.value),
        "subject 'sub-15'",
        f"fixed_landmarks '{fa}' has 3 row(s)",
        f"moving_landmarks '{fb}' has 4",
        "same points in the same order",
    )
    # the QC's metric says the same when given the arrays (and stays a ValueError for old callers)
    with pytest.raises(InputError) as info:
        tre(np.zeros((3, 3)), np.ones((4, 3)), subject="sub-15", names=(str(fa), str(fb)))
    assert isinstance(info.value, ValueError)
    says(str(info.value), "subject 'sub-15'", f"{fa} has 3 landmark row(s) but {fb} has 4")
    # and the cohort validation reports it before any job runs
    t = cohort(
        tmp_path,
        [["s1", "f.nii.gz", "m.nii.gz", "f.csv", "m.csv"]],
        header=("subject", "fixed", "moving", "fixed_landmarks", "moving_landmarks"),
    )
    (p,) = problems(cfg_with(t))
    says(p, "row 1 (subject 's1')", "fixed_landmarks has 3 row(s) but moving_landmarks has 4")


# ----------------------------------------------------------------------------------- cohort table


def test_duplicate_subject_ids(tmp_path):
    t = cohort(
        tmp_path,
        [
            ["s1", "f.nii.gz", "m.nii.gz"],
            ["s2", "f.nii.gz", "m.nii.gz"],
            ["s1", "f.nii.gz", "m.nii.gz"],
            ["s1 ", "f.nii.gz", "m.nii.gz"],
        ],
    )
    assert problems(cfg_with(t)) == [
        f"cohort table {t}: row 3 (subject 's1'), column 'subject': duplicate of row 1",
        f"cohort table {t}: row 4 (subject 's1'), column 'subject': duplicate of row 1",
    ]


@pytest.mark.parametrize("sid", ["a/b", "..", ".", "../x", "/abs", "a b", "a\\b", "sub\u00e9", "s1;rm"])
def test_unsafe_subject_id_is_refused(tmp_path, sid):
    """results/{subject} must stay inside results/: separators, '..', spaces and other characters are
    refused by the validator, so no job (and no file) is ever made for such a row."""
    t = cohort(tmp_path, [["ok", "f.nii.gz", "m.nii.gz"], [sid, "f.nii.gz", "m.nii.gz"]])
    (p,) = problems(cfg_with(t))
    says(
        p,
        f"cohort table {t}: row 2 (subject '{sid}'), column 'subject'",
        "not a safe id",
        "no spaces, path separators or '..'",
    )
    assert not (tmp_path / "results").exists()


def test_empty_subject_id(tmp_path):
    t = cohort(tmp_path, [["", "f.nii.gz", "m.nii.gz"], ["  ", "f.nii.gz", "m.nii.gz"]])
    assert problems(cfg_with(t)) == [
        f"cohort table {t}: row {i}, column 'subject': empty; a value is required" for i in (1, 2)
    ]


def test_spaces_around_cells_are_not_kept(tmp_path):
    """What is validated is what is used: ' s1 ' is the subject 's1' and ' f.nii.gz' the file f.nii.gz."""
    t = cohort(tmp_path, [[" s1 ", " f.nii.gz", "m.nii.gz "]], header=(" subject", "fixed ", "moving"))
    table = load_and_validate(cfg_with(t), CONFIG_SCHEMA, COHORT_SCHEMA)
    assert list(table.index) == ["s1"]
    assert table.loc["s1", "fixed"] == str((tmp_path / "f.nii.gz").resolve())


# ------------------------------------------------------------------------------------------- config


def _stage(cfg, i):
    return cfg["registration"]["stages"][i]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(colour="blue"), "config (top level): unknown key(s) ('colour' was unexpected)"),
        (
            lambda c: _stage(c, 1).update(lerning_rate=0.1),
            "config registration.stages.1 (rigid): unknown key 'lerning_rate'; did you mean 'learning_rate'?",
        ),
        (
            lambda c: c["registration"].update(min_overlap_voxels="100"),
            "config registration.min_overlap_voxels: '100' is not of type 'integer'",
        ),
        (
            lambda c: _stage(c, 1).update(scales="4,2,1"),
            "config registration.stages.1 (rigid): scales '4,2,1' must be a non-empty list of positive integers",
        ),
        (lambda c: c.update(registration=[1, 2]), "config registration: [1, 2] is not of type 'object'"),
        (lambda c: c["masks"].update(fixed="auto"), "config masks.fixed: 'auto' is not of type 'object'"),
        (
            lambda c: _stage(c, 1).update(smoothing_sigmas=[2, -1]),
            "config registration.stages.1 (rigid): smoothing_sigmas [2, -1] must be a list of numbers >= 0",
        ),
        (
            lambda c: _stage(c, 3).update(fluid_sigma=-0.5),
            "config registration.stages.3 (syn): fluid_sigma -0.5 must be a number >= 0",
        ),
        (
            lambda c: _stage(c, 3).update(elastic_sigma=-1),
            "config registration.stages.3 (syn): elastic_sigma -1 must be a number >= 0",
        ),
        (
            lambda c: _stage(c, 2).update(scales=[2, 4, 1]),
            "config registration.stages.2 (affine): scales [2, 4, 1] must not increase "
            "(coarse to fine, e.g. [4, 2, 1])",
        ),
        (
            lambda c: _stage(c, 1).update(iterations=[10, 10, 10]),
            "config registration.stages.1 (rigid): scales [4, 2] and iterations [10, 10, 10] must have the same length",
        ),
        (lambda c: c.pop("cohort"), "config cohort: missing; set cohort: to the path of the cohort table"),
        (lambda c: c.update(device="gpu"), "config device: 'gpu' does not match"),
    ],
)
def test_bad_config_key(mutate, expected, repo):
    cfg = cfg_with(repo / "config/cohort.tsv")
    mutate(cfg)
    ps = problems(cfg)
    assert any(p.startswith(expected) for p in ps), ps


def test_config_and_cohort_problems_reported_together(tmp_path):
    t = cohort(tmp_path, [["a/b", "f.nii.gz", "gone.nii.gz"], ["", "f.nii.gz", "m.nii.gz"]])
    cfg = cfg_with(t)
    _stage(cfg, 1).update(smoothing_sigmas=[-1, 0])
    cfg["seed"] = -3
    with pytest.raises(ConfigError) as info:
        load_and_validate(cfg, CONFIG_SCHEMA, COHORT_SCHEMA)
    msg = str(info.value)
    assert msg.startswith("5 problem(s) in the configuration and cohort:")
    says(
        msg,
        "config registration.stages.1 (rigid): smoothing_sigmas [-1, 0] must be a list of numbers >= 0",
        "config seed: -3",
        "row 1 (subject 'a/b'), column 'subject'",
        "row 1 (subject 'a/b'), column 'moving': file not found: gone.nii.gz",
        "row 2, column 'subject': empty",
    )
    with pytest.raises(ConfigError, match="expected a mapping of keys"):
        load_and_validate(["not", "a", "mapping"], CONFIG_SCHEMA, COHORT_SCHEMA)


# ------------------------------------------------------------------------- property-based: validator

COLUMNS = [
    "subject",
    "fixed",
    "moving",
    "fixed_mask",
    "moving_mask",
    "fixed_labels",
    "moving_labels",
    "fixed_landmarks",
    "moving_landmarks",
    "fixed_mask_kind",
    "moving_mask_dilate_mm",
    "fixed_mask_largest_component",
    "site",
]
CELLS = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "s1",
            "s2",
            "s1",
            "sub-01",
            "a/b",
            "..",
            ".",
            "a b",
            "../x",
            "/etc/passwd",
            "f.nii.gz",
            "m.nii.gz",
            "lm3.csv",
            "lm4.csv",
            "bad.csv",
            "missing.nii.gz",
            "roi",
            "valid",
            "maybe",
            "2.5",
            "-1",
            "true",
            "NULL",
            "NaN",
            "nan",
            "None",
            "\u00e9\u00e8",
            "\U0001f600",
            '"',
            "'",
            "x" * 300,
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
)
GOOD = {
    "subject": st.sampled_from(["s", "sub-0", "a.b_c"]),
    "fixed": st.just("f.nii.gz"),
    "moving": st.just("m.nii.gz"),
    "fixed_mask": st.sampled_from(["", "f.nii.gz"]),
    "moving_mask": st.sampled_from(["", "m.nii.gz"]),
    "fixed_labels": st.sampled_from(["", "f.nii.gz"]),
    "moving_labels": st.sampled_from(["", "m.nii.gz"]),
    "fixed_landmarks": st.just("lm3.csv"),
    "moving_landmarks": st.just("lm3.csv"),
    "fixed_mask_kind": st.sampled_from(["", "roi"]),
    "moving_mask_dilate_mm": st.sampled_from(["", "1.5"]),
    "fixed_mask_largest_component": st.sampled_from(["", "yes"]),
    "site": CELLS,
}


@st.composite
def near_valid_tables(draw):
    """The required columns and some optional ones, each cell a good value or (sometimes) a bad one."""
    extra = draw(st.lists(st.sampled_from(COLUMNS[3:]), unique=True, max_size=4))
    if "fixed_landmarks" in extra or "moving_landmarks" in extra:
        extra = [c for c in extra if not c.endswith("_landmarks")] + ["fixed_landmarks", "moving_landmarks"]
    columns = ["subject", "fixed", "moving"] + extra
    rows = []
    for i in range(draw(st.integers(1, 3))):
        good = [draw(GOOD[c]) + (str(i) if c == "subject" else "") for c in columns]
        rows.append([draw(st.one_of(st.just(g), CELLS)) if draw(st.integers(0, 9)) == 0 else g for g in good])
    return columns, rows, draw(st.sampled_from(["tsv", "csv"]))


# a table: columns (possibly missing, repeated, unknown) and rows of cells (separators in cells make it
# malformed), or one close to valid
TABLES = st.one_of(
    st.tuples(
        st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=7),
        st.lists(st.lists(CELLS, min_size=0, max_size=8), min_size=0, max_size=4),
        st.sampled_from(["tsv", "csv"]),
    ),
    near_valid_tables(),
)


def _key_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _key_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _key_paths(v, prefix + (i,))


PATHS = [p for p in _key_paths(BASE_CONFIG) if p and p != ("cohort",)]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 8), max_size=5),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["set", "delete", "unknown", "truncate"]), st.sampled_from(PATHS), JUNK), max_size=3
)


def _mutate(cfg: dict, ops) -> dict:
    cfg = copy.deepcopy(cfg)
    for op, path, value in ops:
        parent = cfg
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            if op == "set":
                parent[key] = value
            elif op == "delete":
                del parent[key]
            elif op == "unknown" and isinstance(parent[key], dict):
                parent[key]["no_such_key"] = value
            elif op == "truncate" and isinstance(parent[key], list):
                parent[key] = parent[key][:-1]
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation changed the shape: skip
    return cfg


def _setup(folder: Path) -> None:
    for f in ("f.nii.gz", "m.nii.gz"):
        (folder / f).touch()
    io.write_landmarks(np.zeros((3, 3)), folder / "lm3.csv")
    io.write_landmarks(np.zeros((4, 3)), folder / "lm4.csv")
    (folder / "bad.csv").write_text("u,v\n1,2\n")


ROW_OR_KEY = re.compile(
    r"^(config (\(top level\)|[\w.]+)( \([^)]*\))?: .+"
    r"|config: expected a mapping.*"
    r"|cohort table .+?: (row \d+.*|column '[^']*' is missing.*|no subjects|cannot be read .*))$",
    re.S,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=TABLES, ops=MUTATIONS)
def test_validator_never_tracebacks(table, ops):
    columns, rows, kind = table
    sep = "\t" if kind == "tsv" else ","
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _setup(folder)
        path = folder / f"cohort.{kind}"
        path.write_text("\n".join([sep.join(columns)] + [sep.join(r) for r in rows]) + "\n", encoding="utf-8")
        cfg = _mutate(BASE_CONFIG, ops)
        cfg["cohort"] = str(path)
        try:
            out = load_and_validate(cfg, CONFIG_SCHEMA, COHORT_SCHEMA)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            for p in exc.problems:
                assert ROW_OR_KEY.match(p) and "\n" not in p, p
            return
        # accepted: only a valid table gets through
        assert len(out) >= 1
        assert out.index.is_unique
        for sid in out.index:
            assert SAFE_ID.match(sid) and sid not in (".", ".."), sid
            assert (Path("results") / sid).resolve().parent == Path("results").resolve()
        for col in ("fixed", "moving"):
            assert all(Path(p).is_file() for p in out[col])
