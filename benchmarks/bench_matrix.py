"""Differential matrix (issue 25): real pairs x stage types x losses x mask situations x sampling x code path,
every cell compared with ANTsPy under the same masks, measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_matrix.py [--quick] [--pairs P ...] [--only SUBSTR ...] [--threads 1]
[--no-cuda] [--list]``.

Cells, data, the ANTsPy settings, the evaluation and the criteria are in ``matrix_cells.py`` (shared with
``tests/test_matrix.py``, which runs the ``--quick`` subset). The script prints one row per cell as it
finishes, then the whole table sorted as the cells were defined, the failing cells with their reasons, and
the totals. A cell's exception is a FAIL row with the error; the table always prints. The exit status is 0
(this is a benchmark); ``--strict`` makes it 1 when a cell fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset (tests/test_matrix.py)")
    ap.add_argument("--pairs", nargs="*", help="keep the cells of these pairs only")
    ap.add_argument("--only", nargs="*", help="keep the cells whose id contains every one of these strings")
    ap.add_argument("--threads", type=int, default=1, help="threads for maskreg, ITK and ANTs (default 1)")
    ap.add_argument("--no-cuda", action="store_true", help="leave out the CUDA cells even when a GPU is there")
    ap.add_argument("--list", action="store_true", help="print the cells and exit")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a cell fails")
    args = ap.parse_args()

    common.set_threads(args.threads)  # before numpy/torch/ITK/ANTs are imported
    import matrix_cells as mx

    mx.configure_threads(args.threads)

    cuda = False if args.no_cuda else mx.cuda_available()
    cells = mx.quick_cells(cuda) if args.quick else mx.full_cells(cuda)
    if args.pairs:
        cells = [c for c in cells if c.pair in args.pairs]
    if args.only:
        cells = [c for c in cells if all(s in c.id for s in args.only)]
    if args.list:
        try:  # one write: `--list | head` reads it whole
            print("\n".join([c.id for c in cells] + [f"{len(cells)} cells"]), flush=True)
        except BrokenPipeError:  # the reader left early: nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    ok, ants_version = common.peer_status("ants")
    print(common.machine_note())
    import torch

    import maskreg
    from maskreg.engine import cpu_kernels

    print(f"working tree: commit {common.commit(changed_sources=True)}")
    print(
        f"maskreg {maskreg.__version__}, torch {torch.__version__}, ANTsPy {ants_version}; "
        f"{args.threads} thread(s); CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no (cells left out)'}; "
        f"{'quick subset' if args.quick else 'full matrix'}: {len(cells)} cells"
    )
    if not ok:
        print(f"ANTsPy is needed for the reference: {ants_version}")
        return 1
    t_all = time.perf_counter()
    cpu_kernels.warm_up()  # load the compiled kernels once, not inside the first cell's timing
    for name in dict.fromkeys(c.pair for c in cells):
        p = mx.load_pair(name)
        print(
            f"pair {name}: fixed {p.fixed.GetSize()} at {p.fixed.GetSpacing()[0]:g} mm, moving "
            f"{p.moving.GetSize()}; metric {p.metric}; {p.note}"
        )
    print(f"random sampling: {mx.RANDOM_POINTS} points; margin vs ANTsPy {mx.MARGIN} (cc, mi, moments)\n", flush=True)

    rows = []
    for i, cell in enumerate(cells, 1):
        row = mx.run_cell(cell, threads=args.threads)
        rows.append(row)
        r = mx.format_rows([row])[0]
        print(
            f"[{i}/{len(cells)} {time.perf_counter() - t_all:6.0f} s] {row['status']:6s} {cell.id}: "
            f"{r.get('metric', '')} maskreg {r['mr_f']} ANTsPy {r['ants_f']} linear {r['lin_f']} "
            f"fold% {r['fold_f']} ({r['mr_s_f']} s / {r['ants_s_f']} s) {row['reason']}",
            flush=True,
        )
        if row.get("error"):
            print("    " + row["error"].strip().replace("\n", "\n    "), flush=True)
    total = time.perf_counter() - t_all

    print("\n## Differential matrix\n")
    print(mx.table(rows))
    failing = [r for r in rows if r["status"] != "PASS"]
    if failing:
        print("\n## Cells not passing\n")
        for r in failing:
            print(f"- {r['status']} {r['id']}: {r['reason']}")
    print(f"\n{mx.summary(rows)}; total {total:.0f} s")
    return 1 if args.strict and any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
