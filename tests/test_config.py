"""Config and cohort validation: every problem at once, each naming the row/key and column."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from maskreg.config import load_and_validate, load_yaml
from maskreg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]  # the repository: the schemas and the config are read at import
CONFIG_SCHEMA = load_yaml(ROOT / "workflow/schemas/config.schema.yaml")
COHORT_SCHEMA = load_yaml(ROOT / "workflow/schemas/cohort.schema.yaml")
BASE_CONFIG = load_yaml(ROOT / "config/config.yaml")


def demo_config(cohort: Path) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["cohort"] = str(cohort)
    return cfg


def write_bad_cohort(tmp: Path, image: Path) -> Path:
    """A cohort with four problems: no 'moving' column, a missing file, a duplicate id, an unsafe id (``image``
    copied in as its one image file)."""
    shutil.copy(image, tmp / "a.nii.gz")
    rows = [
        "subject\tfixed\tfixed_mask",
        "s1\ta.nii.gz\t",
        "s1\ta.nii.gz\t",
        "../evil\ta.nii.gz\t",
        "s3\tmissing.nii.gz\t",
    ]
    (tmp / "bad.tsv").write_text("\n".join(rows) + "\n")
    return tmp / "bad.tsv"


def test_demo_config_and_cohort_are_valid(repo):
    table = load_and_validate(demo_config(repo / "config/cohort.tsv"), CONFIG_SCHEMA, COHORT_SCHEMA)
    assert list(table.index) == ["brain2d_r16", "brain2d_r27", "brain2d_r30", "headct2d", "abdomen3d", "brain3d"]
    # paths are resolved relative to the table's folder and exist
    assert all(Path(p).is_file() for p in table["fixed"])
    assert table.loc["brain2d_r16", "fixed_mask"] == ""


def test_bad_cohort_lists_every_problem_at_once(tmp_path, demo):
    cohort = write_bad_cohort(tmp_path, demo / "antspy_brain2d" / "r64.nii.gz")
    with pytest.raises(ConfigError) as info:
        load_and_validate(demo_config(cohort), CONFIG_SCHEMA, COHORT_SCHEMA)
    text = str(info.value)
    assert "column 'moving' is missing" in text
    assert "row 2 (subject 's1'), column 'subject': duplicate of row 1" in text
    assert "row 3 (subject '../evil'), column 'subject'" in text and "not a safe id" in text
    assert "row 4 (subject 's3'), column 'fixed': file not found: missing.nii.gz" in text
    assert len(info.value.problems) == 4


def test_a_folder_is_not_an_image(tmp_path, demo):
    """'..' or a folder name in an image column exists but is no file (found by the validator's fuzz test)."""
    shutil.copy(demo / "antspy_brain2d" / "r64.nii.gz", tmp_path / "a.nii.gz")
    (tmp_path / "scans").mkdir()
    (tmp_path / "c.tsv").write_text("subject\tfixed\tmoving\ns0\ta.nii.gz\t..\ns1\ta.nii.gz\tscans\n")
    with pytest.raises(ConfigError) as info:
        load_and_validate(demo_config(tmp_path / "c.tsv"), CONFIG_SCHEMA, COHORT_SCHEMA)
    assert "row 1 (subject 's0'), column 'moving': is a folder, not a file: .." in str(info.value)
    assert "row 2 (subject 's1'), column 'moving': is a folder, not a file: scans" in str(info.value)
    assert len(info.value.problems) == 2


def test_bad_config_lists_every_problem_at_once(repo):
    cfg = demo_config(repo / "config/cohort.tsv")
    cfg["colour"] = "blue"
    cfg["masks"]["fixed"]["dilate_mm"] = -2
    cfg["registration"]["stages"][1].update(scales=[1, 2, 4])
    cfg["registration"]["stages"][2].update(iterations=[10, 10, 10])
    cfg["registration"]["stages"][3].update(learning_rate=[1.0, 2.0])
    cfg["device"] = "gpu"
    with pytest.raises(ConfigError) as info:
        load_and_validate(cfg, CONFIG_SCHEMA, COHORT_SCHEMA)
    text = str(info.value)
    assert "unknown key(s) ('colour' was unexpected)" in text
    assert "masks.fixed.dilate_mm: -2 is less than the minimum of 0" in text
    assert "registration.stages.1 (rigid): scales [1, 2, 4] must not increase" in text
    assert "registration.stages.2 (affine): scales [4, 2] and iterations [10, 10, 10]" in text
    assert "device: 'gpu' does not match" in text
    assert (
        "registration.stages.3 (syn): learning_rate [1.0, 2.0] must be one number or one value per scale "
        "[4, 2, 1]" in text
    )
    assert len(info.value.problems) == 7  # the rigid scales also mismatch its iterations


def test_snakemake_refuses_bad_cohort_before_any_job(tmp_path, demo, snakemake):
    cohort = write_bad_cohort(tmp_path, demo / "antspy_brain2d" / "r64.nii.gz")
    cfg = demo_config(cohort)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", profile=None, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "4 problem(s)" in out and "duplicate of row 1" in out and "file not found" in out
    assert not (tmp_path / "results").exists()
