"""Where maskreg's time goes on one real pair: seconds per stage and level, then torch.profiler's top operators.

Run: ``.venv/bin/python benchmarks/profile_engine.py [--pair brain] [--res 2] [--device cpu|cuda]
[--stages YAML] [--repeats 2] [--top 25] [--no-profile]``.

The pair and its preparation are bench_deformable's (``brain``: MNI ICBM152 2009a <- the voxelmorph test
T1, both masked; ``afids``: MNI152NLin6Asym <- Colin27). The first call warms up (CUDA context, cuDNN/cuFFT
handles, allocator); the next ``--repeats`` are timed, then one more runs under the profiler. On CUDA the
table is sorted by the operators' own GPU time, and the number of kernel launches per iteration is printed:
many small launches with a busy CPU mean the run is bound by launch overhead, not by the GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pair", default="brain", choices=["brain", "afids"])
    ap.add_argument("--res", type=int, default=2, choices=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", default=None, help="YAML/JSON stage list (default: config/config.yaml's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()

    import torch
    import yaml

    import bench_deformable as bd
    import common

    stages = yaml.safe_load(args.stages) if args.stages else common.default_stages()
    paths = bd.prepare([args.res], [args.pair])[(args.pair, args.res)]
    f, m, fm, mm = common.read_pair(paths)
    cuda = args.device.startswith("cuda")
    print(
        f"{args.pair} at {args.res} mm, fixed {f.GetSize()}, moving {m.GetSize()}, device {args.device}, "
        f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}"
    )
    print("stages: " + common.stages_text(stages))

    # the first call warms up (the engine's import, the kernels, CUDA's context and handles): timed on its own
    run = common.maskreg_call(f, m, fm, mm, stages, device=args.device, warm=False, threads=args.threads, seed=0)
    res, seconds = common.timed(run)
    print(f"warm-up call: {seconds:.2f} s")
    meas = common.measure(run, args.repeats, args.device)
    res = meas["result"]
    print(
        "timed calls: "
        + ", ".join(f"{t:.3f}" for t in meas["times_s"])
        + " s"
        + (f"; peak GPU memory {meas['gpu_peak_mb']:.0f} MB" if cuda else "")
    )
    n_it = 0
    for s in res.stages:
        lv = "; ".join(f"{'x'.join(map(str, x.shape))}: {x.iterations} it {x.seconds:.3f} s" for x in s.levels)
        n_it += sum(x.iterations for x in s.levels)
        print(f"  {s.type:8s} {s.seconds:7.3f} s  {lv}")
    print(
        "  phases: "
        + ", ".join(f"{k} {v:.3f} s" for k, v in res.phase_seconds.items())
        + f"; whole call {res.seconds:.3f} s"
    )
    _, seconds = common.timed(lambda: res.displacement)  # the first read makes both fields' SimpleITK images
    print(f"  then both fields to SimpleITK images on first read: {seconds:.3f} s")
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        run()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    if cuda:
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = (
            sum(e.device_time for e in kernels) / 1e6
            if kernels and hasattr(kernels[0], "device_time")
            else sum(e.cuda_time for e in kernels) / 1e6
        )
        print(
            f"CUDA kernels: {len(kernels)} launches, {len(kernels) / max(n_it, 1):.0f} per iteration "
            f"({n_it} iterations), GPU busy {busy:.3f} s of the call"
        )


if __name__ == "__main__":
    main()
