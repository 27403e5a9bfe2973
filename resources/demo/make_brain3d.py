"""Build the demo's 3D brain pair `brain3d` from the shared data (deterministic; run from the repo root).

fixed  = MNI ICBM152 2009a template (nilearn copy), 1 mm -> 3 mm, labels 1 = GM, 2 = WM from the tissue
         probability maps (argmax of GM, WM and "neither" after resampling), brain mask = GM + WM > 20 %
         with holes filled.
moving = voxelmorph's test scan (LIA orientation kept), 1 mm -> 3 mm, labels from its FreeSurfer aseg:
         cortex (3, 42) -> 1, cerebral white matter (2, 41) -> 2; its brain mask (aseg > 0).
Images are smoothed with a Gaussian anti-aliasing filter (sigma = sqrt(3^2 - 1^2) / 2.355 mm) before linear
resampling onto a 3 mm grid with the same centre and direction; masks and labels are resampled per class
(linear, then argmax / >= 0.5), never as numbers.

usage: python resources/demo/make_brain3d.py [SHARED_DATA_DIR]   (default ../shared/data)
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "resources" / "demo" / "brain3d"
SPACING = 3.0
SIGMA = math.sqrt(SPACING**2 - 1.0) / 2.355


def grid_3mm(img: sitk.Image) -> sitk.Image:
    """A 3 mm grid with the same physical centre and direction as ``img``."""
    size = [max(1, int(round(n * s / SPACING))) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=False)]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing([SPACING] * 3)
    ref.SetDirection(img.GetDirection())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    d = np.array(img.GetDirection()).reshape(3, 3)
    ref.SetOrigin((centre - d @ (np.array([(n - 1) / 2 for n in size]) * SPACING)).tolist())
    return ref


def image_3mm(img: sitk.Image, ref: sitk.Image) -> sitk.Image:
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), SIGMA)
    out = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(sitk.Clamp(sitk.Round(out), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)


def classes_3mm(channels: list[sitk.Image], ref: sitk.Image) -> sitk.Image:
    """Argmax over linearly resampled class maps (channel 0 = background) -> uint8 labels."""
    stack = [
        sitk.GetArrayFromImage(
            sitk.Resample(sitk.Cast(c, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
        )
        for c in channels
    ]
    lab = sitk.GetImageFromArray(np.argmax(np.stack(stack), axis=0).astype(np.uint8))
    lab.CopyInformation(ref)
    return lab


def write(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), useCompression=True)


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    mni = shared / "mni_icbm152_2009a"
    vxm = shared / "voxelmorph_brain_t1"
    shutil.copy(mni / "LICENSE_nilearn.txt", OUT / "LICENSE_nilearn.txt")
    shutil.copy(shared / "afids_templates" / "LICENSE_tpl-MNI152NLin6Asym.txt", OUT / "LICENSE_MNI_template.txt")
    shutil.copy(vxm / "LICENSE_voxelmorph.md", OUT / "LICENSE_voxelmorph.md")

    t1 = sitk.ReadImage(str(mni / "template" / "image.nii.gz"))
    gm = sitk.Cast(sitk.ReadImage(str(mni / "template" / "gm_prob.nii.gz")), sitk.sitkFloat32) / 255.0
    wm = sitk.Cast(sitk.ReadImage(str(mni / "template" / "wm_prob.nii.gz")), sitk.sitkFloat32) / 255.0
    ref = grid_3mm(t1)
    write(image_3mm(t1, ref), OUT / "mni_image.nii.gz")
    rest = sitk.Clamp(1.0 - gm - wm, sitk.sitkFloat32, 0.0, 1.0)
    write(classes_3mm([rest, gm, wm], ref), OUT / "mni_labels.nii.gz")
    brain = sitk.BinaryFillhole(sitk.Cast((gm + wm) > 0.2, sitk.sitkUInt8))
    write(classes_3mm([1 - brain, brain], ref), OUT / "mni_mask.nii.gz")

    scan = sitk.ReadImage(str(vxm / "test_scan" / "image.nii.gz"))
    aseg = sitk.ReadImage(str(vxm / "test_scan" / "labels.nii.gz"))
    ref_m = grid_3mm(scan)
    write(image_3mm(scan, ref_m), OUT / "vxm_image.nii.gz")
    a = sitk.GetArrayFromImage(aseg)
    chans = []
    for values in ((), (3, 42), (2, 41)):
        c = np.isin(a, values).astype(np.float32) if values else (~np.isin(a, (3, 42, 2, 41))).astype(np.float32)
        img = sitk.GetImageFromArray(c)
        img.CopyInformation(aseg)
        chans.append(img)
    write(classes_3mm(chans, ref_m), OUT / "vxm_labels.nii.gz")
    m = sitk.Cast(sitk.ReadImage(str(vxm / "test_scan" / "mask.nii.gz")) > 0, sitk.sitkUInt8)
    write(classes_3mm([1 - m, m], ref_m), OUT / "vxm_mask.nii.gz")
    for f in sorted(OUT.glob("*.nii.gz")):
        img = sitk.ReadImage(str(f))
        arr = sitk.GetArrayViewFromImage(img)
        print(
            f"{f.name}: size {img.GetSize()}, origin {np.round(img.GetOrigin(), 2).tolist()}, "
            f"direction {np.round(img.GetDirection(), 3).tolist()}, values {int(arr.min())}..{int(arr.max())}, "
            f"{f.stat().st_size // 1024} KB"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data")
