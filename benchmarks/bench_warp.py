"""Label-map warping at 1 mm: maskreg generic / nearest vs ANTsPy genericLabel / nearestNeighbor, CPU.

Run: ``.venv/bin/python benchmarks/bench_warp.py [--maps totalseg freesurfer] [--repeats 2] [--threads 2]
[--methods maskreg-generic maskreg-nearest maskreg-plain ants-genericLabel ants-nearestNeighbor]``.

Maps (from ``../shared/data`` or ``$MASKREG_DATA``):

* ``totalseg``: TotalSegmentator CT ``ct_b`` labels, 117-class scheme (31 classes present), 512×512×20 at
  0.98×0.98×2 mm.
* ``freesurfer``: the voxelmorph test scan's FreeSurfer labels (45 + background), 160×192×224 at 1 mm, LIA-like
  direction cosines.

Target grid: 1 mm isotropic, identity direction cosines (a reorientation for the brain), covering the map's
field of view; the transform (target points → map points, ITK/ANTs convention) is a small rigid one: 3° about
the axis (1, 2, 3) through the map's centre, translation (1.3, -0.7, 0.4) mm. It is written once as an ITK
``.mat`` file that every method reads.

Methods: ``maskreg-generic`` = ``maskreg.warp.warp_labels(..., "generic")`` (each label's indicator
interpolated linearly over the part of the target grid that can see it, argmax); ``maskreg-nearest`` = the
same with ``"nearest"``; ``maskreg-plain`` = the straightforward generic version for reference (every label
resampled over the whole target grid, as ``warp_labels`` did before the region restriction);
``ants-genericLabel`` / ``ants-nearestNeighbor`` = ``ants.apply_transforms(target, labels, [rigid.mat],
interpolator=...)``.

Each method runs in a fresh worker process with ``--threads`` threads (ITK, OpenMP); the time is the wall time
of the warp call alone (images and transform already loaded), best of ``--repeats``; the memory is the peak
resident set during the calls, with what the worker held before in brackets, and ``Δ MB`` = peak − base.
``× generic`` columns are ratios to maskreg generic on the same map. Agreement: mean (and min) Dice over the
label values present in either output, against maskreg generic, and for the ANTs rows against maskreg's
method of the same kind (genericLabel ↔ generic, nearestNeighbor ↔ nearest); ``labels`` = label values in the
output (background excluded). ANTsPy is optional: when missing, its rows say how to install it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

MAPS = {
    "totalseg": ("totalseg_ct", "ct_b", "labels.nii.gz"),
    "freesurfer": ("voxelmorph_brain_t1", "test_scan", "labels.nii.gz"),
}
METHODS = ["maskreg-generic", "maskreg-nearest", "maskreg-plain", "ants-genericLabel", "ants-nearestNeighbor"]
SAME_KIND = {"ants-genericLabel": "maskreg-generic", "ants-nearestNeighbor": "maskreg-nearest"}


# ------------------------------------------------------------------------------------------------- data
def prepare(name: str) -> dict:
    """The target grid (a uint8 zero image) and the rigid transform file for one map, cached under out/."""
    import numpy as np
    import SimpleITK as sitk

    src = common.DATA.joinpath(*MAPS[name])
    if not src.exists():
        raise FileNotFoundError(f"{src} not found (set MASKREG_DATA to the shared/data folder)")
    out = common.OUT / "warp" / name
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "labels": str(src),
        "target": str(out / "target.nii.gz"),
        "transform": str(out / "rigid.mat"),
        "dir": str(out),
    }
    if Path(paths["target"]).exists() and Path(paths["transform"]).exists():
        return paths
    lab = sitk.ReadImage(str(src))
    size = np.array(lab.GetSize())
    corners = np.array(
        [
            lab.TransformContinuousIndexToPhysicalPoint((c * size - 0.5).tolist())
            for c in np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T
        ]
    )
    lo, hi = corners.min(0), corners.max(0)
    target = sitk.Image([int(np.ceil(n)) for n in hi - lo], sitk.sitkUInt8)
    target.SetSpacing((1.0, 1.0, 1.0))
    target.SetOrigin((lo + 0.5).tolist())
    sitk.WriteImage(target, paths["target"])
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    t = np.deg2rad(3.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tx = sitk.AffineTransform(3)
    tx.SetCenter(lab.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size]))
    tx.SetMatrix((np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k).flatten().tolist())
    tx.SetTranslation((1.3, -0.7, 0.4))
    sitk.WriteTransform(tx, paths["transform"])
    return paths


# ---------------------------------------------------------------------------------------------- workers
def _plain_generic(labels, reference, transform):
    """Every label's indicator resampled linearly over the whole reference grid, argmax (ties to the smaller
    label; 0 outside the moving image): the straightforward generic-label warp."""
    import numpy as np
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(labels)
    best = np.zeros(tuple(reversed(reference.GetSize())), np.float32)
    out = np.zeros(best.shape, arr.dtype)
    for v in np.unique(arr):
        w = sitk.GetArrayFromImage(
            sitk.Resample(
                sitk.Cast(labels == int(v), sitk.sitkFloat32),
                reference,
                transform,
                sitk.sitkLinear,
                1.0 if v == 0 else 0.0,
                sitk.sitkFloat32,
            )
        )
        better = w > best
        best[better], out[better] = w[better], v
        del w, better
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(reference)
    return img


def _worker_maskreg(spec: dict) -> dict:
    import SimpleITK as sitk

    from maskreg import warp

    p = spec["paths"]
    labels, target = sitk.ReadImage(p["labels"]), sitk.ReadImage(p["target"])
    tx = sitk.ReadTransform(p["transform"])
    kind = spec["method"].split("-", 1)[1]
    if kind == "plain":
        run = lambda: _plain_generic(labels, target, tx)  # noqa: E731
    else:
        run = lambda: warp.warp_labels(labels, target, tx, kind)  # noqa: E731
    meas = common.measure(run, spec["repeats"])
    sitk.WriteImage(meas.pop("result"), spec["output"])
    return {**meas, "version": f"SimpleITK {sitk.Version.VersionString()}"}


def _worker_ants(spec: dict) -> dict:
    import ants

    p = spec["paths"]
    labels, target = ants.image_read(p["labels"]), ants.image_read(p["target"])
    interp = spec["method"].split("-", 1)[1]
    run = lambda: ants.apply_transforms(target, labels, [p["transform"]], interpolator=interp)  # noqa: E731
    meas = common.measure(run, spec["repeats"])
    ants.image_write(meas.pop("result"), spec["output"])
    return {**meas, "version": f"antspyx {ants.__version__}"}


WORKERS = {m: _worker_ants if m.startswith("ants") else _worker_maskreg for m in METHODS}
PEER_OF = {m: "ants" for m in METHODS if m.startswith("ants")}


# ------------------------------------------------------------------------------------------- agreement
def dice_table(a, b) -> tuple[float, float]:
    """Mean and min Dice (:func:`common.dice`) over the nonzero label values present in either label map."""
    d = common.dice(a, b)
    if not d:
        return 1.0, 1.0
    return common.mean_dice(d), min(d.values())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--maps", nargs="+", default=list(MAPS), choices=list(MAPS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = common.standard_main(ap, WORKERS, timeout=1800)
    if args is None:
        return
    import numpy as np
    import SimpleITK as sitk

    print(
        f"threads per method: {args.threads}; repeats: best of {args.repeats}; SimpleITK {sitk.Version.VersionString()}"
    )
    if "maskreg-generic" not in args.methods:
        args.methods.insert(0, "maskreg-generic")  # the reference of every ratio
    available = common.check_peers(args.methods, PEER_OF)

    rows = []
    for name in args.maps:
        paths = prepare(name)
        lab, target = sitk.ReadImage(paths["labels"]), sitk.ReadImage(paths["target"])
        src = sitk.GetArrayViewFromImage(lab)
        n_src = int((np.unique(src) != 0).sum())
        print(
            f"\n{name}: {common.shown_path(paths['labels'])}\n"
            f"  {lab.GetSize()} at {tuple(round(s, 3) for s in lab.GetSpacing())} mm, "
            f"{lab.GetPixelIDTypeAsString()}, {n_src} labels + background -> target {target.GetSize()} at 1 mm "
            f"({np.prod(target.GetSize()) / 1e6:.1f} M voxels)",
            flush=True,
        )
        outputs, results = {}, {}
        for m in args.methods:
            row = {"map": name, "method": m}
            rows.append(row)
            if not available[m][0]:
                row["note"] = common.pip_hint(PEER_OF[m])
                continue
            out_path = str(Path(paths["dir"]) / f"{m}.nii.gz")
            spec = {"method": m, "paths": paths, "repeats": args.repeats, "threads": args.threads, "output": out_path}
            print(f"  running {m} ...", flush=True)
            res = common.run_worker(Path(__file__), spec, timeout=args.timeout)
            if "error" in res:
                row["note"] = res["error"][:160]
                continue
            results[m] = res
            outputs[m] = sitk.GetArrayFromImage(sitk.ReadImage(out_path)).astype(np.int64)
            row.update(common.timing_cells(res, 2))
            if res.get("peak_rss_mb") is not None:
                row["_d"] = res["peak_rss_mb"] - res["base_rss_mb"]
                row["delta_mb"] = f"{row['_d']:.0f}"
            row["labels"] = f"{int((np.unique(outputs[m]) != 0).sum())}/{n_src}"
        ref = results.get("maskreg-generic")
        common.add_ratio([r for r in rows if r["map"] == name], ref and ref["best_s"], "x_time")
        for row in rows:
            if row["map"] != name or row["method"] not in results:
                continue
            m = row["method"]
            if ref:
                if "_d" in row and ref.get("peak_rss_mb") is not None:
                    row["x_mem"] = f"{row['_d'] / max(ref['peak_rss_mb'] - ref['base_rss_mb'], 1e-9):.2f}"
            if "maskreg-generic" in outputs:
                mean, mn = dice_table(outputs[m], outputs["maskreg-generic"])
                row["dice_generic"] = f"{mean:.4f} ({mn:.3f})"
            if m in SAME_KIND and SAME_KIND[m] in outputs:
                mean, mn = dice_table(outputs[m], outputs[SAME_KIND[m]])
                eq = float((outputs[m] == outputs[SAME_KIND[m]]).mean())
                row["dice_same"] = f"{mean:.4f} ({mn:.3f}), {100 * eq:.3f} % equal"

    cols = [
        ("map", "map"),
        ("method", "method"),
        ("time_s", "time s"),
        ("x_time", "× generic"),
        ("runs_s", "runs s"),
        ("peak_mb", "peak MB (base)"),
        ("delta_mb", "Δ MB"),
        ("x_mem", "Δ × generic"),
        ("labels", "labels"),
        ("dice_generic", "Dice vs maskreg generic: mean (min)"),
        ("dice_same", "vs maskreg same kind"),
        ("note", "note"),
    ]
    print()
    print(common.format_table(rows, cols))
    print(f"\nload average at the end: {common.load_average()}")


if __name__ == "__main__":
    main()
