"""maskreg.jobs: one subject from files to files (the register job's body)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from maskreg import jobs


def test_concurrently_runs_every_call_and_raises_the_first_error():
    done, lock = [], threading.Lock()

    def ok(i):
        with lock:
            done.append(i)

    def bad(i):
        raise ValueError(f"call {i} failed")

    jobs.concurrently([(ok, (1,)), (ok, (2,))])
    assert sorted(done) == [1, 2]
    with pytest.raises(ValueError, match="call 3 failed"):
        jobs.concurrently([(ok, (4,)), (bad, (3,)), (ok, (5,))])
    assert sorted(done) == [1, 2, 4, 5]  # the others still ran


def test_register_subject_writes_the_fields_of_its_result(tmp_path, demo):
    """The fields written side by side (one thread each) are the result's fields, voxel for voxel, and the
    report is there, with no temporary file left."""
    src = demo / "antspy_brain2d"
    mask = sitk.Cast(sitk.ReadImage(str(src / "r64.nii.gz")) > 20, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    outputs = {k: str(tmp_path / name) for k, name in jobs.OUTPUT_FILES.items()}
    stages = [
        {"type": "affine", "loss": "mi", "scales": [2, 1], "iterations": [20, 10]},
        {"type": "syn", "loss": "cc", "scales": [2, 1], "iterations": [10, 5]},
    ]
    res = jobs.register_subject(
        "s1",
        fixed=str(src / "r64.nii.gz"),
        moving=str(src / "r16.nii.gz"),
        fixed_mask=str(tmp_path / "mask.nii.gz"),
        moving_mask=str(tmp_path / "mask.nii.gz"),
        outputs=outputs,
        registration={"stages": stages},
        device="cpu",
    )
    for name, image in (("warp", res.displacement), ("inverse_warp", res.inverse_displacement)):
        written = sitk.GetArrayFromImage(sitk.ReadImage(outputs[name]))
        assert np.abs(written).max() > 0.1
        np.testing.assert_array_equal(written, sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkVectorFloat32)))
    report = json.loads((tmp_path / "registration.json").read_text())
    assert report["subject"] == "s1" and report["deformable"] and report["seconds"] > 0
    assert not list(tmp_path.glob(".*"))  # no temporary file left
