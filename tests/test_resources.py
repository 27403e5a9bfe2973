"""Resources the jobs declare, read from Snakemake's dry-run job listing (no cluster, no jobs run).

The register rule asks for `gpu` (and `gpu_model` when the config names one) unless the config says
`device: cpu`; mem_mb/runtime/threads come from config["resources"]["register"]; no other rule asks for a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

GPU_RULES = {"register"}


def dry_run(
    repo: Path,
    snakemake,
    work: Path,
    *,
    device: str,
    gpu_model: str | None,
    mem_mb: int,
    runtime: int,
    threads: int,
    gpu: int = 1,
) -> dict[str, list[dict[str, str]]]:
    """Resources (plus threads) of every planned job, by rule (``snakemake``: the fixture that runs the workflow)."""
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    cfg["device"] = device
    cfg["resources"]["register"].update(gpu=gpu, gpu_model=gpu_model, mem_mb=mem_mb, runtime=runtime, threads=threads)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    # --cores 8: threads up to 8 are shown as declared (Snakemake caps them at --cores)
    proc = snakemake(work, "-n", "--cores", "8", "--workflow-profile", "none", profile=None, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return parse_jobs(proc.stdout)


def parse_jobs(listing: str) -> dict[str, list[dict[str, str]]]:
    jobs: dict[str, list[dict[str, str]]] = {}
    current: dict[str, str] | None = None
    for line in listing.splitlines():
        head = line.strip()
        if head.endswith(":") and head.split()[0] in ("rule", "localrule") and len(head.split()) == 2:
            current = {}
            jobs.setdefault(head.split()[1].rstrip(":"), []).append(current)
        elif current is not None and head.startswith("resources: "):
            for item in head[len("resources: ") :].split(", "):
                key, _, value = item.partition("=")
                current[key] = value
        elif current is not None and head.startswith("threads: "):
            current["threads"] = head.split()[1]
    return jobs


CASES = [  # device, gpu_model, mem_mb, runtime, threads
    ("auto", None, 8000, 60, 2),
    ("auto", "a100", 3000, 15, 4),
    ("cpu", None, 3000, 15, 4),
    ("cpu", "a100", 8000, 60, 2),
]


@pytest.mark.parametrize("device,gpu_model,mem_mb,runtime,threads", CASES)
def test_register_resources_follow_the_config(tmp_path, repo, snakemake, device, gpu_model, mem_mb, runtime, threads):
    jobs = dry_run(
        repo, snakemake, tmp_path, device=device, gpu_model=gpu_model, mem_mb=mem_mb, runtime=runtime, threads=threads
    )
    assert len(jobs["register"]) == len(pd.read_csv(repo / "config/cohort.tsv", sep="\t", dtype=str))
    for job in jobs["register"]:
        # mem_mb/runtime are callables of the attempt: the first attempt asks for the configured values
        assert job["mem_mb"] == str(mem_mb) and job["runtime"] == str(runtime), job
        assert job.get("threads") == str(threads), job
        if device == "cpu":
            assert "gpu" not in job and "gpu_model" not in job, job
        else:
            assert job["gpu"] == "1", job
            assert job.get("gpu_model") == gpu_model, job
    for rule, listed in jobs.items():
        if rule not in GPU_RULES:
            for job in listed:
                assert "gpu" not in job and "gpu_model" not in job, (rule, job)


def test_no_gpu_requested_when_the_config_asks_for_none(tmp_path, repo, snakemake):
    jobs = dry_run(
        repo, snakemake, tmp_path, device="auto", gpu_model="a100", mem_mb=4000, runtime=30, threads=2, gpu=0
    )
    assert all("gpu" not in j and "gpu_model" not in j for listed in jobs.values() for j in listed)


# a Snakefile that includes the workflow's and prints the register rule's mem_mb and runtime at attempts 1-3, as
# Snakemake evaluates resource callables (wildcards positional, the rest by the names they ask for)
ATTEMPT_PROBE = """include: "{snakefile}"

import json

reg = rules.register.rule
values = {{
    attempt: {{
        name: reg.resources[name].evaluate({{}}, attempt=attempt, input=[], threads=2).value
        for name in ("mem_mb", "runtime")
    }}
    for attempt in (1, 2, 3)
}}
print("ATTEMPTS " + json.dumps(values))
"""


def test_register_memory_and_time_grow_with_the_attempt(tmp_path, repo, snakemake):
    """The callables behind `--retries`: attempt n asks for n times the configured mem_mb and runtime."""
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    cfg["resources"]["register"].update(mem_mb=3000, runtime=15)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "probe.smk").write_text(ATTEMPT_PROBE.format(snakefile=repo / "Snakefile"))
    proc = snakemake(
        tmp_path,
        "--list-rules",
        "--workflow-profile",
        "none",
        profile=None,
        snakefile=tmp_path / "probe.smk",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ATTEMPTS "))
    got = json.loads(line[len("ATTEMPTS ") :])
    assert got == {str(a): {"mem_mb": 3000 * a, "runtime": 15 * a} for a in (1, 2, 3)}


def _matrix_project(tmp: Path, demo: Path, stages: list[dict], device: str) -> Path:
    """A cohort of four subjects: nothing extra; masks; labels; landmarks (files are the demo's)."""
    b, h, t = demo / "antspy_brain2d", demo / "elastix_ct2d_head", demo / "brain3d"
    (tmp / "f.csv").write_text("x,y\n10,20\n100,120\n")
    (tmp / "m.csv").write_text("x,y\n12,21\n98,118\n")
    rows = [
        ["plain", b / "r64.nii.gz", b / "r16.nii.gz", "", "", "", "", "", ""],
        [
            "masked",
            h / "fixed.nii.gz",
            h / "moving.nii.gz",
            h / "fixed_mask.nii.gz",
            h / "moving_mask.nii.gz",
            "",
            "",
            "",
            "",
        ],
        [
            "labelled",
            t / "mni_image.nii.gz",
            t / "vxm_image.nii.gz",
            "",
            "",
            t / "mni_labels.nii.gz",
            t / "vxm_labels.nii.gz",
            "",
            "",
        ],
        ["landmarks", b / "r64.nii.gz", b / "r27.nii.gz", "", "", "", "", tmp / "f.csv", tmp / "m.csv"],
    ]
    cols = [
        "subject",
        "fixed",
        "moving",
        "fixed_mask",
        "moving_mask",
        "fixed_labels",
        "moving_labels",
        "fixed_landmarks",
        "moving_landmarks",
    ]
    pd.DataFrame(rows, columns=cols).to_csv(tmp / "cohort.tsv", sep="\t", index=False)
    cfg = {"cohort": str(tmp / "cohort.tsv"), "device": device, "registration": {"stages": stages}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


LINEAR = [{"type": "moments"}, {"type": "affine", "loss": "mi"}]
DEFORMABLE = LINEAR + [{"type": "syn", "loss": "cc"}]


@pytest.mark.parametrize("stages", [LINEAR, DEFORMABLE], ids=["linear", "syn"])
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_dry_run_matrix_plans_the_right_jobs_files_and_resources(tmp_path, snakemake, demo, stages, device):
    work = _matrix_project(tmp_path, demo, stages, device)
    proc = snakemake(work, "-n", "--cores", "8", "--printshellcmds", profile=None, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = parse_jobs(proc.stdout)
    counts = {rule: len(v) for rule, v in jobs.items()}
    assert counts == {
        "prepare_mask": 8,
        "register": 4,
        "warp_image": 4,
        "warp_labels": 1,
        "qc_masks": 4,
        "qc_subject": 4,
        "cohort": 1,
        "all": 1,
    }
    for rule, listed in jobs.items():
        for res in listed:
            if rule in GPU_RULES and device != "cpu":
                assert res.get("gpu") == "1"
            else:
                assert "gpu" not in res, (rule, res)
    out = proc.stdout
    deformable = stages is DEFORMABLE
    assert ("transforms/warp.nii.gz" in out) == deformable
    assert ("transforms/inverse_warp.nii.gz" in out) == deformable
    # labels and landmarks reach QC only for the subjects that have them
    qc_inputs = [b for b in out.split("\nrule ") if b.startswith("qc_subject:")]
    with_labels = [b for b in qc_inputs if "vxm_labels.nii.gz" in b]
    with_landmarks = [b for b in qc_inputs if "f.csv" in b and "m.csv" in b]
    assert len(with_labels) == 1 and "results/labelled/warped/labels.nii.gz" in with_labels[0]
    assert len(with_landmarks) == 1 and "subject=landmarks" in with_landmarks[0]
