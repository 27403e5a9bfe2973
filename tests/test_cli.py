"""The command line: maskreg register / apply / mask, without Snakemake."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskreg.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_register_apply_and_mask(tmp_path, demo):
    fixed, moving = demo / "antspy_brain2d" / "r64.nii.gz", demo / "antspy_brain2d" / "r16.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    p = run("mask", str(fixed), "--missing", "auto", "--dilate-mm", "2", "--output", str(mask))
    assert p.returncode == 0, p.stderr
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    assert 0.1 < m.mean() < 0.8 and set(np.unique(m)) == {0, 1}

    (tmp_path / "stages.yaml").write_text(
        "stages:\n  - {type: moments}\n  - {type: affine, loss: mi, scales: [4, 2], iterations: [40, 20]}\n"
        "  - {type: syn, loss: cc, scales: [2, 1], iterations: [20, 10]}\n"
    )
    p = run(
        "register",
        str(fixed),
        str(moving),
        "--fixed-mask",
        str(mask),
        "--out",
        str(tmp_path / "reg"),
        "--warped",
        str(tmp_path / "warped.nii.gz"),
        "--device",
        "cpu",
        "--stages",
        str(tmp_path / "stages.yaml"),
    )
    assert p.returncode == 0, p.stderr
    p = run(
        "apply",
        str(tmp_path / "reg" / "affine.mat"),
        "--warp",
        str(tmp_path / "reg" / "warp.nii.gz"),
        "--reference",
        str(fixed),
        "--input",
        str(moving),
        "--output",
        str(tmp_path / "applied.nii.gz"),
    )
    assert p.returncode == 0, p.stderr
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "applied.nii.gz")))
    assert np.allclose(a, b, atol=1e-4)
    f = sitk.GetArrayFromImage(sitk.ReadImage(str(fixed))).astype(float)
    assert np.corrcoef(f.ravel(), a.ravel())[0, 1] > 0.9

    (tmp_path / "pts.csv").write_text("x,y\n100,120\n30.5,200\n")
    reg = tmp_path / "reg"
    p = run(
        "apply",
        str(reg / "affine.mat"),
        "--warp",
        str(reg / "warp.nii.gz"),
        "--reference",
        str(fixed),
        "--landmarks",
        str(tmp_path / "pts.csv"),
        "--output",
        str(tmp_path / "moved.csv"),
    )
    assert p.returncode == 0, p.stderr
    chain = sitk.CompositeTransform(2)
    chain.AddTransform(sitk.ReadTransform(str(reg / "affine.mat")))
    chain.AddTransform(
        sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(reg / "warp.nii.gz")), sitk.sitkVectorFloat64))
    )
    moved = np.loadtxt(tmp_path / "moved.csv", delimiter=",", skiprows=1)
    assert np.allclose(moved[0], chain.TransformPoint((100.0, 120.0)), atol=1e-4)
    # and back: moving-space points to fixed space with the inverse chain
    p = run(
        "apply",
        str(reg / "affine.mat"),
        "--warp",
        str(reg / "warp.nii.gz"),
        "--inverse",
        "--inverse-warp",
        str(reg / "inverse_warp.nii.gz"),
        "--reference",
        str(fixed),
        "--landmarks",
        str(tmp_path / "moved.csv"),
        "--output",
        str(tmp_path / "back.csv"),
    )
    assert p.returncode == 0, p.stderr
    back = np.loadtxt(tmp_path / "back.csv", delimiter=",", skiprows=1)
    assert np.abs(back - [[100, 120], [30.5, 200]]).max() < 0.1


def test_bad_input_is_one_clear_line(tmp_path, demo):
    p = run(
        "register",
        str(tmp_path / "nope.nii.gz"),
        str(demo / "antspy_brain2d" / "r16.nii.gz"),
        "--out",
        str(tmp_path / "o"),
    )
    assert p.returncode == 1
    assert "fixed" in p.stderr and "file not found" in p.stderr and "Traceback" not in p.stderr
