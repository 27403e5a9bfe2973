"""Capture range with a small ROI on one side: the share of random starting offsets that maskreg and ANTsPy
recover, on the same inputs in the same run.

``python benchmarks/bench_capture.py [--offsets 20] [--max-mm 20] [--max-deg 30] [--threads 1]``

Scenarios (2D, known truth): a real image ``I`` is the fixed image; a disc of about 15 % of the image, placed
off the image's centre on the anatomy, is the fixed ROI; there is no moving mask. Each offset ``S`` is a rigid
map about the ROI's centre, rotation uniform in ``±max-deg``, translation uniform in the disc of radius
``max-mm`` (LPS mm). The moving image is ``I`` moved by ``S`` on the same grid (``moving(S(x)) = I(x)``, so
content leaves the field of view), through a gamma curve and with Gaussian noise, so the two images are not
equal where they overlap. The true fixed → moving map is ``S``. An offset counts as recovered when the mean
distance ``|T(x) − S(x)|`` over the ROI's pixels is below 1 mm.

Methods (each on every offset):

* ``maskreg``: moments → rigid (masked MI), the ROI as the fixed mask;
* ``maskreg-search``: the same with ``search: true`` on the rigid stage (200 poses within ±30°, ±20 mm,
  the best 3 refined);
* ``maskreg-unmasked-first``: moments → rigid with ``masks: none`` → rigid with the ROI (ANTs' habit of
  masking only the last stages);
* ``ants``: ANTsPy ``Rigid`` with the ROI as ``mask`` (its default start: the images' centres of mass).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("maskreg", "maskreg-search", "maskreg-unmasked-first", "ants")
RIGID = {"type": "rigid", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]}
STAGES = {
    "maskreg": [{"type": "moments"}, RIGID],
    "maskreg-search": [{"type": "moments"}, {**RIGID, "search": True}],
    "maskreg-unmasked-first": [{"type": "moments"}, {**RIGID, "masks": "none"}, RIGID],
}
COLUMNS = [
    ("scenario", "scenario"),
    ("method", "method"),
    ("recovered", "recovered"),
    ("median", "median error mm"),
    ("p90", "90th pct error mm"),
    ("time", "mean time s"),
]


def scenarios() -> dict[str, tuple]:
    """name -> (fixed image, ROI disc centre (index x, y), radius px) on real 2D scans."""
    import SimpleITK as sitk

    head = sitk.ReadImage(str(common.DATA / "elastix_ct2d_head" / "fixed" / "image.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(common.DATA / "antspy_brain2d" / "r16" / "image.nii.gz"), sitk.sitkFloat32)
    r = int(round(math.sqrt(0.15 * 256 * 256 / math.pi)))  # 15 % of a 256 x 256 image
    return {"head CT": (head, (110, 150), r), "brain MR": (brain, (150, 110), r)}


def disc(image, centre, radius):
    import SimpleITK as sitk

    ny, nx = image.GetSize()[1], image.GetSize()[0]
    yy, xx = np.mgrid[:ny, :nx]
    roi = sitk.GetImageFromArray(((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2).astype(np.uint8))
    roi.CopyInformation(image)
    return roi


def offsets(n: int, max_mm: float, max_deg: float, seed: int = 0) -> list[tuple[float, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        angle = rng.uniform(-max_deg, max_deg)
        r, phi = max_mm * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
        out.append((angle, np.array([r * math.cos(phi), r * math.sin(phi)])))
    return out


def moved(image, roi, angle_deg: float, t: np.ndarray, seed: int):
    """The moving image for offset ``S`` (rigid about the ROI's centre) and ``S`` as a SimpleITK transform."""
    import SimpleITK as sitk

    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(roi)
    s = sitk.Euler2DTransform(stats.GetCentroid(1), math.radians(angle_deg), tuple(t))
    m = sitk.Resample(image, image, s.GetInverse(), sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(image))))
    a = sitk.GetArrayFromImage(m).astype(np.float64)
    lo, hi = a.min(), a.max()
    a = ((a - lo) / (hi - lo)) ** 0.7 * 1000.0
    a += np.random.default_rng(seed).normal(0, 20.0, a.shape)
    out = sitk.GetImageFromArray(a.astype(np.float32))
    out.CopyInformation(image)
    return out, s


def error_mm(tx, truth, roi) -> float:
    idx = np.argwhere(sitk_array(roi) > 0)[::4, ::-1]
    pts = [roi.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx]
    return float(np.mean([np.linalg.norm(np.subtract(tx.TransformPoint(p), truth.TransformPoint(p))) for p in pts]))


def sitk_array(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)


def run_maskreg(method, fixed, moving, roi, threads):
    """maskreg's fixed -> moving map for one case (the ROI as the fixed mask, no moving mask)."""
    run = common.maskreg_call(fixed, moving, roi, None, STAGES[method], device="cpu", warm=False, threads=threads)
    return run().transform()


def run_ants(fixed, moving, roi, tmp: Path):
    """ANTsPy ``Rigid`` with the ROI as its ``mask``: its fixed -> moving map as a SimpleITK transform."""
    import SimpleITK as sitk

    paths = {}
    for name, img in (("fixed", fixed), ("moving", moving), ("fixed_mask", roi)):
        paths[name] = str(tmp / f"{name}.nii.gz")
        sitk.WriteImage(img, paths[name])
    f, m, fm, _ = common.ants_pair(paths)
    out = common.ants_call(f, m, tmp, type_of_transform="Rigid", mask=fm, random_seed=1)()
    return common.read_transform_files(out["fwdtransforms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offsets", type=int, default=20)
    ap.add_argument("--max-mm", type=float, default=20.0)
    ap.add_argument("--max-deg", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    common.set_threads(args.threads)
    print(common.machine_note())
    print(
        f"offsets: {args.offsets} per scenario, up to {args.max_mm} mm and {args.max_deg}°; recovered: mean "
        f"error over the ROI < 1 mm\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for name, (image, centre, radius) in scenarios().items():
            roi = disc(image, centre, radius)
            cases = [
                moved(image, roi, a, t, seed=k)
                for k, (a, t) in enumerate(offsets(args.offsets, args.max_mm, args.max_deg))
            ]
            for method in args.methods:
                print(f"running {method} on {name} ...", flush=True)
                errors, seconds = [], []
                for moving, truth in cases:
                    if method == "ants":
                        run = partial(run_ants, image, moving, roi, Path(tmpdir))
                    else:
                        run = partial(run_maskreg, method, image, moving, roi, args.threads)
                    try:
                        tx, secs = common.timed(run)
                        errors.append(error_mm(tx, truth, roi))
                        seconds.append(secs)
                    except Exception as exc:  # a failed case is not recovered; the table still prints
                        print(f"  {name} {method}: {type(exc).__name__}: {exc}", file=sys.stderr)
                        errors.append(math.inf)
                e = np.array(errors)
                rows.append(
                    {
                        "scenario": name,
                        "method": method,
                        "recovered": f"{int((e < 1.0).sum())}/{len(e)}",
                        "median": f"{np.median(e):.2f}",
                        "p90": f"{np.percentile(e, 90):.2f}",
                        "time": f"{np.mean(seconds):.2f}" if seconds else None,
                    }
                )
    print()
    print(common.format_table(rows, COLUMNS, markdown=True))


if __name__ == "__main__":
    main()
