"""Demo subjects on a real single-node SLURM cluster, through profiles/slurm and the executor plugin.

Starts munged, slurmctld and slurmd of this machine (tests/slurm/cluster.sh; Debian's packages are installed
when missing and we are root, else the test is skipped with the reason), runs the workflow with the slurm
profile and checks that every job went through sbatch, that the register jobs asked SLURM for a GPU (a fake
gres device: `--gpus=1` is scheduled, torch sees no CUDA and the code falls back to the CPU) and that the
results equal a local run's. Needs root; takes a few minutes (a local and a SLURM run of three subjects).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

PLUGIN = "snakemake-executor-plugin-slurm"
PLUGIN_VERSION = "2.8.0"
SLURM_PACKAGES = ["munge", "slurmctld", "slurmd"]
SLURM_TOOLS = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol"]
CLUSTER = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
# one subject of each kind of the demo cohort: 2D without masks, 2D with the cohort's masks, 3D with labels
# (so warp_labels joins its subject_qc group); all five would double the time, each SLURM job re-running
# Snakemake
SUBJECTS = ["brain2d_r16", "headct2d", "abdomen3d"]
# SLURM jobs expected from profiles/slurm's groups: per subject one subject_masks group, one register job,
# one subject_qc group; then the cohort job (`all` is a local rule)
EXPECTED_JOBS = {"subject_masks": 3, "register": 3, "subject_qc": 3, "cohort": 1}


def sh(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}")


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


def ensure_slurm_installed() -> None:
    """Debian's munge/slurmctld/slurmd, installed with apt-get when missing; skip (saying why) if impossible."""
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if not missing:
        return
    why = f"SLURM test needs {', '.join(missing)} (Debian packages {' '.join(SLURM_PACKAGES)})"
    if os.geteuid() != 0:
        pytest.skip(
            f"{why}: not installed, and not running as root, so they cannot be installed "
            f"(run as root, or `apt-get install {' '.join(SLURM_PACKAGES)}` first)"
        )
    if shutil.which("apt-get") is None:
        pytest.skip(f"{why}: not installed, and there is no apt-get on this machine to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # keep the packages' maintainer scripts from starting the daemons (no init system here anyway)
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        upd = sh(["apt-get", "update", "-q"], timeout=180, env=env)
        if upd.returncode != 0:
            pytest.skip(f"{why}: `apt-get update` failed, so they cannot be installed:\n{tail(upd, 1500)}")
        inst = sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES], timeout=300, env=env)
        if inst.returncode != 0:
            pytest.skip(f"{why}: `apt-get install {' '.join(SLURM_PACKAGES)}` failed:\n{tail(inst, 1500)}")
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    still = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if still:
        pytest.skip(f"{why}: after installing {' '.join(SLURM_PACKAGES)}, still missing: {', '.join(still)}")


def ensure_plugin_installed() -> None:
    """The SLURM executor plugin in this interpreter's environment (pip-installed when missing)."""
    try:
        importlib.metadata.version(PLUGIN)
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    pip = sh([sys.executable, "-m", "pip", "install", "-q", f"{PLUGIN}=={PLUGIN_VERSION}"], timeout=240)
    if pip.returncode != 0:
        pytest.skip(
            f"SLURM test needs {PLUGIN}=={PLUGIN_VERSION}; `{sys.executable} -m pip install` failed:\n{tail(pip, 1500)}"
        )
    importlib.invalidate_caches()


def write_config(repo: Path, work: Path) -> None:
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cohort = pd.read_csv(repo / "config/cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    cohort = cohort[cohort.subject.isin(SUBJECTS)]
    for col in cohort.columns[1:]:  # paths are relative to the table's folder
        cohort[col] = [str((repo / "config" / v).resolve()) if v else "" for v in cohort[col]]
    work.mkdir(parents=True, exist_ok=True)
    cohort.to_csv(work / "cohort.tsv", sep="\t", index=False)
    cfg["cohort"] = str(work / "cohort.tsv")
    cfg["device"] = "auto"  # register jobs request a GPU; torch falls back to the CPU
    cfg["resources"]["register"].update(gpu=1, gpu_model=None, mem_mb=1000, runtime=30, threads=2)
    cfg["resources"]["default"].update(mem_mb=500, runtime=10)  # fits a small CI machine's memory
    # a lighter linear registration than the demo's (no full-resolution level): this test is about the
    # cluster mechanics, and both runs use the same settings
    cfg["registration"]["stages"] = [
        {"type": "moments"},
        {"type": "rigid", "loss": "mi", "scales": [4, 2], "iterations": [50, 25]},
        {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [50, 25]},
    ]
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))


def job_env(slurm_conf: Path | None = None) -> dict:
    """This interpreter's bin folder first on PATH: SLURM jobs (sbatch --export=ALL) re-run Snakemake."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if slurm_conf is not None:
        env["SLURM_CONF"] = str(slurm_conf)
    return env


def scontrol_jobs(env: dict) -> list[dict]:
    """Every job slurmctld still knows (MinJobAge keeps finished ones), as key=value dicts."""
    proc = sh(["scontrol", "-o", "show", "job"], timeout=30, env=env)
    assert proc.returncode == 0, tail(proc)
    jobs = []
    for line in proc.stdout.splitlines():
        if not line.strip() or line.startswith("No jobs"):
            continue
        # values may hold spaces only in fields we do not read (Command=...); split on ' Key='
        fields = dict(re.findall(r"(?:^|\s)([A-Za-z/:_]+)=(\S*)", line))
        jobs.append(fields)
    return jobs


@pytest.fixture(scope="module")
def slurm_runs(tmp_path_factory, repo, snakemake_cmd):
    """The demo cohort run locally and on the SLURM test cluster; yields both folders and cluster facts."""
    root = tmp_path_factory.mktemp("slurm")
    local, remote, state = root / "local", root / "slurm", root / "cluster"
    write_config(repo, local)
    write_config(repo, remote)
    t0 = time.monotonic()
    # pip must not touch the environment while jobs run (the test extra installs the plugin; this is a fallback)
    ensure_plugin_installed()
    # the local run goes first and overlaps with the apt installation and cluster start-up
    local_log = (root / "local.log").open("w")
    local_proc = subprocess.Popen(
        snakemake_cmd(local, "--cores", "2", "--workflow-profile", "none", profile=None),
        stdout=local_log,
        stderr=subprocess.STDOUT,
        env=job_env(),
        start_new_session=True,
    )
    stop_cluster = False
    env = job_env(state / "etc" / "slurm.conf")
    try:
        ensure_slurm_installed()
        stop_cluster = True
        # the node declares at least 4 CPUs (on 2 cores): jobs of 1-2 threads overlap, hiding start-up latency
        start = sh(
            ["bash", str(CLUSTER), "start", str(state)],
            timeout=120,
            env={**os.environ, "SLURM_TEST_CPUS": str(max(4, os.cpu_count() or 1))},
        )
        assert start.returncode == 0, "test cluster did not start:\n" + tail(start)
        t_cluster = time.monotonic()
        proc = sh(
            snakemake_cmd(
                remote,
                "--workflow-profile",
                "none",
                "--slurm-status-command",
                "squeue",
                "--slurm-init-seconds-before-status-checks",
                "1",
                "--slurm-keep-successful-logs",
                profile="slurm",
            ),
            timeout=540,
            env=env,
            cwd=remote,
        )
        t_slurm = time.monotonic()
        assert proc.returncode == 0, "SLURM run failed:\n" + tail(proc, 6000) + cluster_logs(state)
        try:
            rc = local_proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("local run did not finish in time")
        local_log.close()
        assert rc == 0, "local run failed:\n" + (root / "local.log").read_text()[-4000:]
        jobs = scontrol_jobs(env)
        ctld_log = (state / "slurmctld.log").read_text(errors="replace")
        print(
            f"\n[test_slurm] cluster up after {t_cluster - t0:.0f} s, SLURM run {t_slurm - t_cluster:.0f} s, "
            f"total {time.monotonic() - t0:.0f} s"
        )
        yield {"local": local, "slurm": remote, "jobs": jobs, "ctld_log": ctld_log, "snakemake": proc}
    finally:
        if local_proc.poll() is None:
            os.killpg(local_proc.pid, signal.SIGTERM)
            try:
                local_proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(local_proc.pid, signal.SIGKILL)
        local_log.close()
        if stop_cluster:
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, timeout=30, capture_output=True)
            stop = subprocess.run(
                ["bash", str(CLUSTER), "stop", str(state)], timeout=60, capture_output=True, text=True
            )
            if stop.returncode != 0:
                print(f"[test_slurm] cluster.sh stop failed: {stop.stderr[-2000:]}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


def cluster_logs(state: Path) -> str:
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        p = state / name
        if p.exists():
            out.append(f"\n--- {name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
    return "".join(out)


def job_kind(name: str) -> str:
    """The rule or group of a SLURM job from the plugin's --comment 'rule_<name>[_wildcards_<...>]' or its log
    folder '{rule,group}_<name>'; a group job's name is the group and its rules, e.g. subject_qc_qc_subject_..."""
    for kind in EXPECTED_JOBS:
        if re.match(rf"(rule|group)_{kind}(_|$)", name):
            return kind
    raise AssertionError(f"SLURM job {name!r} is none of {sorted(EXPECTED_JOBS)}")


def test_every_job_went_through_sbatch(slurm_runs):
    jobs = slurm_runs["jobs"]
    kinds = pd.Series([job_kind(j["Comment"]) for j in jobs]).value_counts().to_dict()
    assert kinds == EXPECTED_JOBS, kinds
    assert all(j["JobState"] == "COMPLETED" for j in jobs), [(j["JobId"], j["JobState"]) for j in jobs]
    # slurmctld logged one batch submission per job
    submitted = re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", slurm_runs["ctld_log"])
    assert sorted(submitted, key=int) == sorted((j["JobId"] for j in jobs), key=int)
    # and the plugin kept one SLURM log per job: .snakemake/slurm_logs/{rule,group}_<name>/<wildcards>/<id>.log
    logs = sorted((slurm_runs["slurm"] / ".snakemake/slurm_logs").rglob("*.log"))
    assert sorted(p.stem for p in logs) == sorted(j["JobId"] for j in jobs)
    folders = [p.relative_to(slurm_runs["slurm"] / ".snakemake/slurm_logs").parts[0] for p in logs]
    assert pd.Series(map(job_kind, folders)).value_counts().to_dict() == EXPECTED_JOBS
    assert all(f.startswith("group_") == f.startswith("group_subject_") for f in folders), folders
    # no rule but `all` ran in the submitting process
    assert re.findall(r"^localrule (\w+):", slurm_runs["snakemake"].stderr, re.M) == ["all"]


def test_register_jobs_requested_the_gpu_in_the_gpu_partition(slurm_runs):
    for j in slurm_runs["jobs"]:
        # sbatch --gpus=1 shows as TresPerJob=gres:gpu:1 (TRES lists what was allocated, without gres)
        tres = {k: j.get(k, "") for k in ("TresPerJob", "TRES")}
        gpu = any("gpu" in v for v in tres.values())
        if job_kind(j["Comment"]) == "register":
            assert j["Partition"] == "gpu", j
            assert tres["TresPerJob"] == "gres:gpu:1", tres
            assert "cpu=2," in tres["TRES"], tres  # threads: 2 in the test config -> --cpus-per-task=2
        else:
            assert not gpu and j["Partition"] == "main", (j["JobId"], j["Comment"], tres)
    for s in SUBJECTS:  # the fake GPU is no CUDA device: the code fell back to the CPU
        m = pd.read_csv(slurm_runs["slurm"] / f"results/{s}/qc/metrics.tsv", sep="\t")
        assert m.device.iloc[0] == "cpu"


def test_results_equal_the_local_run(slurm_runs):
    a = pd.read_csv(slurm_runs["local"] / "results/cohort/metrics.tsv", sep="\t").set_index("subject")
    b = pd.read_csv(slurm_runs["slurm"] / "results/cohort/metrics.tsv", sep="\t").set_index("subject")
    assert sorted(a.index) == sorted(b.index) == sorted(SUBJECTS)
    assert (b.status == "ok").all()
    numeric = [c for c in a.columns if c != "seconds" and pd.api.types.is_numeric_dtype(a[c])]
    assert "ncc_after" in numeric
    pd.testing.assert_frame_equal(
        a.loc[SUBJECTS, numeric], b.loc[SUBJECTS, numeric], check_exact=False, atol=1e-6, rtol=0
    )
    for s in SUBJECTS:
        ta = sitk.ReadTransform(str(slurm_runs["local"] / f"results/{s}/transforms/affine.mat"))
        tb = sitk.ReadTransform(str(slurm_runs["slurm"] / f"results/{s}/transforms/affine.mat"))
        np.testing.assert_allclose(ta.GetParameters(), tb.GetParameters(), atol=1e-6, err_msg=s)
        np.testing.assert_allclose(ta.GetFixedParameters(), tb.GetFixedParameters(), atol=1e-6, err_msg=s)


def test_profile_groups_each_subjects_small_jobs(tmp_path, repo, snakemake_cmd):
    """profiles/slurm on the whole demo cohort, dry run (no cluster): which jobs go out together, and where."""
    ensure_plugin_installed()
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = sh(
        snakemake_cmd(tmp_path, "--workflow-profile", "none", "-n", profile="slurm"),
        timeout=120,
    )
    assert proc.returncode == 0, tail(proc)
    out = proc.stdout
    n = len(pd.read_csv(repo / "config/cohort.tsv", sep="\t", dtype=str))
    groups = re.findall(r"Group job (\w+) \(jobs", out)
    assert sorted(groups) == ["subject_masks"] * n + ["subject_qc"] * n, groups
    rules = re.findall(r"^\s*(?:local)?rule (\w+):\n(?:.*\n)*?\s*resources: (.*)$", out, re.M)
    partitions = {
        (rule, m.group(1)) for rule, res in rules if rule != "all" and (m := re.search(r"slurm_partition=(\w+)", res))
    }
    assert partitions == {("register", "gpu")} | {
        (r, "main") for r in ("prepare_mask", "qc_masks", "warp_image", "warp_labels", "qc_subject", "cohort")
    }
