"""QC flags (maskreg.qc.flags, the ``flags`` column): each flag fires on a real bad case built from the demo
images and stays quiet on a real good registration; thresholds come from config ``qc.flags``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from maskreg.io import write_table
from maskreg.qc import evaluate
from maskreg.qc import flags as F
from maskreg.transforms import LinearTransform, chain
from maskreg.warp import warp_image, warp_labels, warp_mask


def _brain(demo, name: str = "r64") -> sitk.Image:
    """A slice of the demo's 2D brain scans (r64: the fixed one of these tests, r16: the moving one)."""
    return sitk.ReadImage(str(demo / "antspy_brain2d" / f"{name}.nii.gz"), sitk.sitkFloat32)


def _ones(img: sitk.Image) -> sitk.Image:
    out = sitk.Image(img.GetSize(), sitk.sitkUInt8) + 1
    out.CopyInformation(img)
    return out


def _box(img: sitk.Image, lo: tuple[int, int], hi: tuple[int, int]) -> np.ndarray:
    """A box mask array on ``img``'s grid: x from lo[0] to hi[0], y from lo[1] to hi[1] (end excluded)."""
    arr = np.zeros(img.GetSize()[::-1], np.uint8)
    arr[lo[1] : hi[1], lo[0] : hi[0]] = 1
    return arr


def _metrics(
    fixed,
    moving,
    transform,
    *,
    fixed_mask=None,
    moving_mask=None,
    field=None,
    linear=None,
    report=None,
    thresholds=None,
    **kw,
):
    fixed_mask = _ones(fixed) if fixed_mask is None else fixed_mask
    moving_mask = _ones(moving) if moving_mask is None else moving_mask
    warped, warped_mask = warp_image(moving, fixed, transform), warp_mask(moving_mask, fixed, transform)
    matrix = np.eye(fixed.GetDimension()) if linear is None else linear
    row, _, _ = evaluate.subject_metrics(
        "s",
        fixed,
        moving,
        fixed_mask,
        moving_mask,
        warped,
        warped_mask,
        transform,
        matrix,
        report or {"overlap_fraction": 1.0},
        field=field,
        flag_thresholds=thresholds,
        **kw,
    )
    return row


# ------------------------------------------------------------------------------------------- defaults


def test_defaults_are_the_schema_and_config_defaults(repo):
    schema = yaml.safe_load((repo / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["qc"]["properties"]["flags"]["properties"]
    assert {k: v["default"] for k, v in props.items()} == F.DEFAULTS
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    assert cfg["qc"]["flags"] == F.DEFAULTS
    assert F.thresholds({"folding": None, "low_overlap": 0.8}) == {**F.DEFAULTS, "folding": None, "low_overlap": 0.8}
    with pytest.raises(ValueError, match="unknown flag 'fold'"):
        F.thresholds({"fold": 0.1})


def test_config_checks_the_thresholds(repo):
    from maskreg.config import load_and_validate, load_yaml
    from maskreg.errors import ConfigError

    cfg = load_yaml(repo / "config/config.yaml")
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    cfg["qc"]["flags"].update(fold=0.1, low_overlap=2, folding=None)
    with pytest.raises(ConfigError) as info:
        load_and_validate(
            cfg,
            load_yaml(repo / "workflow/schemas/config.schema.yaml"),
            load_yaml(repo / "workflow/schemas/cohort.schema.yaml"),
        )
    text = str(info.value)
    assert "qc.flags" in text and "'fold' was unexpected" in text and "2 is greater than the maximum of 1" in text
    assert len(info.value.problems) == 2  # null (off) is a valid threshold


def test_cells_and_failed_or_empty_rows():
    assert F.format_flags(["ncc_worse", "folding"]) == "ncc_worse;folding"
    assert F.parse_flags("ncc_worse; folding") == ["ncc_worse", "folding"]
    assert F.parse_flags(math.nan) == F.parse_flags("") == F.parse_flags(None) == []
    bad = {
        "status": "ok",
        "ncc_before": 0.9,
        "ncc_after": 0.2,
        "jacobian_nonpositive_fraction": 0.3,
        "overlap_fraction": 0.1,
    }
    assert F.subject_flags(bad) == ["ncc_worse", "folding", "low_overlap"]
    assert F.subject_flags({**bad, "status": "failed"}) == []  # the error says what happened
    assert F.subject_flags({"status": "ok"}) == []  # no values: no rule fires
    # values as a TSV cell gives them (strings, empty cells)
    assert F.subject_flags({"status": "ok", "ncc_before": "0.9", "ncc_after": "0.5", "dice_before": ""}) == [
        "ncc_worse"
    ]


# ------------------------------------------------------------------------------- on real images


def test_a_real_registration_is_not_flagged(demo):
    import maskreg

    fixed, moving = _brain(demo), _brain(demo, "r16")
    stages = [
        {"type": "moments"},
        {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [50, 25]},
        {"type": "syn", "loss": "cc", "window": 5, "scales": [4, 2], "iterations": [20, 10]},
    ]
    res = maskreg.register(fixed, moving, _ones(fixed), _ones(moving), stages=stages, device="cpu")
    row = _metrics(
        fixed, moving, res.transform(), field=res.displacement, linear=res.linear.matrix, report=res.summary()
    )
    assert row["ncc_after"] > row["ncc_before"] + 0.2
    assert row["jacobian_nonpositive_fraction"] == 0.0
    assert 0.5 < row["overlap_fraction"] <= 1.0
    assert 1.0 < row["displacement_max_mm"] < 0.1 * row["fixed_mask_diagonal_mm"]
    assert row["fixed_mask_diagonal_mm"] == pytest.approx(math.hypot(256, 256))  # 1 mm voxels, all-ones mask
    assert row["flags"] == ""


def test_low_overlap_from_a_real_partial_overlap_registration(demo):
    """The moving scan is the left 50 columns of the fixed one (same physical place): at most 20 % of the
    fixed (all-ones) mask can overlap it."""
    import maskreg

    fixed = _brain(demo)
    moving = fixed[:50, :]
    res = maskreg.register(
        fixed,
        moving,
        _ones(fixed),
        _ones(moving),
        device="cpu",
        stages=[{"type": "translation", "loss": "mse", "scales": [2], "iterations": [10]}],
    )
    report = res.summary()
    assert report["overlap_fraction"] < 0.2
    row = _metrics(fixed, moving, res.transform(), linear=res.linear.matrix, report=report)
    assert row["overlap_fraction"] == report["overlap_fraction"]
    assert "low_overlap" in F.parse_flags(row["flags"])
    assert (
        "low_overlap"
        not in _metrics(fixed, moving, res.transform(), report=report, thresholds={"low_overlap": 0.1})["flags"]
    )


def test_worse_after_than_before_flags_ncc_dice_and_tre(demo):
    """The moving scan is the fixed one (aligned already); a 'registration' that shifts it by 6 mm makes
    NCC, Dice and TRE worse."""
    fixed = _brain(demo)
    labels = sitk.Cast(sitk.OtsuMultipleThresholds(fixed, numberOfThresholds=2), sitk.sitkUInt8)
    points = np.array([[100.0, 120.0], [150.0, 80.0], [60.0, 170.0]])
    shift = LinearTransform(np.eye(2), np.array([6.0, 0.0])).to_sitk()
    kw = dict(
        fixed_labels=labels,
        moving_labels=labels,
        warped_labels=warp_labels(labels, fixed, shift, "nearest"),
        fixed_points=points,
        moving_points=points,
    )
    row = _metrics(fixed, fixed, shift, **kw)
    assert row["ncc_before"] == pytest.approx(1.0) and row["dice_before"] == pytest.approx(1.0)
    assert row["tre_after_mm"] == pytest.approx(6.0)
    assert F.parse_flags(row["flags"]) == ["ncc_worse", "dice_worse", "tre_worse"]
    assert math.isnan(row["displacement_max_mm"])  # no deformable field
    # the thresholds decide; None turns a flag off
    lenient = _metrics(fixed, fixed, shift, thresholds={"ncc_worse": 1.0, "dice_worse": None, "tre_worse": 6.5}, **kw)
    assert lenient["flags"] == ""
    # the identity (the right answer here) raises nothing
    identity = LinearTransform.identity(2).to_sitk()
    good = _metrics(fixed, fixed, identity, **{**kw, "warped_labels": warp_labels(labels, fixed, identity, "nearest")})
    assert good["flags"] == ""


def test_folding_from_a_real_folded_field(demo, make_image):
    """A local push along x with du_x/dx = -3 at the centre: det J = 1 - 3 < 0 there (a fold), while the
    largest displacement stays 3·4·e^-1/2 ≈ 7.3 mm, far below 0.1 × the image diagonal (36 mm)."""
    fixed = _brain(demo)
    yy, xx = np.mgrid[:256, :256].astype(float)
    r2 = (xx - 128) ** 2 + (yy - 128) ** 2
    u = np.zeros((256, 256, 2))
    u[..., 0] = -3.0 * (xx - 128) * np.exp(-r2 / (2 * 4.0**2))
    field = make_image(u, dtype=np.float64, like=fixed, vector=True)  # x, y components in mm
    row = _metrics(fixed, fixed, chain(LinearTransform.identity(2), field), field=field)
    assert row["jacobian_nonpositive_fraction"] > 0
    assert row["displacement_max_mm"] == pytest.approx(3 * 4 * math.exp(-0.5), rel=0.02)
    flags = F.parse_flags(row["flags"])
    assert "folding" in flags and "large_displacement" not in flags
    # the same field, gentle (du_x/dx = -0.5 at most): no fold
    gentle = make_image(u / 6, dtype=np.float64, like=fixed, vector=True)
    row = _metrics(fixed, fixed, chain(LinearTransform.identity(2), gentle), field=gentle)
    assert row["jacobian_nonpositive_fraction"] == 0.0 and "folding" not in row["flags"]
    # a mirroring linear part folds everything
    mirror = LinearTransform(np.diag([-1.0, 1.0]), np.array([255.0, 0.0])).to_sitk()
    row = _metrics(fixed, fixed, mirror, linear=np.diag([-1.0, 1.0]))
    assert row["jacobian_nonpositive_fraction"] == 1.0 and "folding" in row["flags"]


def test_large_displacement_is_relative_to_the_fixed_mask(demo, make_image):
    """A smooth 12 mm shift of the centre (a Gaussian bump, no fold): large for a 40 × 30 mm mask (diagonal
    50 mm, threshold 5 mm), ordinary for the whole 256 × 256 mm image (threshold 36 mm)."""
    fixed = _brain(demo)
    yy, xx = np.mgrid[:256, :256].astype(float)
    u = np.zeros((256, 256, 2))
    u[..., 1] = 12.0 * np.exp(-((xx - 128) ** 2 + (yy - 128) ** 2) / (2 * 40.0**2))
    field = make_image(u, dtype=np.float64, like=fixed, vector=True)
    tx = chain(LinearTransform.identity(2), field)
    small = make_image(_box(fixed, (108, 113), (148, 143)), like=fixed)
    row = _metrics(fixed, fixed, tx, field=field, fixed_mask=small)
    assert row["fixed_mask_diagonal_mm"] == pytest.approx(50.0)
    assert row["displacement_max_mm"] == pytest.approx(12.0, rel=1e-3)
    assert row["jacobian_nonpositive_fraction"] == 0.0
    assert "large_displacement" in F.parse_flags(row["flags"])
    whole = _metrics(fixed, fixed, tx, field=field)
    assert "large_displacement" not in whole["flags"]
    # the field outside the mask does not count: a mask far from the bump sees almost no displacement
    corner = make_image(_box(fixed, (0, 0), (40, 30)), like=fixed)
    row = _metrics(fixed, fixed, tx, field=field, fixed_mask=corner)
    assert row["displacement_max_mm"] < 0.5 and "large_displacement" not in row["flags"]


def test_cohort_table_keeps_flags_and_failed_subjects_have_none(tmp_path):
    results = tmp_path / "results"
    rows = {
        "good": {"status": "ok", "ncc_before": 0.5, "ncc_after": 0.9},
        "bad": {"status": "ok", "ncc_before": 0.9, "ncc_after": 0.5, "jacobian_nonpositive_fraction": 0.01},
    }
    for s, r in rows.items():
        r = {c: math.nan for c in evaluate.METRIC_COLUMNS} | r | {"subject": s, "error": ""}
        r["flags"] = F.format_flags(F.subject_flags(r))
        (results / s / "qc").mkdir(parents=True)
        write_table(pd.DataFrame([r], columns=evaluate.METRIC_COLUMNS), results / s / "qc" / "metrics.tsv")
    cohort = tmp_path / "cohort"
    m = evaluate.write_cohort(
        ["good", "bad", "gone"],
        cohort / "metrics.tsv",
        cohort / "dice.tsv",
        cohort / "summary.png",
        cohort / "failures.png",
        results,
        tmp_path / "logs",
    )
    assert list(m["flags"]) == ["", "ncc_worse;folding", ""]
    back = pd.read_csv(cohort / "metrics.tsv", sep="\t", keep_default_na=False).set_index("subject")
    assert back.loc["bad", "flags"] == "ncc_worse;folding" and back.loc["gone", "status"] == "failed"
    assert back.loc["good", "flags"] == back.loc["gone", "flags"] == ""
