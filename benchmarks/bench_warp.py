"""Label-map warping at 1 mm: maskreg generic / nearest vs SimpleITK sitkLabelLinear and ANTsPy genericLabel /
nearestNeighbor, CPU.

Run: ``.venv/bin/python benchmarks/bench_warp.py [--maps totalseg totalseg_a freesurfer] [--transforms rigid
affine-field] [--labels N] [--split K] [--repeats 2] [--threads 2] [--methods maskreg-generic maskreg-nearest
maskreg-plain sitk-labelLinear ants-genericLabel ants-nearestNeighbor]``.

Maps (from ``../shared/data`` or ``$MASKREG_DATA``):

* ``totalseg``: TotalSegmentator CT ``ct_b`` labels, 117-class scheme (31 classes present), 512×512×20 at
  0.98×0.98×2 mm.
* ``totalseg_a``: TotalSegmentator CT ``ct_a`` labels, same scheme (41 classes present), 122×101×30 at 3 mm.
* ``freesurfer``: the voxelmorph test scan's FreeSurfer labels (45 + background), 160×192×224 at 1 mm, LIA-like
  direction cosines.

``--labels N`` keeps only the N largest labels of the map (the others become background 0); ``--split K`` cuts
each label into K slabs along the longest side of its bounding box (about K times as many, smaller labels:
``--split 3`` makes 121 of ``totalseg_a``'s 41, the size of TotalSegmentator's 117-class scheme). Both show how
each method's time grows with the number of labels.

Target grid: 1 mm isotropic, identity direction cosines (a reorientation for the brain), covering the map's
field of view. Transforms (target points → map points, ITK/ANTs convention), written once as files that every
method reads (``maskreg.transforms.read_transform`` for maskreg and SimpleITK, ``ants.apply_transforms`` for ANTs,
in ``-t`` order):

* ``rigid``: 3° about the axis (1, 2, 3) through the map's centre, translation (1.3, -0.7, 0.4) mm (``rigid.mat``).
* ``affine-field``: ``-t field.nii.gz -t affine.mat``: an affine (the rigid one with up to 4 % scaling and shear,
  translation (2.1, -1.4, 0.9) mm) and a smooth displacement field (seeded, up to 6 mm, on a 4 mm grid over the
  target) that pushes part of the target grid's border past the map's field of view.

Methods: ``maskreg-generic`` = ``maskreg.warp.warp_labels(..., "generic")``, which picks by transform: for a
linear one (``rigid``) the region-restricted version (each label's indicator interpolated linearly over the part
of the target grid that can see it, argmax), for one with a displacement field (``affine-field``)
``sitkLabelLinear``; ``maskreg-nearest`` = the same with ``"nearest"``; ``maskreg-plain`` = the straightforward
generic version for reference (every label resampled over the whole target grid, as ``warp_labels`` did before
the region restriction); ``maskreg-regions`` = the region-restricted version whatever the transform
(``maskreg.warp.generic_label_regions``, what ``warp_labels`` ran for every transform before issue 28);
``sitk-labelLinear`` = ``sitk.Resample(labels, target, T,
sitk.sitkLabelLinear, 0)`` (ITK's LabelImageGenericInterpolateImageFunction with linear interpolation: the same
method, the transform evaluated once per target voxel and every label at every target voxel);
``ants-genericLabel`` / ``ants-nearestNeighbor`` = ``ants.apply_transforms(target, labels, files,
interpolator=...)``.

Each method runs in a fresh worker process with ``--threads`` threads (ITK, OpenMP); the time is the wall time
of the warp call alone (images and transform already loaded), best of ``--repeats``; the memory is the peak
resident set during the calls, with what the worker held before in brackets, and ``Δ MB`` = peak − base.
``× generic`` columns are ratios to maskreg generic on the same map. Agreement: mean (and min) Dice over the
label values present in either output, against maskreg generic, and for the other rows against maskreg's
method of the same kind (regions, labelLinear, genericLabel ↔ generic; nearestNeighbor ↔ nearest), with the
number of voxels that differ; ``labels`` = label values in the output (background excluded). ANTsPy is
optional: when missing, its rows say how to install it.
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
    "totalseg_a": ("totalseg_ct", "ct_a", "labels.nii.gz"),
    "freesurfer": ("voxelmorph_brain_t1", "test_scan", "labels.nii.gz"),
}
METHODS = [
    "maskreg-generic",
    "maskreg-nearest",
    "maskreg-plain",
    "maskreg-regions",
    "sitk-labelLinear",
    "ants-genericLabel",
    "ants-nearestNeighbor",
]
SAME_KIND = {
    "maskreg-regions": "maskreg-generic",
    "sitk-labelLinear": "maskreg-generic",
    "ants-genericLabel": "maskreg-generic",
    "ants-nearestNeighbor": "maskreg-nearest",
}
TRANSFORMS = ["rigid", "affine-field"]


# ------------------------------------------------------------------------------------------------- data
def _rotation(axis, degrees: float):
    import numpy as np

    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _target_and_rigid(lab, target_path: Path, rigid_path: Path) -> None:
    """The 1 mm target grid covering ``lab``'s field of view and the rigid transform file."""
    import numpy as np
    import SimpleITK as sitk

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
    sitk.WriteImage(target, str(target_path))
    tx = sitk.AffineTransform(3)
    tx.SetCenter(lab.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size]))
    tx.SetMatrix(_rotation((1.0, 2.0, 3.0), 3.0).flatten().tolist())
    tx.SetTranslation((1.3, -0.7, 0.4))
    sitk.WriteTransform(tx, str(rigid_path))


def _affine_and_field(lab, target, affine_path: Path, field_path: Path) -> None:
    """The ``affine-field`` files: an affine about the map's centre and a smooth displacement field (LPS mm,
    seeded) on a 4 mm grid over ``target``."""
    import numpy as np
    import SimpleITK as sitk

    shear = np.array([[0.04, -0.02, 0.01], [0.03, -0.03, 0.02], [-0.01, 0.02, 0.03]])
    tx = sitk.AffineTransform(3)
    tx.SetCenter(lab.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in lab.GetSize()]))
    tx.SetMatrix((_rotation((1.0, 2.0, 3.0), 3.0) @ (np.eye(3) + shear)).flatten().tolist())
    tx.SetTranslation((2.1, -1.4, 0.9))
    sitk.WriteTransform(tx, str(affine_path))
    extent = np.array(target.GetSize()) * np.array(target.GetSpacing())
    size = [int(np.ceil(e / 4.0)) + 1 for e in extent]
    rng = np.random.default_rng(28)
    noise = sitk.GetImageFromArray(rng.standard_normal((*size[::-1], 3)), isVector=True)
    noise.SetSpacing((4.0, 4.0, 4.0))
    noise.SetOrigin(target.GetOrigin())
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 16.0))  # sigma in mm
    smooth *= 6.0 / np.sqrt((smooth**2).sum(-1)).max()
    field = sitk.GetImageFromArray(smooth.astype(np.float32), isVector=True)
    field.CopyInformation(noise)
    sitk.WriteImage(field, str(field_path))


def _largest_labels(src: Path, n: int, path: Path) -> None:
    """The map with only its ``n`` largest labels (by voxel count); the others become 0."""
    import numpy as np
    import SimpleITK as sitk

    lab = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(lab)
    values, counts = np.unique(arr[arr != 0], return_counts=True)
    arr[~np.isin(arr, values[np.argsort(counts)[::-1][:n]])] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    sitk.WriteImage(out, str(path))


def _split_labels(src: Path, k: int, path: Path) -> None:
    """The map with each label cut into ``k`` slabs along the longest side of its bounding box, numbered
    1, 2, ... (about ``k`` times as many labels, each smaller)."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    lab = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(lab).astype(np.int64)
    values = np.unique(arr)
    idx = np.searchsorted(values, arr)  # 0 = background when the map has one, as in these maps
    out, n = np.zeros(arr.shape, np.int32), 0
    for i, box in enumerate(ndimage.find_objects(idx.astype(np.int32)), 1):
        if box is None or values[i] == 0:
            continue
        ax = int(np.argmax([b.stop - b.start for b in box]))
        edges = np.linspace(box[ax].start, box[ax].stop, k + 1).astype(int)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            slab = tuple(slice(lo, hi) if a == ax else b for a, b in enumerate(box))
            inside = idx[slab] == i
            if inside.any():
                n += 1
                out[slab][inside] = n
    img = sitk.GetImageFromArray(out.astype(np.uint8 if n < 256 else np.uint16))
    img.CopyInformation(lab)
    sitk.WriteImage(img, str(path))


def prepare(name: str, transform: str = "rigid", n_labels: int | None = None, split: int | None = None) -> dict:
    """The label map (all labels, the ``n_labels`` largest, or each cut into ``split`` slabs), the target grid
    (a uint8 zero image) and the transform files (``-t`` order) for one map, cached under out/warp/<map>/;
    ``dir`` holds the outputs."""
    import SimpleITK as sitk

    src = common.DATA.joinpath(*MAPS[name])
    if not src.exists():
        raise FileNotFoundError(f"{src} not found (set MASKREG_DATA to the shared/data folder)")
    out = common.OUT / "warp" / name
    variant = (f"-{n_labels}largest" if n_labels else "") + (f"-split{split}" if split else "")
    run_dir = out / (transform + variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {"rigid": [out / "rigid.mat"], "affine-field": [out / "field.nii.gz", out / "affine.mat"]}[transform]
    paths = {
        "labels": str(out / f"labels{variant}.nii.gz" if variant else src),
        "target": str(out / "target.nii.gz"),
        "transforms": [str(f) for f in files],
        "dir": str(run_dir),
    }
    if not (Path(paths["target"]).exists() and (out / "rigid.mat").exists()):
        _target_and_rigid(sitk.ReadImage(str(src)), out / "target.nii.gz", out / "rigid.mat")
    if transform == "affine-field" and not all(f.exists() for f in files):
        _affine_and_field(sitk.ReadImage(str(src)), sitk.ReadImage(paths["target"]), files[1], files[0])
    if variant and not Path(paths["labels"]).exists():
        tmp = out / f"labels{variant}-largest.nii.gz"
        if n_labels:
            _largest_labels(src, n_labels, tmp if split else Path(paths["labels"]))
        if split:
            _split_labels(tmp if n_labels else src, split, Path(paths["labels"]))
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
    tx = common.read_transform_files(p["transforms"])
    kind = spec["method"].split("-", 1)[1]
    if kind == "plain":
        run = lambda: _plain_generic(labels, target, tx)  # noqa: E731
    elif kind == "regions":
        run = lambda: warp.generic_label_regions(labels, target, tx)  # noqa: E731
    elif kind == "labelLinear":
        run = lambda: sitk.Resample(labels, target, tx, sitk.sitkLabelLinear, 0, labels.GetPixelID())  # noqa: E731
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
    run = lambda: ants.apply_transforms(target, labels, p["transforms"], interpolator=interp)  # noqa: E731
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


def agreement(rows: list[dict], outputs: dict, results: dict) -> None:
    """Fill the ratio and agreement cells of one case's ``rows`` (:func:`run_case`)."""
    import numpy as np

    ref = results.get("maskreg-generic")
    common.add_ratio(rows, ref and ref["best_s"], "x_time")
    for row in rows:
        m = row["method"]
        if m not in results:
            continue
        if ref and "_d" in row and ref.get("peak_rss_mb") is not None:
            row["x_mem"] = f"{row['_d'] / max(ref['peak_rss_mb'] - ref['base_rss_mb'], 1e-9):.2f}"
        if "maskreg-generic" in outputs:
            mean, mn = dice_table(outputs[m], outputs["maskreg-generic"])
            row["dice_generic"] = f"{mean:.4f} ({mn:.3f})"
        if m in SAME_KIND and SAME_KIND[m] in outputs:
            mean, mn = dice_table(outputs[m], outputs[SAME_KIND[m]])
            differ = int(np.count_nonzero(outputs[m] != outputs[SAME_KIND[m]]))
            row["dice_same"] = f"{mean:.4f} ({mn:.3f}), {differ} voxels differ"


def run_case(name: str, transform: str, args, available: dict) -> list[dict]:
    """One map and transform: every method in its worker, then the agreement; one table row per method."""
    import numpy as np
    import SimpleITK as sitk

    paths = prepare(name, transform, args.labels, args.split)
    lab, target = sitk.ReadImage(paths["labels"]), sitk.ReadImage(paths["target"])
    n_src = int((np.unique(sitk.GetArrayViewFromImage(lab)) != 0).sum())
    case = f"{name} {transform}"
    print(
        f"\n{case}: {common.shown_path(paths['labels'])}\n"
        f"  {lab.GetSize()} at {tuple(round(s, 3) for s in lab.GetSpacing())} mm, "
        f"{lab.GetPixelIDTypeAsString()}, {n_src} labels + background -> target {target.GetSize()} at 1 mm "
        f"({np.prod(target.GetSize()) / 1e6:.1f} M voxels); transform files "
        f"{', '.join(Path(f).name for f in paths['transforms'])}",
        flush=True,
    )
    rows, outputs, results = [], {}, {}
    for m in args.methods:
        row = {"map": case, "method": m}
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
    agreement(rows, outputs, results)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--maps", nargs="+", default=list(MAPS), choices=list(MAPS))
    ap.add_argument("--transforms", nargs="+", default=["rigid"], choices=TRANSFORMS)
    ap.add_argument("--labels", type=int, default=None, help="keep only the N largest labels of each map")
    ap.add_argument("--split", type=int, default=None, help="cut each label into K slabs (about K× the labels)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = common.standard_main(ap, WORKERS, timeout=1800)
    if args is None:
        return
    import SimpleITK as sitk

    print(
        f"threads per method: {args.threads}; repeats: best of {args.repeats}; SimpleITK {sitk.Version.VersionString()}"
    )
    if "maskreg-generic" not in args.methods:
        args.methods.insert(0, "maskreg-generic")  # the reference of every ratio
    available = common.check_peers(args.methods, PEER_OF)
    rows = [r for name in args.maps for t in args.transforms for r in run_case(name, t, args, available)]
    cols = [
        ("map", "map, transform"),
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
