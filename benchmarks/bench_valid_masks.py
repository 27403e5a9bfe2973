"""What ``kind: valid`` masks cost against ``kind: roi`` masks: the same registration of real pairs, same masks.

Run: ``.venv/bin/python benchmarks/bench_valid_masks.py [--pairs ct brain_mr] [--stages default|linear]
[--repeats 2] [--threads 2] [--device cpu] [--dense]``.

Pairs (from ``../shared/data`` or ``$MASKREG_DATA``):

* ``ct``: TotalSegmentator CT, ``ct_a`` (fixed, 122×101×30 at 3 mm) ← ``ct_b`` (moving, 512×512×20 at
  0.98×0.98×2 mm). The moving image's fine grid makes its level radii large (elastix's ``2 s + 1`` voxels at
  shrink ``s``, with ``s`` up to 12 in-plane at the 12 mm level).
* ``brain_mr``: pyradiomics brain MR, ``brain1`` (fixed) ← ``brain2`` (moving), 256×256×25 and ×23 at
  0.78×0.78×6.5 mm (strongly anisotropic radii).
* ``brain_t1`` (not run by default: minutes on 2 CPUs): MNI ICBM152 2009a (fixed, 197×233×189) ← the voxelmorph
  test T1 (moving, 160×192×224), 1 mm.

Masks: ``maskreg.masks.prepare_mask(image, missing="auto")`` on both images (the workflow's ``missing: auto``),
the same masks in both runs of a pair; only ``mask_kinds`` differs: ``("roi", "roi")`` or ``("valid",
"valid")``. Stages: the project's default list (``config/config.yaml``) or, with ``--stages linear``, its
moments and linear stages.

First table: ``time s`` = wall time of the ``maskreg.register`` call alone (images and masks loaded, the CPU
kernels warm), best of ``--repeats``; ``runs s`` = every call; ``cpu s`` = the process's CPU time for the call
(all threads), best of the runs: steadier than wall time on a machine that other work shares;
``iterations`` = over all stages and levels; ``erosion s`` = time spent in the valid masks' erosion per call
(``erode_voxels``, timed where the engine calls it); ``valid / roi`` = the valid row's best time over the roi
row's on the same pair (goal ≤ 1.2), ``valid / roi cpu`` the same for CPU time, ``valid / roi per iteration``
for ms / iteration (the stages stop on convergence, and valid masks, eroded at every level, can take more or
fewer iterations than roi masks).

Second table, one row per distinct erosion the valid runs asked for: the mask's shape and box radii (tensor
order, voxels), the time of ``erode_voxels``, and with ``--dense`` the previous implementation (one dense
``max_pool3d`` over the whole ``2 r + 1`` box; minutes for the ct moving mask) and whether both agree bit for
bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PAIRS = {
    "ct": ("totalseg_ct/ct_a/image.nii.gz", "totalseg_ct/ct_b/image.nii.gz"),
    "brain_mr": ("pyradiomics_brain_mr/brain1/image.nii.gz", "pyradiomics_brain_mr/brain2/image.nii.gz"),
    "brain_t1": ("mni_icbm152_2009a/template/image.nii.gz", "voxelmorph_brain_t1/test_scan/image.nii.gz"),
}
KINDS = ("roi", "valid")
COLUMNS = [
    ("pair", "pair"),
    ("kind", "masks"),
    ("time_s", "time s"),
    ("runs_s", "runs s"),
    ("cpu_s", "cpu s"),
    ("iterations", "iterations"),
    ("per_it", "ms / iteration"),
    ("erosion_s", "erosion s"),
    ("ratio", "valid / roi"),
    ("ratio_cpu", "valid / roi cpu"),
    ("ratio_it", "valid / roi per iteration"),
]
EROSION_COLUMNS = [
    ("pair", "pair"),
    ("shape", "mask shape"),
    ("radii", "radii"),
    ("sep_s", "erode_voxels s"),
    ("dense_s", "dense max-pool s"),
    ("equal", "equal"),
]


class ErosionLog:
    """Times every call of the engine's ``erode_voxels`` (replaced in :mod:`maskreg.engine.problem`, the module
    that calls it, while the log is active): ``calls`` holds ``(mask, radii, seconds)``."""

    def __init__(self, device: str):
        from maskreg.engine import problem

        self.module, self.original, self.calls = problem, problem.erode_voxels, []
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        def timed_erosion(mask, radii):
            t0 = time.perf_counter()
            out = self.original(mask, radii)
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.calls.append((mask, tuple(radii), time.perf_counter() - t0))
            return out

        self.module.erode_voxels = timed_erosion
        return self

    def __exit__(self, *exc):
        self.module.erode_voxels = self.original


def dense_erosion(mask, radii):
    """The previous ``erode_voxels``: one dense max-pool of the outside over the whole box (-inf padding, so
    outside the image counts as inside)."""
    import torch.nn.functional as F

    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[mask.dim() - 3]
    outside = (mask <= 0.5).to(mask.dtype)
    return 1.0 - pool(outside, kernel_size=tuple(2 * r + 1 for r in radii), stride=1, padding=tuple(radii))


def load(pair: str) -> tuple:
    """``(fixed, moving, fixed_mask, moving_mask)``: float32 images and their ``missing: auto`` masks."""
    import SimpleITK as sitk

    from maskreg.masks import prepare_mask

    paths = [common.DATA / p for p in PAIRS[pair]]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (set MASKREG_DATA to the shared/data folder)")
    fixed, moving = (sitk.ReadImage(str(p), sitk.sitkFloat32) for p in paths)
    return fixed, moving, prepare_mask(fixed, missing="auto"), prepare_mask(moving, missing="auto")


def run_pair(pair: str, stages: list[dict], args) -> tuple[list[dict], list[dict]]:
    """The roi and valid rows of one pair, and the erosion rows of its valid runs. The runs alternate (roi,
    valid, roi, valid, ...) so that a shared machine's drift weighs on both kinds alike."""
    fixed, moving, fm, mm = load(pair)
    print(f"{pair}: fixed {fixed.GetSize()}, moving {moving.GetSize()}; auto masks", flush=True)
    runs = {
        kind: common.maskreg_call(
            fixed, moving, fm, mm, stages, device=args.device, mask_kinds=(kind, kind), threads=args.threads, seed=0
        )
        for kind in KINDS
    }
    meas: dict[str, dict] = {kind: {"times_s": [], "cpu_s": []} for kind in KINDS}
    logs = {kind: ErosionLog(args.device) for kind in KINDS}
    for _ in range(max(1, args.repeats)):
        for kind in KINDS:
            cpu0 = time.process_time()
            with logs[kind]:
                one = common.measure(runs[kind], 1, args.device)
            meas[kind]["cpu_s"].append(time.process_time() - cpu0)
            meas[kind]["times_s"] += one["times_s"]
            meas[kind]["result"] = one["result"]
    rows = [kind_row(pair, kind, meas[kind], logs[kind].calls) for kind in KINDS]
    roi, valid = rows
    common.add_ratio([valid], roi["_t"], "ratio")
    valid["ratio_cpu"] = f"{valid['_cpu'] / roi['_cpu']:.2f}"
    valid["ratio_it"] = f"{valid['_it'] / roi['_it']:.2f}"
    return rows, erosion_rows(pair, logs["valid"].calls, args.dense)


def kind_row(pair: str, kind: str, meas: dict, erosions: list) -> dict:
    """One table row from a kind's runs (``times_s``, ``cpu_s``, the last ``result``) and its erosion calls."""
    meas["best_s"] = min(meas["times_s"])
    its = sum(sum(s["iterations"]) for s in common.stage_report(meas["result"]))
    row = {"pair": pair, "kind": kind, **common.timing_cells(meas, nd=2), "iterations": its}
    row["_cpu"] = min(meas["cpu_s"])
    row["cpu_s"] = f"{row['_cpu']:.2f}"
    row["_it"] = meas["best_s"] / max(its, 1)
    row["per_it"] = f"{1e3 * row['_it']:.1f}"
    row["erosion_s"] = f"{sum(c[2] for c in erosions) / len(meas['times_s']):.3f}"
    return row


def erosion_rows(pair: str, calls: list, dense: bool) -> list[dict]:
    """One row per distinct (mask shape, radii) the valid runs eroded: the fastest call, and with ``dense``
    the dense max-pool on the same mask (timed once) and whether the two results are identical."""
    import torch

    from maskreg.engine.pyramid import erode_voxels

    best: dict[tuple, tuple] = {}
    for mask, radii, s in calls:
        key = (tuple(mask.shape[2:]), radii)
        if key not in best or s < best[key][1]:
            best[key] = (mask, s)
    rows = []
    for (shape, radii), (mask, s) in best.items():
        row = {"pair": pair, "shape": "×".join(map(str, shape)), "radii": ",".join(map(str, radii))}
        row["sep_s"] = f"{s:.3f}"
        if dense:
            ref, t = common.timed(lambda mask=mask, radii=radii: dense_erosion(mask, radii))
            row["dense_s"] = f"{t:.1f}"
            row["equal"] = "yes" if torch.equal(ref, erode_voxels(mask, radii)) else "NO"
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["ct", "brain_mr"])
    ap.add_argument("--stages", choices=["default", "linear"], default="default", help="stage list (default)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N wall times (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch, OpenMP and ITK threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dense", action="store_true", help="also time the previous dense max-pool erosion (slow)")
    args = ap.parse_args()
    common.set_threads(args.threads, libraries=True)
    print(common.machine_note())
    print(f"device: {common.device_note()}; maskreg {common.commit(changed_sources=True)}")
    stages = common.default_stages()
    if args.stages == "linear":
        stages = [s for s in stages if s["type"] in ("moments", "translation", "rigid", "similarity", "affine")]
    print(f"stages: {common.stages_text(stages)}; best of {args.repeats}\n")
    rows, erosions = [], []
    for pair in args.pairs:
        r, e = run_pair(pair, stages, args)
        rows += r
        erosions += e
    print()
    print(common.format_table(rows, COLUMNS))
    print("\nerosions of the valid runs (tensor order z, y, x):\n")
    print(common.format_table(erosions, EROSION_COLUMNS))


if __name__ == "__main__":
    main()
