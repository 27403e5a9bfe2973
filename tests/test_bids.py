"""``maskreg cohort --bids``: a cohort table from a small real BIDS dataset (pybids, the optional extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from maskreg.cli import main
from maskreg.config import cohort_problems, load_yaml, read_table

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "cohort.schema.yaml"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maskreg.cli", "cohort", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _crop(path: Path, start: tuple[int, int, int]) -> sitk.Image:
    """A small real scan: a 12³ crop of a demo brain (its geometry kept)."""
    return sitk.RegionOfInterest(sitk.ReadImage(str(path)), (12, 12, 12), start)


def _write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _description(folder: Path, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"Name": folder.name, "BIDSVersion": "1.9.0", **extra}
    (folder / "dataset_description.json").write_text(json.dumps(doc))


@pytest.fixture
def dataset(tmp_path, demo) -> Path:
    """``tmp_path/ds``: sub-01 (no sessions: T1w, T2w), sub-02 (ses-1 and ses-2: T1w, T2w), sub-03 (T1w only), and
    ``ds/derivatives/masks`` with brain masks of the T1w images of sub-01 and sub-02 ses-1."""
    pytest.importorskip("bids")
    ds = tmp_path / "ds"
    _description(ds)
    t1 = _crop(demo / "brain3d" / "vxm_image.nii.gz", (20, 26, 30))
    t2 = _crop(demo / "brain3d" / "mni_image.nii.gz", (26, 32, 25))
    mask = sitk.Cast(t1 > 20, sitk.sitkUInt8)
    for stem in ("sub-01/anat/sub-01", "sub-02/ses-1/anat/sub-02_ses-1", "sub-02/ses-2/anat/sub-02_ses-2"):
        _write(t1, ds / f"{stem}_T1w.nii.gz")
        _write(t2, ds / f"{stem}_T2w.nii.gz")
    _write(t1, ds / "sub-03/anat/sub-03_T1w.nii.gz")
    masks = ds / "derivatives" / "masks"
    _description(masks, DatasetType="derivative", GeneratedBy=[{"Name": "masks"}])
    for stem in ("sub-01/anat/sub-01", "sub-02/ses-1/anat/sub-02_ses-1"):
        _write(mask, masks / f"{stem}_desc-brain_mask.nii.gz")
    return ds


def _rows(table: Path) -> list[dict]:
    return read_table(table).to_dict("records")


def _valid(table: Path) -> None:
    """The table passes the workflow's own cohort validation (schema, unique ids, files found)."""
    assert cohort_problems(read_table(table), table.resolve().parent, load_yaml(SCHEMA)) == []


def test_within_subject_rows_per_session_relative_paths(dataset, tmp_path):
    out = tmp_path / "cohort.tsv"
    p = run(
        "--bids", "ds", "--derivatives", "ds/derivatives/masks", "--out", "cohort.tsv",
        "--fixed", "suffix=T1w,datatype=anat", "--moving", "suffix=T2w", "--fixed-mask", "suffix=mask,desc=brain",
        cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "wrote cohort.tsv: 3 row(s)"
    mask = "ds/derivatives/masks/sub-{0}/anat/sub-{0}_desc-brain_mask.nii.gz"
    assert _rows(out) == [
        {
            "subject": "sub-01",
            "fixed": "ds/sub-01/anat/sub-01_T1w.nii.gz",
            "moving": "ds/sub-01/anat/sub-01_T2w.nii.gz",
            "fixed_mask": mask.format("01"),
        },
        {
            "subject": "sub-02_ses-1",
            "fixed": "ds/sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
            "moving": "ds/sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz",
            "fixed_mask": "ds/derivatives/masks/sub-02/ses-1/anat/sub-02_ses-1_desc-brain_mask.nii.gz",
        },
        {
            "subject": "sub-02_ses-2",
            "fixed": "ds/sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz",
            "moving": "ds/sub-02/ses-2/anat/sub-02_ses-2_T2w.nii.gz",
            "fixed_mask": "",
        },
    ]
    # sub-03 has no T2w: skipped, and said so; sub-02 ses-2 has no mask: an empty cell, and said so
    assert "skipped 1 row(s) without a --moving 'suffix=T2w' match: sub-03" in p.stderr
    assert "left fixed_mask empty for 1 row(s) without a --fixed-mask 'suffix=mask,desc=brain' match: sub-02_ses-2" in (
        p.stderr
    )
    _valid(out)


def test_a_filter_matching_two_files_is_an_error_naming_them(dataset, tmp_path):
    extra = dataset / "sub-01/anat/sub-01_acq-fast_T2w.nii.gz"
    extra.write_bytes((dataset / "sub-01/anat/sub-01_T2w.nii.gz").read_bytes())
    p = run("--bids", "ds", "--out", "cohort.tsv", "--fixed", "suffix=T1w", "--moving", "suffix=T2w", cwd=tmp_path)
    assert p.returncode == 1
    assert "subject 'sub-01': --moving 'suffix=T2w' matches 2 files" in p.stderr
    assert "acquisition: (absent), fast" in p.stderr and "add acquisition=fast (or acquisition= for none)" in p.stderr
    assert str(extra) in p.stderr and str(dataset / "sub-01/anat/sub-01_T2w.nii.gz") in p.stderr
    assert not (tmp_path / "cohort.tsv").exists()
    # narrowed ("acq=" for an absent acquisition), the same dataset gives one row per subject (x session)
    p = run("--bids", "ds", "--out", "c.tsv", "--fixed", "suffix=T1w", "--moving", "suffix=T2w,acq=", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [r["moving"] for r in _rows(tmp_path / "c.tsv")][0] == "ds/sub-01/anat/sub-01_T2w.nii.gz"


def test_template_mode_absolute_paths(dataset, tmp_path, demo):
    template, template_mask = demo / "brain3d" / "mni_image.nii.gz", demo / "brain3d" / "mni_mask.nii.gz"
    out = tmp_path / "tables" / "to_mni.tsv"
    p = run(
        "--bids", str(dataset), "--out", str(out), "--moving", "suffix=T1w", "--absolute",
        "--fixed-template", str(template), "--fixed-template-mask", str(template_mask),
        cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    stems = ["sub-01/anat/sub-01", "sub-02/ses-1/anat/sub-02_ses-1", "sub-02/ses-2/anat/sub-02_ses-2"]
    assert _rows(out) == [
        {"subject": sid, "fixed": str(template), "moving": str(dataset / f"{stem}_T1w.nii.gz"), "fixed_mask": str(mask)}
        for sid, stem, mask in zip(
            ["sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03"],
            [*stems, "sub-03/anat/sub-03"],
            [template_mask] * 4,
            strict=True,
        )
    ]
    _valid(out)


def test_a_pinned_session_registers_every_session_to_it(dataset, tmp_path, capsys):
    out = tmp_path / "cohort.csv"
    args = ["cohort", "--bids", str(dataset), "--out", str(out), "--participant-label", "sub-02"]
    assert main([*args, "--fixed", "suffix=T1w,ses=1", "--moving", "suffix=T2w"]) == 0
    fixed = "ds/sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    rows = read_table(out).to_dict("records")
    assert [(r["subject"], r["fixed"]) for r in rows] == [("sub-02_ses-1", fixed), ("sub-02_ses-2", fixed)]
    # both images pinned: one row per subject
    assert main([*args, "--fixed", "suffix=T1w,ses=1", "--moving", "suffix=T1w,ses=2"]) == 0
    assert [(r["subject"], r["moving"]) for r in read_table(out).to_dict("records")] == [
        ("sub-02", "ds/sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz")
    ]
    _valid(out)


def test_missing_error_and_bad_filters_are_clear(dataset, tmp_path, capsys):
    base = ["cohort", "--bids", str(dataset), "--out", str(tmp_path / "c.tsv"), "--fixed", "suffix=T1w"]
    assert main([*base, "--moving", "suffix=T2w", "--missing", "error"]) == 1
    err = capsys.readouterr().err
    assert "1 row(s) have no --moving 'suffix=T2w' match: sub-03" in err
    assert main([*base, "--moving", "suffix=T2w,colour=red"]) == 1
    assert "--moving 'suffix=T2w,colour=red': unknown BIDS entity colour" in capsys.readouterr().err
    assert main([*base, "--moving", "T2w"]) == 1
    assert "'T2w' is not key=value" in capsys.readouterr().err
    assert main([*base, "--moving", "suffix=T2w", "--fixed-template-mask", str(tmp_path)]) == 1
    assert "--fixed-template-mask" in capsys.readouterr().err
    assert not (tmp_path / "c.tsv").exists()


def test_without_pybids_the_error_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['bids'] = None; from maskreg.cli import main; "
        f"sys.exit(main(['cohort', '--bids', {str(tmp_path)!r}, '--out', 'c.tsv', '--fixed', 'suffix=T1w', "
        "'--moving', 'suffix=T2w']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1
    assert "needs pybids" in p.stderr and "pip install 'maskreg[bids]'" in p.stderr
