"""What one register job costs in the workflow, against ANTsPy SyN on the same pair in the same run.

Run: ``.venv/bin/python benchmarks/bench_job.py [--res 2] [--threads 2] [--repeats 2]``.

The pair is bench_deformable's ``brain`` pair (MNI ICBM152 2009a <- the voxelmorph test T1, brain masks) at
``--res`` mm. Each repeat runs the real workflow on a one-row cohort in a fresh folder (config/config.yaml's
stages, device cpu, ``resources.register.threads`` = ``--threads``), so the register job is a fresh process,
as in a study, and reads back:

* ``registration s``: ``registration.json``'s ``seconds``, the ``maskreg.register`` call (what the issue calls
  the workflow's own seconds), with its phases and the first two levels of the first linear stage (seconds
  per iteration: the first level of a fresh process also pays the kernels' first calls);
* ``job s``: the register job's wall time from its Snakemake ``benchmark:`` file (interpreter, imports,
  reading, mask handling and writing included).

ANTsPy SyN (``type_of_transform="SyN"``, the same masks on every stage) runs in a fresh process too, with
ITK limited to ``--threads``; its time is the ``ants.registration`` call. The table's ratios are ANTsPy's time
over maskreg's registration and over the whole job (best of ``--repeats`` each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

REPO = HERE.parent


def pair_paths(res: int) -> dict[str, str]:
    import bench_deformable

    return bench_deformable.prepare([res], ["brain"])[("brain", res)]


def workflow_run(paths: dict[str, str], threads: int, folder: Path) -> dict:
    """The workflow on a one-row cohort in ``folder``: registration.json's figures and the register job's wall s."""
    import yaml

    folder.mkdir(parents=True)
    row = {"subject": "brain", **{k: paths[k] for k in ("fixed", "moving", "fixed_mask", "moving_mask")}}
    (folder / "cohort.tsv").write_text("\t".join(row) + "\n" + "\t".join(row.values()) + "\n")
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config.update(cohort=str(folder / "cohort.tsv"), device="cpu")
    config["resources"]["register"]["threads"] = threads
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(folder)]
    cmd += ["--configfile", str(folder / "config.yaml"), "--cores", str(threads), "--quiet", "all"]
    cmd += ["--", "results/brain/transforms/registration.json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the workflow failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    report = json.loads((folder / "results/brain/transforms/registration.json").read_text())
    bench = (folder / "logs/brain/register.benchmark.tsv").read_text().splitlines()
    job_s = float(dict(zip(bench[0].split("\t"), bench[1].split("\t"), strict=False))["s"])
    levels = [lv for st in report["stages"] for lv in st["levels"]][:2]
    per_it = [lv["seconds"] / max(lv["iterations"], 1) for lv in levels]
    return {"registration_s": report["seconds"], "job_s": job_s, "phases": report["phase_seconds"], "per_it": per_it}


ANTS_SCRIPT = """
import json, sys, time
import ants
p, out = json.loads(sys.argv[1]), sys.argv[2]
f, m = ants.image_read(p["fixed"], pixeltype="float"), ants.image_read(p["moving"], pixeltype="float")
fm, mm = ants.image_read(p["fixed_mask"]), ants.image_read(p["moving_mask"])
t = time.perf_counter()
ants.registration(f, m, type_of_transform="SyN", mask=fm, moving_mask=mm, mask_all_stages=True, outprefix=out,
                  random_seed=1)
print(time.perf_counter() - t)
"""


def ants_run(paths: dict[str, str], threads: int, folder: Path) -> float:
    """ANTsPy SyN in a fresh process limited to ``threads``: the registration call's seconds."""
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    folder.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-c", ANTS_SCRIPT, json.dumps(paths), str(folder / "ants_")],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=2, help="the pair's resolution, mm (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(common.machine_note())
    print(f"working tree: commit {common.commit(changed_sources=True)}")
    paths = pair_paths(args.res)
    runs, ants_s = [], []
    with tempfile.TemporaryDirectory(prefix="bench_job_") as tmp:
        for i in range(args.repeats):  # alternating, so drift on a shared machine hits both alike
            t = time.perf_counter()
            runs.append(workflow_run(paths, args.threads, Path(tmp) / f"wf{i}"))
            print(f"workflow run {i + 1}: {runs[-1]} ({time.perf_counter() - t:.1f} s in all)", flush=True)
            ants_s.append(ants_run(paths, args.threads, Path(tmp) / f"ants{i}"))
            print(f"ANTsPy SyN run {i + 1}: {ants_s[-1]:.2f} s", flush=True)
    best = min(runs, key=lambda r: r["registration_s"])
    job = min(r["job_s"] for r in runs)
    a = min(ants_s)
    rows = [
        {
            "pair": f"brain {args.res} mm",
            "registration s": f"{best['registration_s']:.2f}",
            "job s": f"{job:.2f}",
            "ANTsPy SyN s": f"{a:.2f}",
            "ANTsPy / registration": f"{a / best['registration_s']:.2f}",
            "ANTsPy / job": f"{a / job:.2f}",
            "first two levels, ms / iteration": " / ".join(f"{1000 * s:.0f}" for s in best["per_it"]),
        }
    ]
    cols = [(k, k) for k in rows[0]]
    print()
    print(common.format_table(rows, cols, markdown=True))
    print(f"\nphases of the best registration: {best['phases']}")


if __name__ == "__main__":
    main()
