"""The mask rules in a real Snakemake run: all-ones, a given mask dilated in mm, an automatic mask."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from scipy import ndimage

pytestmark = pytest.mark.workflow


def test_mask_rules_produce_the_expected_masks(tmp_path, repo, demo, snakemake):
    head = demo / "elastix_ct2d_head"
    brain = demo / "antspy_brain2d"
    rows = [
        "subject\tfixed\tmoving\tfixed_mask\tmoving_mask\tfixed_mask_dilate_mm\tfixed_mask_missing",
        f"ones\t{brain / 'r64.nii.gz'}\t{brain / 'r16.nii.gz'}\t\t\t\t",
        f"given\t{head / 'fixed.nii.gz'}\t{head / 'moving.nii.gz'}\t{head / 'fixed_mask.nii.gz'}\t"
        f"{head / 'moving_mask.nii.gz'}\t3.5\t",
        f"auto\t{brain / 'r64.nii.gz'}\t{brain / 'r27.nii.gz'}\t\t\t\tauto",
    ]
    (tmp_path / "cohort.tsv").write_text("\n".join(rows) + "\n")
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(tmp_path / "cohort.tsv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/{s}/masks/{r}_mask.nii.gz" for s in ("ones", "given", "auto") for r in ("fixed", "moving")]
    proc = snakemake(tmp_path, "--cores", "2", *targets, profile=None, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda s, r: sitk.ReadImage(str(tmp_path / f"results/{s}/masks/{r}_mask.nii.gz"))  # noqa: E731

    # all-ones: every voxel, on the image's exact grid
    ones = read("ones", "fixed")
    ref = sitk.ReadImage(str(brain / "r64.nii.gz"))
    assert ones.GetSize() == ref.GetSize() and ones.GetOrigin() == ref.GetOrigin()
    assert sitk.GetArrayFromImage(ones).min() == 1

    # given + 3.5 mm dilation (1 mm pixels): equals the Euclidean-distance ground truth
    given = sitk.GetArrayFromImage(sitk.ReadImage(str(head / "fixed_mask.nii.gz"))) > 0
    dilated = sitk.GetArrayFromImage(read("given", "fixed")) > 0
    truth = ndimage.distance_transform_edt(~given) <= 3.5
    assert dilated.sum() > given.sum() and np.all(dilated[given])
    assert np.sum(dilated != truth) <= 0.01 * truth.sum()
    # the moving mask had no override: unchanged
    mov = sitk.GetArrayFromImage(sitk.ReadImage(str(head / "moving_mask.nii.gz"))) > 0
    assert np.array_equal(sitk.GetArrayFromImage(read("given", "moving")) > 0, mov)

    # auto: a compact foreground mask of the brain slice, background excluded
    auto = sitk.GetArrayFromImage(read("auto", "fixed")) > 0
    img = sitk.GetArrayFromImage(ref)
    assert 0.15 < auto.mean() < 0.7
    assert img[auto].mean() > 3 * max(img[~auto].mean(), 1.0)
    # the moving image of that row had no override: all-ones from the config
    assert sitk.GetArrayFromImage(read("auto", "moving")).min() == 1
