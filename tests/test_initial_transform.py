"""Starting from an existing transform: ANTs-ordered lists of linear files and displacement fields, kept fixed
when nonlinear (``T = T0 ∘ S``), in the library, the CLI and the workflow."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

import maskreg
from maskreg import transforms as tfm
from maskreg.errors import InputError

TRANSLATION = [{"type": "translation", "loss": "mse", "scales": [2, 1], "iterations": [50, 30]}]


def _points(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(p.tolist()) for p in pts])


@pytest.fixture(scope="module")
def brain(demo):
    """The demo's 2D brain scans."""
    return demo / "antspy_brain2d"


@pytest.fixture(scope="module")
def initial(tmp_path_factory, make_image):
    """``T0 = A0 ∘ (id + u0)`` as ANTs writes a SyN result: a smooth field on its own coarse, shifted grid
    (not the fixed grid) and an affine with a centre; written as files, read back as a list."""
    d = tmp_path_factory.mktemp("initial")
    yy, xx = np.mgrid[0:70, 0:66]
    u = np.stack([3 * np.sin(xx / 10.0), 2 * np.cos(yy / 12.0)], -1)
    field = make_image(u, spacing=[4.0, 4.0], origin=[-6.0, -10.0], vector=True)
    a0 = tfm.LinearTransform(np.array([[1.05, 0.05], [-0.03, 0.97]]), np.array([3.0, -2.0]), np.array([128.0, 120.0]))
    tfm.write_field(field, d / "1Warp.nii.gz")
    tfm.write_linear(a0, d / "0GenericAffine.mat")
    return d, a0, field


def test_ants_ordered_list_is_warp_then_affine(initial):
    d, a0, field = initial
    t0 = tfm.read_transform(f"{d / '1Warp.nii.gz'};{d / '0GenericAffine.mat'}")
    assert not isinstance(t0, tfm.LinearTransform)
    pts = np.random.default_rng(1).uniform(20, 230, (40, 2))
    disp = tfm.displacement_transform(sitk.ReadImage(str(d / "1Warp.nii.gz")))
    by_hand = a0.apply(_points(disp, pts))  # T0(x) = A0(x + u0(x))
    assert np.abs(_points(t0, pts) - by_hand).max() < 1e-6
    # the other order is a different map: the order is honoured, not guessed
    other = tfm.read_transform([d / "0GenericAffine.mat", d / "1Warp.nii.gz"])
    assert np.abs(_points(other, pts) - by_hand).max() > 0.5
    # linear files only: collapsed to one LinearTransform
    lin = tfm.read_transform([d / "0GenericAffine.mat", d / "0GenericAffine.mat"])
    assert isinstance(lin, tfm.LinearTransform)
    assert np.abs(lin.apply(pts) - a0.apply(a0.apply(pts))).max() < 1e-6


def test_bad_initial_files_name_the_subject_and_file(tmp_path, initial):
    d, _, _ = initial
    with pytest.raises(InputError, match=r"sub-3.*nowhere\.mat.*file not found"):
        tfm.read_transform(str(tmp_path / "nowhere.mat"), subject="sub-3")
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(scalar))
    with pytest.raises(InputError, match=r"sub-3.*scalar\.nii\.gz.*not a displacement field.*1 component"):
        tfm.read_transform(f"{scalar};{d / '0GenericAffine.mat'}", subject="sub-3")
    junk = tmp_path / "junk.txt"
    junk.write_text("not a transform\n")
    with pytest.raises(InputError, match=r"junk\.txt.*not an ITK transform file"):
        tfm.read_transform(str(junk))


def test_refining_after_a_nonlinear_start_recovers_the_whole_chain(initial, brain):
    """moving(T(x)) = fixed(x) with T = T0 ∘ shift: starting from T0, a translation stage finds the shift and the
    result (affine.mat + warp.nii.gz form) maps points like T, forward and back."""
    d, a0, _ = initial
    moving = sitk.ReadImage(str(brain / "r16.nii.gz"), sitk.sitkFloat32)
    t0 = tfm.read_transform([d / "1Warp.nii.gz", d / "0GenericAffine.mat"])
    truth = tfm.compose_sitk([sitk.TranslationTransform(2, (2.0, -1.5)), *tfm.flatten(t0)])
    fixed = sitk.Resample(moving, moving, truth, sitk.sitkLinear, 0.0)
    res = maskreg.register(fixed, moving, stages=TRANSLATION, initial=t0, device="cpu")
    pts = np.random.default_rng(0).uniform(60, 200, (60, 2))
    err = np.linalg.norm(_points(res.transform(), pts) - _points(truth, pts), axis=1)
    assert err.max() < 0.1  # mm (1 mm pixels)
    assert res.initial_nonlinear and res.summary()["initial_nonlinear"]
    # the linear part written is A0 ∘ L: A0's matrix (the translation stage adds no linear distortion)
    assert np.allclose(res.linear.matrix, a0.matrix, atol=1e-6)
    assert res.jacobian_nonpositive_fraction == 0.0
    # inverse chain brings mapped points back within 0.1 voxel
    back = _points(tfm.inverse_chain(res.linear, res.inverse_displacement), _points(res.transform(), pts))
    assert np.abs(back - pts).max() < 0.1


def test_no_stages_reproduce_the_initial_transform_and_files_round_trip(initial, tmp_path, brain):
    d, _, _ = initial
    fixed = sitk.ReadImage(str(brain / "r64.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(brain / "r16.nii.gz"), sitk.sitkFloat32)
    t0 = tfm.read_transform([d / "1Warp.nii.gz", d / "0GenericAffine.mat"])
    res = maskreg.register(fixed, moving, stages=[], initial=t0, device="cpu")
    tfm.write_linear(res.linear, tmp_path / "affine.mat")
    tfm.write_field(res.displacement, tmp_path / "warp.nii.gz")
    _, _, chain = tfm.read_chain(tmp_path / "affine.mat", tmp_path / "warp.nii.gz")
    # on the fixed grid's voxels the written chain is T0 (float32 field: <= 1e-3 mm)
    idx = np.random.default_rng(2).integers(5, 250, (50, 2)).astype(float)
    pts = np.array([fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    assert np.abs(_points(chain, pts) - _points(t0, pts)).max() < 1e-3


def test_cli_register_accepts_an_ants_ordered_list(initial, tmp_path, brain):
    d, _, _ = initial
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskreg.cli",
            "register",
            str(brain / "r64.nii.gz"),
            str(brain / "r16.nii.gz"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--initial",
            str(d / "1Warp.nii.gz"),
            str(d / "0GenericAffine.mat"),
            "--stages",
            str(_stages_file(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    field = sitk.ReadImage(str(out / "warp.nii.gz"))
    assert field.GetSize() == sitk.ReadImage(str(brain / "r64.nii.gz")).GetSize()
    assert np.abs(sitk.GetArrayFromImage(field)).max() > 1.0  # the initial field is in the written chain


def _stages_file(tmp_path):
    p = tmp_path / "stages.yaml"
    p.write_text(yaml.safe_dump({"stages": TRANSLATION}))
    return p


@pytest.mark.workflow
def test_workflow_writes_fields_when_a_subject_starts_from_a_field(initial, tmp_path, brain, repo, snakemake):
    """Linear stages only, one subject starting from ANTs-style files, one from nothing: both get
    warp.nii.gz (the second a zero field) and warped images that use the whole chain."""
    d, _, _ = initial
    (tmp_path / "cohort.tsv").write_text(
        "subject\tfixed\tmoving\tinitial_transform\n"
        f"from_ants\t{brain / 'r64.nii.gz'}\t{brain / 'r16.nii.gz'}\t"
        f"{d / '1Warp.nii.gz'};{d / '0GenericAffine.mat'}\n"
        f"plain\t{brain / 'r64.nii.gz'}\t{brain / 'r27.nii.gz'}\t\n"
    )
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(tmp_path / "cohort.tsv")
    cfg["registration"]["stages"] = TRANSLATION
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = [
        f"results/{s}/{f}"
        for s in ("from_ants", "plain")
        for f in ("transforms/warp.nii.gz", "transforms/inverse_warp.nii.gz", "warped/image.nii.gz")
    ]
    proc = snakemake(tmp_path, "--cores", "2", *targets, profile=None, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arr = lambda s, f: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"results/{s}/{f}")))  # noqa: E731
    assert np.abs(arr("from_ants", "transforms/warp.nii.gz")).max() > 1.0
    assert np.abs(arr("plain", "transforms/warp.nii.gz")).max() == 0.0
    # the warped moving image is the moving image through the written chain, initial field included
    fixed = sitk.ReadImage(str(brain / "r64.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(brain / "r16.nii.gz"), sitk.sitkFloat32)
    _, _, chain = tfm.read_chain(
        tmp_path / "results/from_ants/transforms/affine.mat", tmp_path / "results/from_ants/transforms/warp.nii.gz"
    )
    expect = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, chain, sitk.sitkLinear, 0.0))
    got = arr("from_ants", "warped/image.nii.gz")
    assert np.abs(got - expect).max() < 1e-3 * np.abs(expect).max()
