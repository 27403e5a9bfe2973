"""Cohort throughput: the fixed cost of every Snakemake job (interpreter, imports, file I/O) against the
registration itself, on the demo cohort (or any config), one job at a time.

    python benchmarks/bench_cohort.py [--cores 1] [--batch-size 1] [--configfile config/config.yaml] [--workdir DIR]

It runs the whole workflow in a fresh working directory (default: a new folder under benchmarks/out/cohort),
then reads every job's Snakemake ``benchmark:`` file (``logs/{subject}/*.benchmark.tsv``: wall seconds of the
job, script start-up included) and every subject's ``registration.json`` (``seconds``: the registration call
alone). Fixed cost of a register job = job wall time − registration time. It also times a bare
``python -c "import maskreg.engine, SimpleITK, torch"`` (best of 3): the floor every job pays. With
``--batch-size N`` the workflow registers N subjects per job (``resources.register.batch_size``); a batch
job's wall time is shared equally among its subjects.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

REPO = common.HERE.parent


def import_floor(repeats: int = 3) -> float:
    """Best wall time (s) of a fresh interpreter importing what a register job imports."""
    cmd = [sys.executable, "-c", "import maskreg.engine, SimpleITK, torch"]
    return common.measure(lambda: subprocess.run(cmd, check=True), repeats)["best_s"]


def job_seconds(workdir: Path) -> dict[tuple[str, str], float]:
    """(subject, job name) -> wall seconds, from the jobs' benchmark files."""
    out = {}
    for f in sorted((workdir / "logs").glob("*/*.benchmark.tsv")):
        lines = f.read_text().splitlines()
        if len(lines) >= 2:
            header, values = lines[0].split("\t"), lines[1].split("\t")
            out[(f.parent.name, f.name.replace(".benchmark.tsv", ""))] = float(values[header.index("s")])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cores", type=int, default=1, help="Snakemake --cores (default 1: jobs never overlap)")
    ap.add_argument("--configfile", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--cohort", default=str(REPO / "config" / "cohort.tsv"))
    ap.add_argument("--workdir", help="run here (default: a new folder under benchmarks/out/cohort)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="resources.register.batch_size: subjects per registration job (default 1)",
    )
    args = ap.parse_args()
    print(common.machine_note())
    floor = import_floor()
    print(f"fresh interpreter + imports (maskreg.engine, SimpleITK, torch): {floor:.2f} s (best of 3)")
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        (common.OUT / "cohort").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=common.OUT / "cohort"))
    overlay = work / "batch.yaml"  # merged over --configfile: only resources.register.batch_size changes
    overlay.write_text(f"resources:\n  register:\n    batch_size: {args.batch_size}\n")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(work),
        "--configfile",
        args.configfile,
        str(overlay),
        "--config",
        f"cohort={os.path.abspath(args.cohort)}",
        "--cores",
        str(args.cores),
        "--keep-going",
        "--quiet",
        "rules",
    ]
    proc, wall = common.timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    print(
        f"workflow: {wall:.1f} s wall with --cores {args.cores} (exit {proc.returncode}) in {common.shown_path(work)}"
    )
    if proc.returncode:
        print(proc.stderr[-2000:])
    jobs = job_seconds(work)
    # batch mode: the batch jobs' time is shared among their subjects (logs/batches/{batch}.benchmark.tsv),
    # each subject's `register` job only publishes files (a local job without a benchmark file)
    batches = {name: v for (s, name), v in jobs.items() if s == "batches"}
    jobs = {k: v for k, v in jobs.items() if k[0] != "batches"}
    if batches:
        for b in sorted(work.glob("results/.batches/*/status.json")):
            st = json.loads(b.read_text())
            for subject in st:
                jobs[(subject, "register")] = batches.get(b.parent.name, 0.0) / len(st)
        print(
            f"batches: {len(batches)} job(s) of up to {args.batch_size} subjects, "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(batches.items()))
        )
    rows, reg_total, reg_jobs = [], 0.0, 0.0
    for rep in sorted(work.glob("results/*/transforms/registration.json")):
        subject = rep.parent.parent.name
        seconds = json.loads(rep.read_text())["seconds"]
        job = jobs.get((subject, "register"))
        if job is None:
            continue
        reg_total += seconds
        reg_jobs += job
        others = sum(v for (s, name), v in jobs.items() if s == subject and name != "register")
        per_subject = not batches  # a batch's fixed cost is the batch's, not any one subject's
        rows.append(
            {
                "subject": subject,
                "job": f"{job:.2f}" if per_subject else "(in its batch)",
                "reg": f"{seconds:.2f}",
                "fixed": f"{job - seconds:.2f}" if per_subject else "-",
                "share": f"{100 * (job - seconds) / job:.0f} %" if per_subject else "-",
                "others": f"{others:.2f}",
                "n_others": str(sum(1 for (s, name) in jobs if s == subject and name != "register")),
            }
        )
    print()
    print(
        common.format_table(
            rows,
            [
                ("subject", "subject"),
                ("job", "register job s"),
                ("reg", "registration s"),
                ("fixed", "fixed cost s"),
                ("share", "fixed share"),
                ("n_others", "other jobs"),
                ("others", "other jobs s"),
            ],
        )
    )
    all_jobs = sum(jobs.values())
    if reg_jobs:
        share = 100 * (reg_jobs - reg_total) / reg_jobs
        print(
            f"\nregister jobs: {reg_jobs:.1f} s in all, of which registration {reg_total:.1f} s; fixed cost "
            f"{reg_jobs - reg_total:.1f} s = {share:.0f} % of register job time"
        )
        print(
            f"all {len(jobs)} per-subject jobs: {all_jobs:.1f} s; registration is {100 * reg_total / all_jobs:.0f} % "
            f"of it; Snakemake's own scheduling adds {wall - all_jobs:.1f} s to the wall time"
        )
        if batches:
            print(
                f"verdict: with batches of {args.batch_size}, fixed cost is {share:.0f} % of register job time "
                f"(one interpreter and its imports per batch)"
            )
        else:
            print(
                "verdict: "
                + (
                    "fixed cost above 10 % of register job time: resources.register.batch_size > 1 "
                    "(several subjects per warm process) pays, see --batch-size"
                    if share > 10
                    else "fixed cost below 10 %"
                )
            )


if __name__ == "__main__":
    main()
