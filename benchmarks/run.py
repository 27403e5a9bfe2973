"""One entry point for the speed suites: runs the benchmark scripts in sequence and appends what they print,
with the device, date and commit, to benchmarks/RESULTS.md.

    python benchmarks/run.py --suite cpu     # 2 mm brain + AFIDs + the 2D slice pair deformable, 2 mm linear
    python benchmarks/run.py --suite gpu     # the deformable pairs at 2 and 1 mm, maskreg and FireANTs on CUDA
    python benchmarks/run.py --suite cohort  # fixed cost per Snakemake job on the demo cohort
    python benchmarks/run.py --suite cpu --dry-run   # print the commands only

Peers (ANTsPy, FireANTs) are optional and installed by you (`pip install antspyx fireants`); a missing one
gets a "not installed" row. Every script measures each method in its own fresh worker process, in one run, so
the ratios in a table compare like with like. See benchmarks/README.md for what each script measures.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

SUITES: dict[str, list[list[str]]] = {
    "cpu": [
        ["bench_deformable.py", "--res", "2", "--device", "cpu"],
        ["bench_linear.py", "--res", "2", "--repeats", "1", "--methods", "maskreg", "ants", "fireants"],
    ],
    "gpu": [
        [
            "bench_deformable.py",
            "--res",
            "2",
            "1",
            "--device",
            "cuda",
            "--repeats",
            "2",
            "--methods",
            "maskreg",
            "maskreg-fast",
            "fireants",
            "ants-syn",
        ],
    ],
    "cohort": [["bench_cohort.py", "--cores", "1"], ["bench_cohort.py", "--cores", "1", "--batch-size", "6"]],
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--suite", choices=list(SUITES), required=True)
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="file to append to (default RESULTS.md)")
    args = ap.parse_args()
    cmds = [[sys.executable, str(HERE / c[0]), *c[1:]] for c in SUITES[args.suite]]
    if args.dry_run:
        print("\n".join(" ".join(c) for c in cmds))
        return
    head = (
        f"\n## suite {args.suite}: {datetime.date.today().isoformat()}, commit {common.commit()}\n\n"
        f"device: {common.device_note()}\n"
    )
    print(head)
    chunks = [head]
    status = 0
    for cmd in cmds:
        print("$ " + " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd)), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("running "))
        print(out)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            status = proc.returncode
        chunks.append(
            f"\n`{' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}` "
            f"(exit {proc.returncode})\n\n```\n{out.strip()}\n```\n"
        )
    with open(args.results, "a") as fh:
        fh.write("".join(chunks))
    print(f"appended to {args.results}")
    sys.exit(status)


if __name__ == "__main__":
    main()
