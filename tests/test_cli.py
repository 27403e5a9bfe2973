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


def test_the_syn_preset_is_the_workflows_default_stage_list(repo):
    """One stage list under three names: ``maskreg register``'s default preset, config/config.yaml's stages and
    the config schema's default."""
    import yaml

    from maskreg.stages import PRESETS, WORKFLOW_PRESET

    config = yaml.safe_load((repo / "config/config.yaml").read_text())
    schema = yaml.safe_load((repo / "workflow/schemas/config.schema.yaml").read_text())
    schema_default = schema["properties"]["registration"]["properties"]["stages"]["default"]
    assert PRESETS[WORKFLOW_PRESET] == config["registration"]["stages"] == schema_default
    assert any(s["type"] == "syn" for s in PRESETS[WORKFLOW_PRESET])


def test_the_help_examples_stage_list_is_valid():
    """`maskreg register --help` shows an inline --stages list; the stage rules accept it (they once did not:
    its syn stage had two iteration counts for the default three scales)."""
    import yaml

    from maskreg.cli import INLINE_STAGES_EXAMPLE
    from maskreg.stages import stage_list_problems

    p = run("register", "--help")
    assert p.returncode == 0 and "--stages" in p.stdout
    assert stage_list_problems(yaml.safe_load(INLINE_STAGES_EXAMPLE), "dense") == []


@pytest.mark.slow
def test_register_runs_a_preset_or_inline_stages(tmp_path, demo):
    """Without --stages the workflow's default list runs (a deformable stage: the fields are written); --preset
    picks another list; --stages takes the list inline; a bad inline list is a clear message naming the key."""
    import json

    fixed, moving = demo / "antspy_brain2d" / "r64.nii.gz", demo / "antspy_brain2d" / "r16.nii.gz"

    def register(out: str, *extra: str) -> dict:
        p = run("register", str(fixed), str(moving), "--out", str(tmp_path / out), "--device", "cpu", *extra)
        assert p.returncode == 0, p.stderr
        return json.loads((tmp_path / out / "registration.json").read_text())

    default = register("default")
    assert [s["type"] for s in default["stages"]] == ["moments", "rigid", "affine", "syn"]
    assert (tmp_path / "default" / "warp.nii.gz").exists() and default["deformable"]
    rigid = register("rigid", "--preset", "rigid")
    assert [s["type"] for s in rigid["stages"]] == ["moments", "rigid"] and not rigid["deformable"]
    inline = register(
        "inline", "--stages", "[{type: moments}, {type: similarity, loss: gc, scales: [2, 1], iterations: [20, 10]}]"
    )
    assert [(s["type"], s["loss"]) for s in inline["stages"]][1] == ("similarity", "gc")
    p = run("register", str(fixed), str(moving), "--out", str(tmp_path / "bad"), "--stages", "[{type: rigid, los: mi}]")
    assert p.returncode != 0 and "--stages (inline)" in p.stderr and "los" in p.stderr
    assert "Traceback" not in p.stderr
