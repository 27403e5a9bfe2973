"""Failures stay small and reruns are exact: real Snakemake runs on a tiny cohort of real 2D slices."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

pytestmark = pytest.mark.workflow
FAST = [{"type": "moments"}, {"type": "rigid", "loss": "mse", "scales": [2, 1], "iterations": [20, 10]}]


@pytest.fixture(scope="session")
def make_project(demo):
    """``make_project(tmp, rows, stages=FAST)``: a project folder: 96x96 crops of the demo's brain slices, a cohort
    table and a config."""

    def make(tmp: Path, rows: dict[str, tuple[str, str]], stages=FAST) -> Path:
        for name in ("r64", "r16", "r27"):
            img = sitk.ReadImage(str(demo / "antspy_brain2d" / f"{name}.nii.gz"))
            sitk.WriteImage(img[80:176, 80:176], str(tmp / f"{name}.nii.gz"))
        const = sitk.Image([96, 96], sitk.sitkUInt8) + 7
        sitk.WriteImage(const, str(tmp / "const.nii.gz"))
        write_cohort(tmp, rows)
        cfg = {"cohort": str(tmp / "cohort.tsv"), "device": "cpu", "registration": {"stages": stages}}
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
        return tmp

    return make


def write_cohort(tmp: Path, rows: dict[str, tuple[str, str]]) -> None:
    lines = ["subject\tfixed\tmoving"] + [f"{s}\t{f}.nii.gz\t{m}.nii.gz" for s, (f, m) in rows.items()]
    (tmp / "cohort.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def snakemake(snakemake):
    """``snakemake(work, *args, timeout=600)``: the workflow run on the project folder ``work`` (local profile,
    2 cores), its completed process."""

    def run(work: Path, *args: str, timeout: int = 600, **kw):
        return snakemake(work, "--cores", "2", *args, timeout=timeout, **kw)

    return run


@pytest.fixture(scope="session")
def planned(snakemake):
    """``planned(work)``: the jobs a run would execute now, {rule: count} from a dry run's job table."""

    def jobs(work: Path) -> dict[str, int]:
        proc = snakemake(work, "-n", "--quiet", "rules")
        assert proc.returncode == 0, proc.stderr[-2000:]
        out: dict[str, int] = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
                out[parts[0]] = int(parts[1])
        return out

    return jobs


def test_one_bad_subject_fails_alone_and_is_listed(tmp_path, make_project, snakemake, report_files):
    work = make_project(tmp_path, {"good": ("r64", "r16"), "bad": ("r64", "const")})
    proc = snakemake(work)
    assert proc.returncode != 0  # automation notices
    assert (work / "results/good/qc/registration.png").exists()
    assert not (work / "results/bad/transforms/affine.mat").exists()
    m = pd.read_csv(work / "results/cohort/metrics.tsv", sep="\t", keep_default_na=False).set_index("subject")
    assert m.loc["good", "status"] == "ok" and float(m.loc["good", "ncc_after"]) > float(m.loc["good", "ncc_before"])
    assert m.loc["bad", "status"] == "failed"
    assert "subject 'bad'" in m.loc["bad", "error"] and "constant" in m.loc["bad", "error"]
    assert "1 of 2 subject(s) failed" in proc.stderr
    rep = snakemake(work, "--report", str(work / "report.html"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    table = report_files((work / "report.html").read_text(errors="ignore"))["metrics.tsv"].decode()
    assert "good\tok" in table and "bad\tfailed" in table and "image is constant" in table


def _wait_for_registration(work: Path, subject: str, timeout: float = 240) -> None:
    log = work / f"logs/{subject}/register.log"
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.exists() and "stage moments" in log.read_text()):
        time.sleep(0.3)
    assert log.exists() and "stage moments" in log.read_text(), "registration never started"


def _register_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", r"\.register\.py"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("how", ["job_sigkill", "job_sigterm", "run_sigkill"])
def test_killed_registration_leaves_nothing_complete_and_rerun_finishes(
    tmp_path, how, make_project, snakemake, snakemake_cmd
):
    """The registration job killed mid-way (the OOM killer: SIGKILL; a scheduler: SIGTERM), or the whole
    run killed: no transform that Snakemake would take as complete, and the next run finishes the work."""
    slow = [{"type": "moments"}, {"type": "rigid", "loss": "mi", "scales": [1], "iterations": [20000], "tolerance": 0}]
    work = make_project(tmp_path, {"a": ("r64", "r16")}, stages=slow)
    cmd = snakemake_cmd(work, "--cores", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_registration(work, "a")
        if how == "run_sigkill":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            pids = _register_pids()
            assert pids, "no registration process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL if how == "job_sigkill" else signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    tdir = work / "results/a/transforms"
    assert not (tdir / "affine.mat").exists() and not (tdir / "registration.json").exists()
    assert not (tdir.exists() and list(tdir.glob(".*"))), "a temporary file survived"
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["registration"]["stages"] = FAST
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    if how == "run_sigkill":  # Snakemake's own lock survives a killed run, as documented by Snakemake
        assert snakemake(work, "--unlock").returncode == 0
    done = snakemake(work, "--rerun-incomplete")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sitk.ReadTransform(str(tdir / "affine.mat")).GetDimension() == 2


def test_reprocessing_reruns_exactly_what_changed(tmp_path, make_project, snakemake, planned):
    work = make_project(tmp_path, {"a": ("r64", "r16"), "b": ("r64", "r27")})
    assert snakemake(work).returncode == 0
    assert planned(work) == {}
    cfg_path = work / "config.yaml"
    base = yaml.safe_load(cfg_path.read_text())

    # a QC option: only QC and the cohort
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["qc"] = {"dpi": 80}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert planned(work) == {"qc_subject": 2, "qc_masks": 2, "cohort": 1, "all": 1}

    # a registration parameter: registration and everything after it, for every subject, no masks
    cfg = dict(base)
    cfg["registration"] = {"stages": FAST[:1] + [dict(FAST[1], iterations=[15, 10])]}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert planned(work) == {"register": 2, "warp_image": 2, "qc_subject": 2, "cohort": 1, "all": 1}
    cfg_path.write_text(yaml.safe_dump(base))
    assert planned(work) == {}

    # a new subject: only its jobs (and the cohort)
    write_cohort(work, {"a": ("r64", "r16"), "b": ("r64", "r27"), "c": ("r16", "r27")})
    assert planned(work) == {
        "prepare_mask": 2,
        "register": 1,
        "warp_image": 1,
        "qc_subject": 1,
        "qc_masks": 1,
        "cohort": 1,
        "all": 1,
    }
    write_cohort(work, {"a": ("r64", "r16"), "b": ("r64", "r27")})

    # one subject's input edited: only that subject (r27 is b's moving image only)
    img = sitk.ReadImage(str(work / "r27.nii.gz"))
    time.sleep(1.1)
    sitk.WriteImage(sitk.Cast(sitk.Cast(img, sitk.sitkFloat32) * 1.01, img.GetPixelID()), str(work / "r27.nii.gz"))
    jobs = planned(work)
    assert jobs.get("register") == 1 and jobs.get("prepare_mask") == 1 and jobs.get("qc_masks") == 1
    proc = snakemake(work, "-n")
    assert "subject=b" in proc.stdout and "subject=a" not in proc.stdout


def test_same_inputs_same_transforms(tmp_path, make_project, snakemake):
    work = make_project(
        tmp_path,
        {"a": ("r64", "r16")},
        stages=FAST + [{"type": "syn", "loss": "cc", "scales": [2, 1], "iterations": [10, 5]}],
    )
    assert snakemake(work).returncode == 0
    first = [
        np.array(sitk.ReadTransform(str(work / "results/a/transforms/affine.mat")).GetParameters()),
        sitk.GetArrayFromImage(sitk.ReadImage(str(work / "results/a/transforms/warp.nii.gz"))),
    ]
    assert snakemake(work, "--forcerun", "register").returncode == 0
    again = [
        np.array(sitk.ReadTransform(str(work / "results/a/transforms/affine.mat")).GetParameters()),
        sitk.GetArrayFromImage(sitk.ReadImage(str(work / "results/a/transforms/warp.nii.gz"))),
    ]
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_batched_registration_keeps_per_subject_results_and_failures(tmp_path, make_project, snakemake, planned):
    """resources.register.batch_size: 2 registers two subjects per job in one process; the subjects' files
    equal a one-job-per-subject run's, a failed subject fails alone (in the middle of a batch), and a rerun
    plans only what is left."""
    rows = {"a": ("r64", "r16"), "bad": ("r64", "const"), "c": ("r64", "r27")}
    (tmp_path / "single").mkdir()
    (tmp_path / "batched").mkdir()
    single = make_project(tmp_path / "single", rows)
    batched = make_project(tmp_path / "batched", rows)
    cfg = yaml.safe_load((batched / "config.yaml").read_text())
    cfg["resources"] = {"register": {"batch_size": 2}}
    (batched / "config.yaml").write_text(yaml.safe_dump(cfg))
    for work in (single, batched):
        proc = snakemake(work)
        assert proc.returncode != 0 and "1 of 3 subject(s) failed" in proc.stderr, proc.stderr[-2000:]
    # one job registered a and bad, another c; the per-subject jobs only published
    assert sorted(p.name for p in (batched / "results/.batches").iterdir()) == ["batch0000", "batch0001"]
    status = yaml.safe_load((batched / "results/.batches/batch0000/status.json").read_text())
    assert status["a"]["ok"] and not status["bad"]["ok"] and "constant" in status["bad"]["error"]
    for s in ("a", "c"):
        one = sitk.ReadTransform(str(single / f"results/{s}/transforms/affine.mat"))
        two = sitk.ReadTransform(str(batched / f"results/{s}/transforms/affine.mat"))
        assert np.allclose(one.GetParameters(), two.GetParameters(), atol=1e-5), s
        assert (batched / f"results/{s}/qc/registration.png").exists()
        assert "registered on cpu" in (batched / f"logs/{s}/register.log").read_text()
    assert "image is constant" in (batched / "logs/bad/register.log").read_text().splitlines()[-1]
    m = pd.read_csv(batched / "results/cohort/metrics.tsv", sep="\t", keep_default_na=False).set_index("subject")
    assert list(m.status) == ["ok", "failed", "ok"] and "constant" in m.loc["bad", "error"]
    # the batches are up to date: a rerun would only publish bad again (and fail again)
    plan = planned(batched)
    assert "register_batch" not in plan and plan.get("register") == 1, plan
    # a registration setting changes: both batches and every subject's registration are planned again
    cfg["registration"]["stages"][1]["iterations"] = [25, 10]
    (batched / "config.yaml").write_text(yaml.safe_dump(cfg))
    plan = planned(batched)
    assert plan.get("register_batch") == 2 and plan.get("register") == 3, plan
