"""A small ROI in a large image: SyN on the ROI's box against SyN on the whole grid, same code, same run.

Run: ``.venv/bin/python benchmarks/bench_roi.py [--res 2] [--radius 15 25 40] [--threads 2] [--repeats 1]``.

The pair is bench_deformable's ``brain`` pair (MNI ICBM152 2009a <- the voxelmorph test T1). One affine
(moments -> rigid -> affine, brain masks) is computed first and given to every run as ``initial``; then each run
is one SyN stage (CC, window 5, scales [4, 2, 1], iterations [80, 40, 20]) whose fixed mask is a ball of
``--radius`` mm around the left hippocampus (MNI RAS (-26, -22, -14), LPS (26, 22, -14)), intersected with the
brain mask (a 15 mm ball has ~30 voxels at the 8 mm level: a level needs at most half its fixed mask to
overlap, so the default ``min_overlap_voxels`` does not stop it). ``box`` is maskreg as it is (deformable
levels on the mask's box plus a margin); ``whole grid`` forces the box to the whole level grid
(``maskreg.engine.roi_box`` replaced in this process, in the engine modules that call it), which is what the
engine did before. It prints, per radius: the voxels of the finest level, the SyN time of each, their ratio,
and how far the two fields differ inside the ROI (mean and max, mm).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

HIPPOCAMPUS_LPS = (26.0, 22.0, -14.0)
SYN = {"type": "syn", "loss": "cc", "window": 5, "scales": [4, 2, 1], "iterations": [80, 40, 20]}
COLUMNS = [
    ("radius", "ROI radius mm"),
    ("voxels", "ROI voxels"),
    ("box_shape", "finest level, box"),
    ("whole_shape", "finest level, whole grid"),
    ("box_s", "SyN s, box"),
    ("whole_s", "SyN s, whole grid"),
    ("ratio", "whole / box"),
    ("diff", "field difference in the ROI, mean / max mm"),
]


@contextlib.contextmanager
def whole_grid():
    """Deformable levels on the whole level grid: ``maskreg.engine.roi_box`` replaced, for this block, in every
    engine module that uses it (the package exports it from the module that calls it)."""
    import maskreg.engine as engine

    box = engine.roi_box
    modules = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("maskreg.engine") and getattr(m, "roi_box", None) is box
    ]

    def whole(grid, mask, margin):
        return grid, tuple(slice(0, n) for n in grid.shape)

    for m in modules:
        m.roi_box = whole
    try:
        yield
    finally:
        for m in modules:
            m.roi_box = box


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--res", type=int, default=2, choices=[1, 2])
    ap.add_argument("--radius", type=float, nargs="+", default=[15.0, 25.0, 40.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    common.set_threads(args.threads, libraries=True)
    import numpy as np
    import SimpleITK as sitk

    import bench_deformable as bd
    import maskreg

    paths = bd.prepare([args.res], ["brain"])[("brain", args.res)]
    f, m, fm, mm = common.read_pair(paths)
    linear = [s for s in common.default_stages() if s["type"] not in ("syn", "greedy")]
    affine = maskreg.register(f, m, fm, mm, stages=linear, device="cpu", threads=args.threads).linear
    print(
        f"brain pair at {args.res} mm: fixed {f.GetSize()} ({np.prod(f.GetSize()) / 1e6:.2f} M voxels), "
        f"{args.threads} threads, best of {args.repeats}; affine computed once, then SyN only"
    )

    brain = sitk.GetArrayFromImage(fm) > 0
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in f.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    mat = np.asarray(f.GetDirection()).reshape(3, 3) @ np.diag(f.GetSpacing())
    pts = idx @ mat.T + np.asarray(f.GetOrigin())
    dist = np.linalg.norm(pts - np.asarray(HIPPOCAMPUS_LPS), axis=1).reshape(f.GetSize()).transpose(2, 1, 0)

    rows = []
    for r in args.radius:
        roi = (dist < r) & brain
        roi_img = sitk.GetImageFromArray(roi.astype(np.uint8))
        roi_img.CopyInformation(fm)
        run = common.maskreg_call(f, m, roi_img, mm, [SYN], initial=affine, device="cpu", threads=args.threads)
        out = {}
        for name, where in (("box", contextlib.nullcontext), ("whole", whole_grid)):
            print(f"running radius {r:g} mm, {name} ...", flush=True)
            with where():
                meas = common.measure(run, args.repeats)
            res = meas["result"]
            out[name] = (meas["best_s"], res.stages[0].levels[-1].shape, sitk.GetArrayFromImage(res.displacement))
        diff = np.linalg.norm(out["box"][2][roi] - out["whole"][2][roi], axis=1)
        rows.append(
            {
                "radius": f"{r:g}",
                "voxels": int(roi.sum()),
                "box_shape": "×".join(map(str, out["box"][1])),
                "whole_shape": "×".join(map(str, out["whole"][1])),
                "box_s": f"{out['box'][0]:.1f}",
                "whole_s": f"{out['whole'][0]:.1f}",
                "ratio": f"{out['whole'][0] / out['box'][0]:.1f}",
                "diff": f"{diff.mean():.3f} / {diff.max():.3f}",
            }
        )
    print()
    print(common.format_table(rows, COLUMNS, markdown=True))


if __name__ == "__main__":
    main()
