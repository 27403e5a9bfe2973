#!/usr/bin/env python
"""Build maskreg's bundled demo cohort (resources/demo + config/cohort.tsv) from the shared data folder.

Usage (from anywhere):

    python resources/demo/make_demo.py [SHARED_DATA_DIR]

SHARED_DATA_DIR defaults to ``../shared/data`` relative to the repository root (the folder described by its
own README.md: ``<dataset>/<subject>/{image,labels,mask}.nii.gz`` plus licence files).

What it does (deterministic; needs SimpleITK, numpy):

* antspy_brain2d, elastix_ct2d_head, totalseg_ct/ct_a image and the three licence files: byte-for-byte copies.
* totalseg_ct:
    - labels of both subjects restricted to KEEP_LABELS (all other values -> 0), uint8;
    - ct_b (512x512x20, 0.977x0.977x2 mm) resampled to a 3 mm isotropic grid centred on the same physical box
      (Gaussian anti-aliasing then linear interpolation for the image, rounded back to int16; nearest neighbour
      for the labels);
    - ct_b (image and labels identically) translated so that its liver centroid equals ct_a's liver centroid
      plus DEMO_OFFSET_MM (LPS mm). Direction cosines are unchanged.
* config/cohort.tsv listing the 5 demo subjects (paths relative to config/).

At the end it re-reads every output with SimpleITK, prints the geometry of each file, the physical overlap of
the 3D pair and the per-label Dice of the 3D pair under the identity transform (the "before" of the demo).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "resources" / "demo"
COHORT = REPO / "config" / "cohort.tsv"

# TotalSegmentator "total" classes present in both ct_a and ct_b with at least MIN_VOXELS voxels on the 3 mm
# grids of the demo (ct_a as shipped, ct_b after resampling). The candidates are all classes present in both
# subjects' labels.csv; the script checks the voxel counts and fails if a kept label falls below the minimum.
KEEP_LABELS = {
    1: "spleen",
    5: "liver",
    6: "stomach",
    20: "colon",
    32: "vertebrae_T12",
    52: "aorta",
    63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein",
    79: "spinal_cord",
    86: "autochthon_left",
    87: "autochthon_right",
    117: "costal_cartilages",
}
MIN_VOXELS = 200  # 200 voxels of 27 mm^3 = 5.4 mL

LIVER = 5
DEMO_OFFSET_MM = (6.0, -9.0, 4.5)  # LPS mm, added after liver-centroid recentring of ct_b
TARGET_SPACING_MM = 3.0
AIR_HU = -1024  # default value outside the source image (never reached: the grid lies inside the box)
BODY_HU = -500  # body = HU above this, used only for the overlap check


# ----------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    assert sha256(src) == sha256(dst)


def write(img: sitk.Image, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(dst), useCompression=True)


def restrict_labels(lab: sitk.Image) -> sitk.Image:
    """Keep KEEP_LABELS, set every other value to 0, return uint8 on the same grid."""
    arr = sitk.GetArrayFromImage(lab)
    keep = np.isin(arr, list(KEEP_LABELS))
    out = np.where(keep, arr, 0).astype(np.uint8)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(lab)
    return img


def centred_grid(img: sitk.Image, spacing: float) -> tuple[list[int], list[float]]:
    """Size and origin of an isotropic grid with the same direction, centred on img's physical box.

    The box is the voxel-edge extent of img; the number of voxels per axis is round(extent / spacing), so
    every new voxel centre lies inside the box (within half a source voxel of the outermost source centres).
    """
    d = np.array(img.GetDirection()).reshape(3, 3)
    sp = np.array(img.GetSpacing())
    sz = np.array(img.GetSize())
    extent = sp * sz
    new_size = np.rint(extent / spacing).astype(int)
    centre_idx = (sz - 1) / 2.0
    centre = np.array(img.GetOrigin()) + d @ (centre_idx * sp)
    new_origin = centre - d @ ((new_size - 1) / 2.0 * spacing)
    return [int(v) for v in new_size], [float(v) for v in new_origin]


def resample_ct_b(img: sitk.Image, lab: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    size, origin = centred_grid(img, TARGET_SPACING_MM)
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing([TARGET_SPACING_MM] * 3)
    ref.SetOrigin(origin)
    ref.SetDirection(img.GetDirection())

    # Anti-aliasing before 3x in-plane / 1.5x through-plane downsampling: Gaussian whose FWHM brings the
    # source resolution to the target one, sigma_mm = sqrt(target^2 - source^2) / (2 sqrt(2 ln 2)).
    fwhm_to_sigma = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sigmas = [float(np.sqrt(max(TARGET_SPACING_MM**2 - s**2, 0.0)) * fwhm_to_sigma) for s in img.GetSpacing()]
    # DiscreteGaussian (sampled, normalised, non-negative kernel): no overshoot beyond the source range.
    smooth = sitk.DiscreteGaussian(sitk.Cast(img, sitk.sitkFloat32), [s * s for s in sigmas], 32, 0.001, True)
    res = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
    arr = np.rint(sitk.GetArrayFromImage(res))
    arr = np.clip(arr, np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    img3 = sitk.GetImageFromArray(arr)
    img3.CopyInformation(ref)

    lab3 = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return img3, lab3


def centroid_lps(lab: sitk.Image, value: int) -> np.ndarray:
    arr = sitk.GetArrayFromImage(lab)  # z, y, x
    idx = np.argwhere(arr == value)[:, ::-1].astype(float)  # x, y, z indices
    if idx.size == 0:
        raise RuntimeError(f"label {value} absent")
    mean_idx = idx.mean(axis=0)
    d = np.array(lab.GetDirection()).reshape(3, 3)
    return np.array(lab.GetOrigin()) + d @ (mean_idx * np.array(lab.GetSpacing()))


def counts(lab: sitk.Image) -> dict[int, int]:
    arr = sitk.GetArrayFromImage(lab)
    return {v: int((arr == v).sum()) for v in KEEP_LABELS}


# ----------------------------------------------------------------------------------------------------------
def build(shared: Path) -> None:
    # 1. ANTs 2D brain slices (byte for byte)
    for s in ("r16", "r27", "r30", "r64"):
        copy(shared / "antspy_brain2d" / s / "image.nii.gz", DEMO / "antspy_brain2d" / f"{s}.nii.gz")
    copy(shared / "antspy_brain2d" / "LICENSE_ANTsPy.txt", DEMO / "antspy_brain2d" / "LICENSE_ANTsPy.txt")

    # 2. elastix 2D head CT with masks (byte for byte)
    for s in ("fixed", "moving"):
        copy(shared / "elastix_ct2d_head" / s / "image.nii.gz", DEMO / "elastix_ct2d_head" / f"{s}.nii.gz")
        copy(shared / "elastix_ct2d_head" / s / "mask.nii.gz", DEMO / "elastix_ct2d_head" / f"{s}_mask.nii.gz")
    copy(shared / "elastix_ct2d_head" / "LICENSE_ITKElastix.txt", DEMO / "elastix_ct2d_head" / "LICENSE_ITKElastix.txt")

    # 3. TotalSegmentator CT pair
    src = shared / "totalseg_ct"
    out = DEMO / "totalseg_ct"
    copy(src / "ct_a" / "image.nii.gz", out / "ct_a_image.nii.gz")
    copy(src / "LICENSE_TotalSegmentator.txt", out / "LICENSE_TotalSegmentator.txt")

    lab_a = restrict_labels(sitk.ReadImage(str(src / "ct_a" / "labels.nii.gz")))
    img_b = sitk.ReadImage(str(src / "ct_b" / "image.nii.gz"))
    lab_b = restrict_labels(sitk.ReadImage(str(src / "ct_b" / "labels.nii.gz")))
    img_b3, lab_b3 = resample_ct_b(img_b, lab_b)

    n_a, n_b = counts(lab_a), counts(lab_b3)
    small = {v: (n_a[v], n_b[v]) for v in KEEP_LABELS if min(n_a[v], n_b[v]) < MIN_VOXELS}
    if small:
        raise RuntimeError(f"kept labels below {MIN_VOXELS} voxels (ct_a, ct_b): {small}")

    c_a = centroid_lps(lab_a, LIVER)
    c_b = centroid_lps(lab_b3, LIVER)
    shift = (c_a - c_b) + np.array(DEMO_OFFSET_MM)
    new_origin = [float(v) for v in np.array(img_b3.GetOrigin()) + shift]
    print(f"liver centroid ct_a (LPS mm): {np.round(c_a, 3).tolist()}")
    print(f"liver centroid ct_b after resampling, before shift: {np.round(c_b, 3).tolist()}")
    print(
        f"translation applied to ct_b origin: {np.round(shift, 3).tolist()} "
        f"(= centroid difference + offset {DEMO_OFFSET_MM})"
    )
    for im in (img_b3, lab_b3):
        im.SetOrigin(new_origin)

    write(lab_a, out / "ct_a_labels.nii.gz")
    write(img_b3, out / "ct_b_image.nii.gz")
    write(lab_b3, out / "ct_b_labels.nii.gz")
    with open(out / "labels.csv", "w", newline="\n") as fh:
        fh.write("value,name\n")
        for v, name in KEEP_LABELS.items():
            fh.write(f"{v},{name}\n")

    # 4. cohort table (paths relative to config/)
    rel = "../resources/demo"
    cols = [
        "subject",
        "fixed",
        "moving",
        "fixed_mask",
        "moving_mask",
        "fixed_labels",
        "moving_labels",
        "fixed_landmarks",
        "moving_landmarks",
    ]
    rows = [
        *[
            [
                f"brain2d_{s}",
                f"{rel}/antspy_brain2d/r64.nii.gz",
                f"{rel}/antspy_brain2d/{s}.nii.gz",
                "",
                "",
                "",
                "",
                "",
                "",
            ]
            for s in ("r16", "r27", "r30")
        ],
        [
            "headct2d",
            f"{rel}/elastix_ct2d_head/fixed.nii.gz",
            f"{rel}/elastix_ct2d_head/moving.nii.gz",
            f"{rel}/elastix_ct2d_head/fixed_mask.nii.gz",
            f"{rel}/elastix_ct2d_head/moving_mask.nii.gz",
            "",
            "",
            "",
            "",
        ],
        [
            "abdomen3d",
            f"{rel}/totalseg_ct/ct_a_image.nii.gz",
            f"{rel}/totalseg_ct/ct_b_image.nii.gz",
            "",
            "",
            f"{rel}/totalseg_ct/ct_a_labels.nii.gz",
            f"{rel}/totalseg_ct/ct_b_labels.nii.gz",
            "",
            "",
        ],
    ]
    COHORT.parent.mkdir(parents=True, exist_ok=True)
    with open(COHORT, "w", newline="\n") as fh:
        for r in [cols, *rows]:
            fh.write("\t".join(r) + "\n")


# ----------------------------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else float("nan")


def check() -> None:
    print("\n# geometry of every image (re-read with SimpleITK)")
    print("| file | size | spacing (mm) | origin (LPS mm) | direction | type | range |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(DEMO.rglob("*.nii.gz")):
        im = sitk.ReadImage(str(p))
        arr = sitk.GetArrayViewFromImage(im)

        def fmt(t, n=3):
            return (
                "("
                + ", ".join(f"{v:.{n}f}".rstrip("0").rstrip(".").replace("-0", "0") if v != 0 else "0" for v in t)
                + ")"
            )

        print(
            f"| {p.relative_to(DEMO)} | {'x'.join(map(str, im.GetSize()))} | {fmt(im.GetSpacing(), 4)} | "
            f"{fmt(im.GetOrigin())} | {fmt(im.GetDirection(), 0)} | {im.GetPixelIDTypeAsString()} | "
            f"{arr.min()}..{arr.max()} |"
        )

    # cohort paths resolve relative to the table's folder
    lines = COHORT.read_text().splitlines()
    header = lines[0].split("\t")
    for line in lines[1:]:
        for _col, cell in zip(header[1:], line.split("\t")[1:], strict=False):
            if cell:
                p = (COHORT.parent / cell).resolve()
                assert p.is_file(), p
                sitk.ReadImage(str(p))
    print(f"\ncohort: {len(lines) - 1} subjects, every path resolves relative to {COHORT.parent}")

    # 3D pair: physical overlap and identity Dice on the fixed grid
    t = DEMO / "totalseg_ct"
    fa = sitk.ReadImage(str(t / "ct_a_image.nii.gz"))
    la = sitk.ReadImage(str(t / "ct_a_labels.nii.gz"))
    mb = sitk.ReadImage(str(t / "ct_b_image.nii.gz"))
    lb = sitk.ReadImage(str(t / "ct_b_labels.nii.gz"))
    ident = sitk.Transform()
    ones = sitk.Image(mb.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(mb)
    inside = sitk.Resample(ones, fa, ident, sitk.sitkNearestNeighbor, 0)
    mb_on_a = sitk.Resample(mb, fa, ident, sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
    lb_on_a = sitk.Resample(lb, fa, ident, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ins = sitk.GetArrayFromImage(inside) > 0
    body_a = sitk.GetArrayFromImage(fa) > BODY_HU
    body_b = sitk.GetArrayFromImage(mb_on_a) > BODY_HU
    A, B = sitk.GetArrayFromImage(la), sitk.GetArrayFromImage(lb_on_a)
    print("\n# 3D pair abdomen3d under the identity transform (moving resampled onto the fixed grid)")
    print(f"fixed grid voxels inside moving box: {ins.sum()} of {ins.size} ({100 * ins.mean():.1f} %)")
    zs = np.nonzero(ins.any(axis=(1, 2)))[0]
    print(f"fixed slices (z index) touched by the moving box: {zs.min()}..{zs.max()} of 0..{ins.shape[0] - 1}")
    print(
        f"fixed body voxels (HU>{BODY_HU}): {body_a.sum()}, inside moving box: {(body_a & ins).sum()} "
        f"({100 * (body_a & ins).sum() / body_a.sum():.1f} %)"
    )
    print(
        f"body overlap (fixed body & moving body): {(body_a & body_b).sum()} voxels; "
        f"body Dice within the moving box: {dice(body_a & ins, body_b & ins):.3f}"
    )
    lc = centroid_lps(lb, LIVER) - centroid_lps(la, LIVER)
    print(f"liver centroid moving - fixed (LPS mm): {np.round(lc, 3).tolist()} (intended {list(DEMO_OFFSET_MM)})")
    print(
        "\n| label | name | fixed voxels | moving voxels (own grid) | moving voxels on fixed grid | "
        "Dice identity | Dice identity within moving box |"
    )
    print("|---|---|---|---|---|---|---|")
    Bown = sitk.GetArrayFromImage(lb)
    for v, name in KEEP_LABELS.items():
        print(
            f"| {v} | {name} | {(A == v).sum()} | {(Bown == v).sum()} | {(B == v).sum()} | "
            f"{dice(A == v, B == v):.3f} | {dice((A == v) & ins, B == v):.3f} |"
        )
    print("\nsha256 of every file in resources/demo:")
    for p in sorted(DEMO.rglob("*")):
        if p.is_file() and p.suffix != ".py" and p.name != "README.md":
            print(f"  {sha256(p)}  {p.relative_to(DEMO)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "shared_data",
        nargs="?",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="shared data folder (default: ../shared/data relative to the repository root)",
    )
    args = ap.parse_args(argv)
    if not (args.shared_data / "totalseg_ct").is_dir():
        ap.error(f"{args.shared_data} does not look like the shared data folder")
    build(args.shared_data.resolve())
    check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
