"""Learning in the workflow (issue 27): rows with split 'train' train the cohort's model, the other rows are
registered by its network stage, and a registered row's labels serve QC only (real Snakemake runs on synthetic
2D NIfTI pairs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

pytestmark = pytest.mark.workflow
pytest.importorskip("monai")


def _ellipse(n, cx, cy, rx, ry):
    y, x = np.mgrid[:n, :n].astype(np.float32)
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1).astype(np.float32)


def _write(a: np.ndarray, path):
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.5, 1.5))
    sitk.WriteImage(img, str(path))
    return path.name


def _cohort(folder, rows: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` synthetic pairs (an ellipse with a bright core, the moving one shifted and stretched) with their
    label maps, written as NIfTI; the last row is the test row."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        n = 40
        cx, cy = rng.uniform(16, 24, 2)
        rx, ry = rng.uniform(5, 8, 2)
        dx, dy = rng.uniform(-6, 6, 2)
        s = rng.uniform(0.8, 1.2)
        f, m = _ellipse(n, cx, cy, rx, ry), _ellipse(n, cx + dx, cy + dy, rx * s, ry / s)
        row = {"subject": f"s{i}", "split": "train" if i < rows - 1 else "test"}
        for role, lab, x, y in (("fixed", f, cx, cy), ("moving", m, cx + dx, cy + dy)):
            img = lab * (0.6 + 0.4 * _ellipse(n, x, y, 3, 3)) + 0.05 * rng.normal(size=(n, n)).astype(np.float32)
            row[role] = _write(img.astype(np.float32), folder / f"s{i}_{role}.nii.gz")
            row[f"{role}_labels"] = _write(lab.astype(np.uint8), folder / f"s{i}_{role}_labels.nii.gz")
        out.append(row)
    return pd.DataFrame(out)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def learned(tmp_path_factory, snakemake):
    work = tmp_path_factory.mktemp("learn")
    table = _cohort(work, 5)
    table.to_csv(work / "cohort.tsv", sep="\t", index=False)
    cfg = {
        "cohort": str(work / "cohort.tsv"),
        "device": "cpu",
        "registration": {"stages": [{"type": "network"}]},
        "learning": {"enabled": True, "steps": 40, "levels": 3, "image_weight": 0, "learning_rate": 3e-3},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, table


def test_training_rows_train_the_model_and_the_others_are_registered_with_it(learned):
    work, table = learned
    meta = json.loads((work / "results/model/model/training.json").read_text())
    assert meta["subjects"] == ["s0", "s1", "s2", "s3"]
    assert meta["labelled_subjects"] == meta["subjects"] and len(meta["history"]) == 40
    assert (work / "results/model/model/training.png").stat().st_size > 1000
    # only the test row is registered: the training rows have no transforms and are not in the cohort table
    assert (work / "results/s4/transforms/warp.nii.gz").exists()
    assert not any((work / f"results/s{i}/transforms").exists() for i in range(4))
    metrics = pd.read_csv(work / "results/cohort/metrics.tsv", sep="\t")
    assert list(metrics["subject"]) == ["s4"] and metrics["status"].tolist() == ["ok"]
    report = json.loads((work / "results/s4/transforms/registration.json").read_text())
    assert [s["type"] for s in report["stages"]] == ["network"] and report["deformable"]


def test_a_registered_rows_labels_change_its_dice_and_nothing_else(learned, snakemake):
    work, table = learned
    transforms = sorted((work / "results/s4/transforms").glob("*"))
    before = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in transforms}
    model = work / "results/model/model/model.pt"
    model_before = model.stat().st_mtime_ns
    dice_before = pd.read_csv(work / "results/s4/qc/metrics.tsv", sep="\t")["dice_after"].iloc[0]
    # new fixed labels for the test row: the ellipse's left half only
    path = work / "s4_fixed_labels.nii.gz"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    lab[:, lab.shape[1] // 2 :] = 0
    _write(lab.astype(np.uint8), path)
    proc = snakemake(work, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert model.stat().st_mtime_ns == model_before  # a registered row's labels do not retrain the model
    after = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in sorted((work / "results/s4/transforms").glob("*"))}
    # jacobian.nii.gz is QC's (qc_subject reruns for the new labels): the same map, written again
    assert after.pop("jacobian.nii.gz")[0] == before.pop("jacobian.nii.gz")[0]
    assert after == before, "the registration reran or read the test row's labels"
    dice_after = pd.read_csv(work / "results/s4/qc/metrics.tsv", sep="\t")["dice_after"].iloc[0]
    assert dice_after != dice_before


def test_cross_validation_registers_every_row_with_the_model_that_left_it_out(tmp_path, snakemake):
    table = _cohort(tmp_path, 5)
    table = table.drop(columns=["split"])  # without a split column every row trains (out of its fold)
    table.to_csv(tmp_path / "cohort.tsv", sep="\t", index=False)
    cfg = {
        "cohort": str(tmp_path / "cohort.tsv"),
        "device": "cpu",
        "registration": {"stages": [{"type": "network"}]},
        "learning": {"enabled": True, "folds": 2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "--cores", "2", "-p")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the planned jobs: each register job's model, and the subjects each model trains on
    model_of, trains_on = {}, {}
    for block in (proc.stdout + proc.stderr).split("\nrule ")[1:]:
        name = block.split(":", 1)[0]
        fields = dict(
            line.strip().split(": ", 1) for line in block.splitlines()[1:] if ": " in line and line.startswith("    ")
        )
        if name == "register":
            model_of[fields["wildcards"].split("=")[1]] = fields["input"].split(", ")[0]
        elif name == "train_model":
            subjects = {Path(f).name.split("_")[0] for f in fields["input"].split(", ") if f.startswith(str(tmp_path))}
            trains_on[fields["output"].split(", ")[0]] = subjects
    assert sorted(model_of) == ["s0", "s1", "s2", "s3", "s4"]
    assert set(model_of.values()) == set(trains_on) == {"results/model/fold0/model.pt", "results/model/fold1/model.pt"}
    for subject, model in model_of.items():
        assert subject not in trains_on[model], f"{subject} is registered by a model trained on it"
    assert set().union(*trains_on.values()) == set(model_of)
