"""Benchmark of maskreg.masks morphology: dilate and erode the 1 mm MNI brain mask by 5 mm.

Run: ``.venv/bin/python benchmarks/bench_masks.py [--radius 5] [--repeats 3]``. Prints best-of-N wall times and
voxel counts, next to the plain reference (``scipy.ndimage.distance_transform_edt`` on the whole image with
``sampling=spacing``, compared ``<= r``) measured in the same run, and checks that both give the same masks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from maskreg import masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MNI = common.DATA / "mni_icbm152_2009a" / "template"
COLUMNS = [("method", "method"), ("time", "time s"), ("voxels", "voxels"), ("differ", "voxels that differ")]


def scipy_dilate(a: np.ndarray, spacing_zyx: tuple[float, ...], r: float) -> np.ndarray:
    return ndimage.distance_transform_edt(~a, sampling=spacing_zyx) <= r * (1 + 1e-6)


def scipy_erode(a: np.ndarray, spacing_zyx: tuple[float, ...], r: float) -> np.ndarray:
    return a & (ndimage.distance_transform_edt(a, sampling=spacing_zyx) > r * (1 + 1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--radius", type=float, default=5.0, help="ball radius in mm (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    args = ap.parse_args()
    r, n = args.radius, args.repeats

    print(common.machine_note())
    print(
        f"SimpleITK {sitk.Version.VersionString()}, ITK threads {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}"
    )
    sources = {}
    template = sitk.ReadImage(str(MNI / "image.nii.gz"))
    auto, t_auto = common.timed(lambda: masks.auto_mask(template))
    sources[f"auto_mask(template) [{t_auto:.2f} s to build]"] = auto
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(MNI / "gm_prob.nii.gz")))
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(MNI / "wm_prob.nii.gz")))
    brain = sitk.GetImageFromArray(((gm + wm) > 0).astype(np.uint8))
    brain.CopyInformation(template)
    sources["gm_prob + wm_prob > 0"] = brain

    for name, m in sources.items():
        a = sitk.GetArrayFromImage(m).astype(bool)
        sp = tuple(reversed(m.GetSpacing()))
        print(
            f"\nmask: {name}; grid {m.GetSize()} at {m.GetSpacing()} mm; {int(a.sum())} voxels "
            f"({a.mean():.1%} of the image); radius {r:g} mm; best of {n}\n"
        )
        # the loop's values bound as defaults (B023); measure calls each lambda before the next iteration anyway
        runs = {
            "maskreg dilate_mm": lambda m=m: masks.dilate_mm(m, r),
            "maskreg erode_mm": lambda m=m: masks.erode_mm(m, r),
            "scipy EDT dilate": lambda a=a, sp=sp: scipy_dilate(a, sp, r),
            "scipy EDT erode": lambda a=a, sp=sp: scipy_erode(a, sp, r),
        }
        same = {"scipy EDT dilate": "maskreg dilate_mm", "scipy EDT erode": "maskreg erode_mm"}
        out, rows = {}, []
        for method, fn in runs.items():
            meas = common.measure(fn, n)
            res = meas["result"]
            out[method] = sitk.GetArrayFromImage(res).astype(bool) if isinstance(res, sitk.Image) else res
            row = {"method": method, "time": f"{meas['best_s']:.3f}", "voxels": int(out[method].sum())}
            if method in same:
                row["differ"] = int((out[method] != out[same[method]]).sum())
            rows.append(row)
        print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
