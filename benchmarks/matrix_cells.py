"""The differential matrix of issue 25: its cells, its data and its evaluation, in one place.

``benchmarks/bench_matrix.py`` prints the whole table; ``tests/test_matrix.py`` runs the quick subset, one
test per cell. Both import this module (the test puts ``benchmarks/`` on ``sys.path``).

A **cell** is (pair, mask situation, stage list, loss, sampling, code path). Running a cell registers the pair
with maskreg and, in the same process, with ANTsPy under the same masks, then evaluates both transforms with
the same code:

* **Pairs** (all from ``resources/demo``, so the test needs no shared data):
  ``b2d_16_64`` and ``b2d_27_30`` (ANTsPy's 2D T1 slices, fixed r16 / moving r64 and fixed r27 / moving r30,
  256 x 256 at 1 mm; masks from ``maskreg.masks.auto_mask``); ``head2d`` (ITKElastix's 2D head pair with its
  own masks; the two scans have different contrasts); ``brain3d`` (MNI template (fixed) and the voxelmorph
  T1 (moving), the demo's 3 mm files resampled to 4 mm, brain masks, labels 1 = GM, 2 = WM); ``abdomen``
  (TotalSegmentator CT: ct_b (fixed, a 40 mm slab) and ct_a (moving), 3 mm; the masks are liver ROIs: the
  liver label dilated by 10 mm; 12 organ labels).
* **Mask situations**: ``none``; ``fixed`` (fixed mask only); ``both``; three masks whose edge cuts the
  anatomy, on both images: ``threshold`` (image > 20, 2D brain slices), ``ellipse`` (centred, radii 100 x 80
  px, 2D brain slices), ``eroded`` (the pair's masks eroded by 8 mm); ``roi`` (fixed only: a disc of 15 % of
  the image's area (2D) or a ball of radius 40 mm (3D) at the fixed mask's centroid); ``valid``
  (``mask_kinds=("valid", "valid")``: a field of view that cuts the anatomy, different on each image: an
  ultrasound-like cone in 2D, a half-space slab in 3D; the images are set to 0 outside it).
* **Stage lists**: ``moments``; linear cells ``[moments, T(loss)]`` for T in translation, rigid, similarity,
  affine; deformable cells ``[moments, affine(mi), D(loss)]`` for D in greedy, syn. Settings not named are
  the stage types' defaults (what a user gets). Losses mse, cc, mi, nmi. Sampling ``dense`` or
  ``{"random": 3000}`` (random with a linear cc stage must be refused: those cells check the ConfigError).
* **Code paths**: ``kernels`` (the compiled CPU kernels), ``torch`` (``MASKREG_CPU_KERNELS=0``: torch's own
  operators, the path CUDA runs), ``cuda`` (device ``cuda``; only when ``torch.cuda.is_available()``).
* **ANTsPy reference**: ``ants.registration`` with the same images and masks (``mask_all_stages=True`` so the
  affine part of SyN is masked too, as maskreg's is), ``random_seed=1`` (0 would mean "from the clock"), its
  defaults otherwise:
  ``Translation`` / ``Rigid`` / ``Similarity`` / ``Affine`` for the linear cells (moments: ``Translation``
  with 0 iterations, i.e. ANTs' centre-of-mass start), ``SyN`` for greedy and syn cells. Metric per loss:
  mse -> ``meansquares``, cc -> ``CC`` radius 2 (maskreg's window 5; in the linear stages too, where ANTsPy
  passes ``aff_sampling`` as the radius, with its regular 20 % sampling), gc (linear only) -> ``GC``, mi ->
  ``mattes``, nmi -> ``mattes`` (ANTs has no NMI); deformable cells use ``mattes`` for the affine part, as
  their maskreg affine stage uses mi. The reference depends on (pair, masks, transform, metrics) only, so it
  is run once per run of the process and shared by the cells that need the same one.
* **Evaluation** (one function for both methods; the pair's original images and labels, never the
  situation's altered ones): the moving image resampled linearly through the fixed -> moving transform;
  ``masked_ncc`` inside the situation's fixed mask (the whole image when there is none); where labels exist,
  the mean Dice (``dice_per_label``) of the fixed labels and the moving labels warped with
  ``maskreg.warp.warp_labels`` (generic), both restricted to that region, over the fixed labels with at least
  ``MIN_LABEL_VOXELS`` voxels in it (a label missing after warping counts 0). The head pair's only labels are
  its head masks (its contrasts differ, so its NCC does not measure alignment: a wrong mse affine scores
  NCC 0.38 against 0.27 for the right mi one, mask Dice 0.59 against 0.98).
  The **metric** of a cell is that Dice where labels exist, else the NCC.
* **Criteria** (``verdict``): no exception; with cc and mi (and moments): metric >= ANTsPy's - 0.02;
  a deformable cell's metric >= that of its linear part run alone (same stages without the deformable one,
  same masks, sampling and code path); no folding (``jacobian_nonpositive_fraction`` == 0; a linear cell's
  transform: determinant > 0, :func:`linear_determinant`). For mse and nmi the ANTsPy comparison is printed but
  not a criterion. A reference that folds space (a linear ANTsPy transform with determinant <= 0: on the thin
  abdominal slab without masks, ANTs' affine can flip and squash z and score a higher Dice) is no reference:
  the cell is NO-REF, with the reason.
* **Diagnosis** of a linear cell below ANTsPy (``objective_at``): maskreg's own loss at full resolution at both
  poses. If ANTsPy's pose has the lower loss, maskreg's optimiser stopped in a worse optimum; if maskreg's has,
  the loss itself ranks the poses against the metric (a loss that does not suit the pair); within ``FLAT`` of
  each other, the loss cannot tell them apart (a flat objective). For a deformable cell that ends below its
  linear start: its loss at full resolution at that start and at its last iteration (a loss that improved while
  the metric fell does not measure what the metric does on this pair).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / "resources" / "demo"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common  # noqa: E402

PAIRS = ("b2d_16_64", "b2d_27_30", "head2d", "brain3d", "abdomen")
SITUATIONS = ("none", "fixed", "both", "threshold", "ellipse", "eroded", "roi", "valid")
LINEAR = ("translation", "rigid", "similarity", "affine")
DEFORMABLE = ("greedy", "syn")
STAGES = ("moments",) + LINEAR + DEFORMABLE
LOSSES = ("mse", "cc", "mi", "nmi")
LINEAR_LOSSES = LOSSES + ("gc",)  # global correlation, against ANTs' GC
PATHS = ("kernels", "torch", "cuda")
RANDOM_POINTS = 3000
# antsRegistration's --random-seed must be nonzero: 0 means "seed from the clock" (its help: "the fixed seed can
# be any nonzero int value"); with random_seed=0 the same ANTsPy call gave Dice 0.11-0.35 on the abdomen pair
ANTS_SEED = 1
MARGIN = 0.02  # maskreg's metric may be at most this far below ANTsPy's (cc, mi, moments)
MIN_LABEL_VOXELS = 50
ERODE_MM = 8.0
ROI_AREA_FRACTION = 0.15  # 2D ROI disc
ROI_RADIUS_MM_3D = 40.0
LIVER = 5

# which mask situations each pair defines (threshold and ellipse are defined for the 2D brain slices)
PAIR_SITUATIONS = {
    "b2d_16_64": SITUATIONS,
    "b2d_27_30": SITUATIONS,
    "head2d": ("none", "fixed", "both", "eroded", "roi", "valid"),
    "brain3d": ("none", "fixed", "both", "eroded", "roi", "valid"),
    "abdomen": ("none", "fixed", "both"),
}

ANTS_TYPE = {
    "moments": "Translation",
    "translation": "Translation",
    "rigid": "Rigid",
    "similarity": "Similarity",
    "affine": "Affine",
    "greedy": "SyN",
    "syn": "SyN",
}
ANTS_LINEAR_METRIC = {"mse": "meansquares", "cc": "CC", "gc": "GC", "mi": "mattes", "nmi": "mattes", None: "mattes"}
ANTS_CC_RADIUS = 2  # voxels: maskreg's window 5
ANTS_SYN_METRIC = {
    "mse": ("meansquares", 32),
    "cc": ("CC", ANTS_CC_RADIUS),
    "mi": ("mattes", 32),
    "nmi": ("mattes", 32),
}


# ------------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    pair: str
    masks: str
    stage: str  # moments | translation | rigid | similarity | affine | greedy | syn
    loss: str | None  # mse | cc | gc | mi | nmi; None for moments
    sampling: str = "dense"  # dense | random
    path: str = "kernels"  # kernels | torch | cuda

    @property
    def id(self) -> str:
        return "-".join([self.pair, self.masks, self.stage, self.loss or "none", self.sampling, self.path])

    @property
    def deformable(self) -> bool:
        return self.stage in DEFORMABLE

    @property
    def rejected(self) -> bool:
        """A cell whose stage list maskreg must refuse (a linear cc stage with random sampling)."""
        return self.sampling == "random" and self.stage in LINEAR and self.loss == "cc"

    def stages(self, linear_only: bool = False) -> list[dict]:
        out: list[dict] = [{"type": "moments"}]
        if self.stage == "moments":
            return out
        if self.deformable:
            out.append({"type": "affine", "loss": "mi"})
            if not linear_only:
                out.append({"type": self.stage, "loss": self.loss})
            return out
        out.append({"type": self.stage, "loss": self.loss})
        return out

    def sampling_arg(self) -> str | dict:
        return {"random": RANDOM_POINTS} if self.sampling == "random" else "dense"


def _add(out: list[Cell], cell: Cell) -> None:
    if cell.masks not in PAIR_SITUATIONS[cell.pair]:
        raise ValueError(f"{cell.id}: pair {cell.pair} has no mask situation {cell.masks}")
    if cell not in out:
        out.append(cell)


def full_cells(cuda: bool | None = None) -> list[Cell]:
    """The covering set: every stage type x every loss on three pairs with masks; every mask situation of
    every pair with cc and mi, affine and syn; random sampling with mse/mi/nmi on the linear stages (and under
    the deformable ones, and with the small ROI and the valid FOV); the refused cc + random lists; a subset on
    the torch code path, and on CUDA when a GPU is there."""
    if cuda is None:
        cuda = cuda_available()
    out: list[Cell] = []
    # 1. every stage type x every loss, both masks
    for pair in ("b2d_16_64", "brain3d", "head2d"):
        _add(out, Cell(pair, "both", "moments", None))
        for st in LINEAR + DEFORMABLE if pair != "head2d" else ("rigid", "affine") + DEFORMABLE:
            for loss in LOSSES if st in DEFORMABLE else LINEAR_LOSSES:
                _add(out, Cell(pair, "both", st, loss))
    # 2. every mask situation x {affine, syn} x {cc, mi}, on every pair
    for pair in PAIRS:
        for masks in PAIR_SITUATIONS[pair]:
            for st in ("affine", "syn"):
                for loss in ("cc", "mi"):
                    _add(out, Cell(pair, masks, st, loss))
            _add(out, Cell(pair, masks, "affine", "gc"))
    for pair in ("b2d_16_64", "brain3d"):  # greedy under the cut-through / small / valid masks too
        for masks in ("eroded", "roi", "valid"):
            _add(out, Cell(pair, masks, "greedy", "cc"))
    _add(out, Cell("abdomen", "both", "greedy", "mi"))
    # 3. random sampling where allowed, and the refused combination
    for pair in ("b2d_16_64", "head2d", "brain3d", "abdomen"):
        for st in ("rigid", "affine"):
            for loss in ("mse", "mi", "nmi"):
                _add(out, Cell(pair, "both", st, loss, "random"))
    for pair in ("b2d_16_64", "brain3d"):
        for masks in ("roi", "valid"):
            _add(out, Cell(pair, masks, "affine", "mi", "random"))
        for loss in ("cc", "mi"):
            _add(out, Cell(pair, "both", "syn", loss, "random"))  # the affine(mi) part sampled at random
    for st in LINEAR:
        _add(out, Cell("b2d_16_64", "both", st, "cc", "random"))
    # 4. the torch code path (and CUDA) on a subset
    subset = [Cell("brain3d", "both", st, loss) for st in ("affine", "greedy", "syn") for loss in ("cc", "mi")]
    subset += [
        Cell("brain3d", "both", "syn", "mse"),
        Cell("brain3d", "both", "syn", "nmi"),
        Cell("brain3d", "both", "affine", "mi", "random"),
        Cell("brain3d", "valid", "syn", "cc"),
        Cell("brain3d", "roi", "syn", "mi"),
        Cell("b2d_16_64", "both", "syn", "cc"),
        Cell("b2d_16_64", "both", "syn", "mi"),
        Cell("b2d_16_64", "valid", "syn", "cc"),
        Cell("b2d_16_64", "both", "affine", "mi"),
        Cell("head2d", "both", "syn", "mi"),
        Cell("abdomen", "both", "syn", "cc"),
        Cell("abdomen", "both", "affine", "mi"),
        # local cc slid the overlap off a 13-slice slab until the loss counted the whole fixed mask
        Cell("abdomen", "both", "affine", "cc"),
    ]
    for path in ("torch",) + (("cuda",) if cuda else ()):
        for c in subset:
            _add(out, Cell(c.pair, c.masks, c.stage, c.loss, c.sampling, path))
    return out


def quick_cells(cuda: bool | None = None) -> list[Cell]:
    """The CI subset (<= 2 min on 2 cores with ANTsPy): every pair, every mask situation, every stage type,
    every loss, both samplings (and the refusal), both CPU code paths; CUDA cells when a GPU is there."""
    if cuda is None:
        cuda = cuda_available()
    out = [
        Cell("b2d_16_64", "both", "moments", None),
        Cell("b2d_16_64", "both", "syn", "cc"),
        Cell("b2d_16_64", "both", "affine", "mi"),
        Cell("b2d_16_64", "both", "translation", "mse"),
        Cell("b2d_16_64", "both", "similarity", "nmi"),
        Cell("b2d_16_64", "none", "syn", "mi"),
        Cell("b2d_16_64", "fixed", "syn", "cc"),
        Cell("b2d_16_64", "threshold", "affine", "cc"),
        Cell("b2d_16_64", "ellipse", "syn", "mi"),
        Cell("b2d_16_64", "eroded", "syn", "cc"),
        Cell("b2d_16_64", "roi", "syn", "mi"),
        Cell("b2d_16_64", "valid", "syn", "cc"),
        Cell("b2d_16_64", "valid", "affine", "mi", "random"),
        Cell("b2d_16_64", "both", "rigid", "nmi", "random"),
        Cell("b2d_16_64", "both", "affine", "cc", "random"),  # must be refused
        Cell("b2d_27_30", "both", "syn", "mi"),
        Cell("head2d", "both", "syn", "mi"),
        Cell("head2d", "both", "rigid", "cc"),
        Cell("brain3d", "both", "syn", "cc"),
        Cell("brain3d", "both", "greedy", "mi"),
        Cell("brain3d", "both", "affine", "mse", "random"),
        Cell("brain3d", "both", "syn", "cc", path="torch"),
        # masks of different extents and valid masks in 3D: an OverlapError at the coarsest level until e87ab7e
        Cell("brain3d", "eroded", "syn", "cc"),
        Cell("brain3d", "valid", "affine", "mi"),
        Cell("b2d_16_64", "both", "syn", "mi", path="torch"),
        Cell("abdomen", "both", "syn", "cc"),
        Cell("abdomen", "both", "affine", "mi"),
        # local cc slid the overlap off a 13-slice slab until the loss counted the whole fixed mask
        Cell("abdomen", "both", "affine", "cc"),
        # the field's box folded at its face (zero padding in the elastic smoothing) until smooth_field
        Cell("b2d_16_64", "both", "greedy", "cc"),
        Cell("b2d_16_64", "fixed", "affine", "gc"),  # global correlation against ANTs' GC, like for like
    ]
    if cuda:
        out += [
            Cell("brain3d", "both", "syn", "cc", path="cuda"),
            Cell("b2d_16_64", "both", "syn", "mi", path="cuda"),
            Cell("b2d_16_64", "valid", "syn", "cc", path="cuda"),
        ]
    return out


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------- threads


def configure_threads(n: int = 1) -> None:
    """Limit torch, SimpleITK/ITK (also ANTs' ITK, when set before it is first used) and OpenMP to ``n``
    (:func:`common.set_threads`)."""
    common.set_threads(n, libraries=True)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Pair:
    name: str
    fixed: Any
    moving: Any
    fixed_mask: Any
    moving_mask: Any
    fixed_labels: Any = None
    moving_labels: Any = None
    note: str = ""

    @property
    def dim(self) -> int:
        return self.fixed.GetDimension()

    @property
    def metric(self) -> str:
        return "dice" if self.fixed_labels is not None else "ncc"


@dataclass
class Situation:
    fixed: Any
    moving: Any
    fixed_mask: Any
    moving_mask: Any
    kinds: tuple[str, str]
    region: np.ndarray | None  # evaluation weight on the fixed grid (None: the whole image)
    eval_labels: list[int] | None
    files: dict[str, str] = field(default_factory=dict)


_PAIRS: dict[str, Pair] = {}
_SITS: dict[tuple[str, str], Situation] = {}
_ANTS: dict[tuple, dict] = {}
_LINEAR: dict[tuple, dict] = {}
_TMP: list[str] = []


def _tmpdir() -> Path:
    if not _TMP:
        d = tempfile.mkdtemp(prefix="maskreg_matrix_")
        _TMP.append(d)
        atexit.register(shutil.rmtree, d, True)
    return Path(_TMP[0])


def _sitk():
    import SimpleITK as sitk

    return sitk


def _float(img):
    sitk = _sitk()
    return sitk.Cast(img, sitk.sitkFloat32)


def _u8(arr: np.ndarray, ref):
    sitk = _sitk()
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(ref)
    return img


def _resample_iso(img, spacing: float, kind: str):
    """Resample onto an isotropic grid with the same centre and direction: images after a Gaussian anti-alias
    (sigma = 1/2 sqrt(s_new^2 - s^2) mm), masks linearly then > 0.5, labels nearest neighbour."""
    sitk = _sitk()
    dim = img.GetDimension()
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=False)]
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    direction = np.array(img.GetDirection()).reshape(dim, dim)
    origin = centre - direction @ (np.array([(n - 1) / 2 for n in size]) * spacing)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing] * dim)
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(img.GetDirection())
    if kind == "image":
        sig = [0.5 * math.sqrt(max(spacing**2 - s**2, 0.0)) for s in img.GetSpacing()]
        src = sitk.SmoothingRecursiveGaussian(_float(img), sig) if max(sig) > 0 else _float(img)
        return sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if kind == "mask":
        r = sitk.Resample(_float(img), ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.Cast(r > 0.5, sitk.sitkUInt8)
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())


def load_pair(name: str) -> Pair:
    """One pair, built once per process from ``resources/demo`` (deterministic)."""
    if name in _PAIRS:
        return _PAIRS[name]
    sitk = _sitk()
    from maskreg.masks import auto_mask, dilate_mm

    read = lambda p: sitk.ReadImage(str(DEMO / p))  # noqa: E731
    if name.startswith("b2d_"):
        a, b = name.split("_")[1:]
        f, m = _float(read(f"antspy_brain2d/r{a}.nii.gz")), _float(read(f"antspy_brain2d/r{b}.nii.gz"))
        pair = Pair(name, f, m, auto_mask(f), auto_mask(m), note=f"fixed r{a}, moving r{b}; auto_mask masks")
    elif name == "head2d":
        d = "elastix_ct2d_head/"
        fm = sitk.Cast(read(d + "fixed_mask.nii.gz"), sitk.sitkUInt8)
        mm = sitk.Cast(read(d + "moving_mask.nii.gz"), sitk.sitkUInt8)
        f, m = _float(read(d + "fixed.nii.gz")), _float(read(d + "moving.nii.gz"))
        # labels: each image's own head (intensity > 20). The pair's masks are not that: the moving mask has the
        # fixed head's bulge, which the moving image lacks (the masks' Dice is 0.979 as given, 0.996 after the
        # affine), so a deformable stage that matches the anatomy lowered a mask "Dice" (0.996 -> 0.980) while
        # it raised the heads' (0.945 -> 0.957)
        pair = Pair(
            name,
            f,
            m,
            fm,
            mm,
            fixed_labels=sitk.Cast(f > 20, sitk.sitkUInt8),
            moving_labels=sitk.Cast(m > 20, sitk.sitkUInt8),
            note="ITKElastix head pair, its masks; labels = each image's head (intensity > 20)",
        )
    elif name == "brain3d":
        d = "brain3d/"
        pair = Pair(
            name,
            _resample_iso(read(d + "mni_image.nii.gz"), 4.0, "image"),
            _resample_iso(read(d + "vxm_image.nii.gz"), 4.0, "image"),
            _resample_iso(read(d + "mni_mask.nii.gz"), 4.0, "mask"),
            _resample_iso(read(d + "vxm_mask.nii.gz"), 4.0, "mask"),
            _resample_iso(read(d + "mni_labels.nii.gz"), 4.0, "labels"),
            _resample_iso(read(d + "vxm_labels.nii.gz"), 4.0, "labels"),
            note="MNI (fixed) / voxelmorph T1 (moving) at 4 mm; labels GM, WM",
        )
    elif name == "abdomen":
        d = "totalseg_ct/"
        fl, ml = read(d + "ct_b_labels.nii.gz"), read(d + "ct_a_labels.nii.gz")
        froi = dilate_mm(sitk.Cast(fl == LIVER, sitk.sitkUInt8), 10.0)
        mroi = dilate_mm(sitk.Cast(ml == LIVER, sitk.sitkUInt8), 10.0)
        pair = Pair(
            name,
            _float(read(d + "ct_b_image.nii.gz")),
            _float(read(d + "ct_a_image.nii.gz")),
            froi,
            mroi,
            fl,
            ml,
            note="ct_b (fixed) / ct_a (moving), 3 mm; masks = liver + 10 mm",
        )
    else:
        raise KeyError(f"unknown pair {name}; choose from {', '.join(PAIRS)}")
    _PAIRS[name] = pair
    return pair


def _arr(img) -> np.ndarray:
    return _sitk().GetArrayFromImage(img)


def _disc_or_ball(ref, centre_idx, radius_mm: float) -> np.ndarray:
    """Boolean array (numpy order) of the voxels of ``ref`` within ``radius_mm`` of voxel ``centre_idx``."""
    dim = ref.GetDimension()
    shape = ref.GetSize()[::-1]
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    sp = ref.GetSpacing()[::-1]
    c = list(centre_idx)[::-1]
    d2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip(grids, c, sp, strict=False))
    assert len(grids) == dim
    return d2 <= radius_mm**2


def _cone(ref, apex_xy: tuple[float, float], half_angle_deg: float, radius: float) -> np.ndarray:
    """A 2D ultrasound-like cone (numpy order, y down): apex above the image, opening downwards."""
    ny, nx = ref.GetSize()[1], ref.GetSize()[0]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    dx, dy = xx - apex_xy[0], yy - apex_xy[1]
    ang = np.degrees(np.arctan2(np.abs(dx), dy))
    return (dy > 0) & (np.hypot(dx, dy) <= radius) & (ang <= half_angle_deg)


def _slab(ref, mask, keep: str, offset_mm: float) -> np.ndarray:
    """A 3D field of view cut by an axial plane (LPS z): ``keep='above'`` keeps z >= centroid z - offset,
    ``'below'`` keeps z <= centroid z + offset, the centroid being that of ``mask``."""
    from maskreg.masks import centroid_index

    zc = ref.TransformIndexToPhysicalPoint([int(v) for v in centroid_index(mask)])[2]
    shape = ref.GetSize()[::-1]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)[:, ::-1]
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    pts = np.array(ref.GetOrigin()) + (idx * np.array(ref.GetSpacing())) @ direction.T
    z = pts[:, 2].reshape(shape)
    return z >= zc - offset_mm if keep == "above" else z <= zc + offset_mm


def load_situation(pair_name: str, masks: str) -> Situation:
    """The images, masks and kinds a mask situation gives maskreg and ANTsPy, and its evaluation region."""
    key = (pair_name, masks)
    if key in _SITS:
        return _SITS[key]
    if masks not in PAIR_SITUATIONS[pair_name]:
        raise KeyError(f"pair {pair_name} has no mask situation {masks}")
    sitk = _sitk()
    from maskreg.masks import centroid_index, erode_mm

    p = load_pair(pair_name)
    f, m, fm, mm, kinds = p.fixed, p.moving, None, None, ("roi", "roi")
    if masks == "fixed":
        fm = p.fixed_mask
    elif masks == "both":
        fm, mm = p.fixed_mask, p.moving_mask
    elif masks == "threshold":
        fm, mm = sitk.Cast(p.fixed > 20, sitk.sitkUInt8), sitk.Cast(p.moving > 20, sitk.sitkUInt8)
    elif masks == "ellipse":

        def ellipse(ref):
            ny, nx = ref.GetSize()[1], ref.GetSize()[0]
            yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
            return _u8(((xx - (nx - 1) / 2) / 100.0) ** 2 + ((yy - (ny - 1) / 2) / 80.0) ** 2 <= 1.0, ref)

        fm, mm = ellipse(p.fixed), ellipse(p.moving)
    elif masks == "eroded":
        fm, mm = erode_mm(p.fixed_mask, ERODE_MM), erode_mm(p.moving_mask, ERODE_MM)
    elif masks == "roi":
        c = centroid_index(p.fixed_mask)
        if p.dim == 2:
            area = ROI_AREA_FRACTION * p.fixed.GetSize()[0] * p.fixed.GetSize()[1] * np.prod(p.fixed.GetSpacing())
            r = math.sqrt(area / math.pi)
        else:
            r = ROI_RADIUS_MM_3D
        fm = _u8(_disc_or_ball(p.fixed, c, r), p.fixed)
    elif masks == "valid":
        if p.dim == 2:
            fcone = _cone(p.fixed, (128.0, -30.0), 38.0, 270.0)
            mcone = _cone(p.moving, (118.0, -20.0), 34.0, 260.0)
        else:
            fcone = _slab(p.fixed, p.fixed_mask, "above", 20.0)
            mcone = _slab(p.moving, p.moving_mask, "below", 25.0)
        fm, mm = _u8(fcone, p.fixed), _u8(mcone, p.moving)
        # outside the field of view the data mean nothing: 0, as an ultrasound scanner writes them
        f, m = p.fixed * sitk.Cast(fm, sitk.sitkFloat32), p.moving * sitk.Cast(mm, sitk.sitkFloat32)
        kinds = ("valid", "valid")
    region = None if fm is None else _arr(fm) > 0
    labels = None
    if p.fixed_labels is not None:
        fl = _arr(p.fixed_labels)
        inside = fl if region is None else np.where(region, fl, 0)
        vals, counts = np.unique(inside, return_counts=True)
        labels = [int(v) for v, n in zip(vals, counts, strict=False) if v != 0 and n >= MIN_LABEL_VOXELS]
    sit = Situation(f, m, fm, mm, kinds, region, labels)
    _SITS[key] = sit
    return sit


def _situation_files(pair_name: str, masks: str) -> dict[str, str]:
    sit = load_situation(pair_name, masks)
    if not sit.files:
        sitk = _sitk()
        d = _tmpdir() / f"{pair_name}_{masks}"
        d.mkdir(parents=True, exist_ok=True)
        for role, img in (
            ("fixed", sit.fixed),
            ("moving", sit.moving),
            ("fixed_mask", sit.fixed_mask),
            ("moving_mask", sit.moving_mask),
        ):
            if img is not None:
                path = d / f"{role}.nii.gz"
                sitk.WriteImage(img, str(path))
                sit.files[role] = str(path)
        # the weights of maskreg's moments stage: (intensity - its minimum inside the mask) x mask
        for role, img, mask in (("fixed_com", sit.fixed, sit.fixed_mask), ("moving_com", sit.moving, sit.moving_mask)):
            a = _arr(img).astype(np.float32)
            m = np.ones(a.shape, bool) if mask is None else _arr(mask) > 0
            w = sitk.GetImageFromArray(np.where(m, a - a[m].min(), 0).astype(np.float32))
            w.CopyInformation(img)
            path = d / f"{role}.nii.gz"
            sitk.WriteImage(w, str(path))
            sit.files[role] = str(path)
    return sit.files


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(pair_name: str, masks: str, transform) -> dict[str, float]:
    """NCC inside the situation's fixed mask (whole image without one) and, where labels exist, the mean
    Dice inside it; of the pair's original images and labels, for a fixed -> moving SimpleITK transform."""
    sitk = _sitk()
    from maskreg.qc.metrics import masked_ncc
    from maskreg.warp import warp_labels

    p, sit = load_pair(pair_name), load_situation(pair_name, masks)
    warped = sitk.Resample(p.moving, p.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out = {"ncc": masked_ncc(p.fixed, warped, None if sit.region is None else sit.region.astype(np.float32))}
    if p.fixed_labels is not None:
        wl = _arr(warp_labels(p.moving_labels, p.fixed, transform, "generic"))
        fl = _arr(p.fixed_labels)
        if sit.region is not None:
            fl, wl = np.where(sit.region, fl, 0), np.where(sit.region, wl, 0)
        out["dice"] = common.mean_dice(common.dice(fl, wl, sit.eval_labels)) if sit.eval_labels else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- runners


@contextlib.contextmanager
def code_path(path: str):
    """``kernels``: the compiled CPU kernels; ``torch`` and ``cuda``: torch's own operators
    (:func:`maskreg.engine.cpu_kernels.switched`); yields the device for ``maskreg.register``."""
    from maskreg.engine import cpu_kernels

    with cpu_kernels.switched(path == "kernels"):
        yield "cuda" if path == "cuda" else "cpu"


def run_maskreg(cell: Cell, stages: list[dict], threads: int = 1, initial=None) -> tuple[Any, float]:
    """maskreg on the cell's images and masks, on its code path (from ``initial``, a fixed -> moving SimpleITK
    transform, where given): the result and the call's wall time."""
    sit = load_situation(cell.pair, cell.masks)
    with code_path(cell.path) as device:
        run = common.maskreg_call(
            sit.fixed,
            sit.moving,
            sit.fixed_mask,
            sit.moving_mask,
            stages,
            device=device,
            warm=False,  # bench_matrix.py and tests/test_matrix.py load the kernels once, before the first cell
            sampling=cell.sampling_arg(),
            mask_kinds=sit.kinds,
            threads=threads,
            seed=0,
            subject=cell.id,
            initial=initial,
        )
        return common.timed(run)


def ants_settings(cell: Cell) -> dict[str, Any]:
    kw: dict[str, Any] = {"type_of_transform": ANTS_TYPE[cell.stage], "random_seed": ANTS_SEED}
    if cell.stage == "moments":
        kw["aff_iterations"] = (0, 0, 0, 0)  # only the centre-of-mass initial transform
    if cell.deformable:
        kw["aff_metric"] = "mattes"
        kw["syn_metric"], kw["syn_sampling"] = ANTS_SYN_METRIC[cell.loss]
    else:
        kw["aff_metric"] = ANTS_LINEAR_METRIC[cell.loss]
        if kw["aff_metric"] == "CC":  # ANTsPy passes aff_sampling as the metric's fourth parameter: CC's radius
            kw["aff_sampling"] = ANTS_CC_RADIUS
    return kw


def ants_settings_text(cell: Cell) -> str:
    kw = ants_settings(cell)
    s = kw["type_of_transform"]
    if cell.stage == "moments":
        return s + " 0 it (default COM start)"
    s += f" {kw['aff_metric']}" + (f"[r{kw['aff_sampling']}]" if kw["aff_metric"] == "CC" else "")
    if cell.deformable:
        s += f"+{kw['syn_metric']}" + (f"[r{kw['syn_sampling']}]" if kw["syn_metric"] == "CC" else "")
    return s


def run_ants(cell: Cell) -> dict:
    """ANTsPy on the cell's images and masks (cached per process by what it depends on): the evaluation of its
    fixed -> moving transform, its time, or the error."""
    kw = ants_settings(cell)
    key = (cell.pair, cell.masks, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key in _ANTS:
        return _ANTS[key]
    try:
        files = _situation_files(cell.pair, cell.masks)
        fixed, moving, fm, mm = common.ants_pair(files, pixeltype="float")
        if cell.stage != "moments":  # the same centre-of-mass start as maskreg's moments stage
            kw = {**kw, "initial_transform": [f"[{files['fixed_com']},{files['moving_com']},1]"]}
        outdir = _tmpdir() / "ants" / f"{len(_ANTS):04d}"
        run = common.ants_call(fixed, moving, outdir, mask=fm, moving_mask=mm, mask_all_stages=True, **kw)
        reg, seconds = common.timed(run)
        tx = common.read_transform_files(reg["fwdtransforms"])
        out = {"metrics": evaluate(cell.pair, cell.masks, tx), "seconds": seconds, "error": None, "transform": tx}
    except Exception as exc:  # noqa: BLE001 (a peer's failure is recorded, not raised)
        out = {"metrics": None, "seconds": None, "error": f"{type(exc).__name__}: {exc}", "transform": None}
    _ANTS[key] = out
    return out


def objective_at(cell: Cell, transform, threads: int = 1) -> float:
    """maskreg's own loss for the cell's last stage, at full resolution, at ``transform`` (fixed -> moving,
    SimpleITK): one iteration of that stage at scale 1 started there, its first loss (before its step). It tells
    a pose the loss prefers (lower) from one the metric prefers: where ANTsPy's pose scores better on the metric
    but worse on this loss, the loss itself disagrees with the metric (two contrasts, a flat objective), not the
    optimiser."""
    probe = {**cell.stages()[-1], "scales": [1], "iterations": [1]}
    res, _ = run_maskreg(cell, [probe], threads, initial=transform)
    return res.stages[-1].levels[0].loss_first


def _loss_at(cell: Cell, row: dict, transforms: list, threads: int) -> tuple[float, ...] | None:
    """:func:`objective_at` of each transform; a failure is recorded in ``row['obj_error']``, not raised (a
    diagnostic)."""
    try:
        return tuple(objective_at(cell, t, threads) for t in transforms)
    except Exception as exc:  # noqa: BLE001
        row["obj_error"] = f"{type(exc).__name__}: {exc}"
        return None


def _diagnose_linear(cell: Cell, row: dict, mr_transform, ants_transform, threads: int) -> None:
    """A linear cell below a valid ANTsPy reference: maskreg's loss at both poses (``row['obj']``)."""
    below = not _bad(row.get("mr")) and not _bad(row.get("ants_v")) and row["mr"] < row["ants_v"] - MARGIN
    if cell.stage == "moments" or not below or ants_transform is None or row.get("ants_det", 1.0) <= 0:
        return
    row["obj"] = _loss_at(cell, row, [mr_transform, ants_transform], threads)


def _diagnose_deformable(cell: Cell, row: dict, linear_transform, res, threads: int) -> None:
    """A deformable cell that ends below its linear start: its stage's loss at full resolution at that start
    and at its last iteration (``row['obj_deformable']``)."""
    last = res.stages[-1].levels[-1]
    if _bad(row.get("mr")) or _bad(row.get("lin")) or row["mr"] >= row["lin"] or last.scale != 1:
        return
    start = _loss_at(cell, row, [linear_transform], threads)
    if start is not None:
        row["obj_deformable"] = (start[0], last.loss_last)


def _linear_only(cell: Cell, threads: int) -> dict:
    key = (cell.pair, cell.masks, cell.sampling, cell.path)
    if key not in _LINEAR:
        try:
            res, secs = run_maskreg(cell, cell.stages(linear_only=True), threads)
            transform = common.as_sitk(res.transform())
            _LINEAR[key] = {
                "transform": transform,
                "metrics": evaluate(cell.pair, cell.masks, transform),
                "seconds": secs,
                "error": None,
            }
        except Exception as exc:  # noqa: BLE001
            _LINEAR[key] = {"metrics": None, "seconds": None, "error": f"{type(exc).__name__}: {exc}"}
    return _LINEAR[key]


def run_cell(cell: Cell, threads: int = 1) -> dict:
    """Run one cell; never raises. Returns the table row with ``status`` (PASS, FAIL, SKIP, NO-REF) and
    ``reason``."""
    row: dict[str, Any] = {
        "id": cell.id,
        "pair": cell.pair,
        "masks": cell.masks,
        "stages": stages_text(cell),
        "loss": cell.loss or "-",
        "sampling": cell.sampling,
        "path": cell.path,
        "ants": ants_settings_text(cell),
    }
    t_cell = time.perf_counter()
    try:
        if cell.path == "cuda" and not cuda_available():
            return _finish(row, "SKIP", ["CUDA not available"], t_cell)
        if cell.path == "kernels":
            from maskreg.engine import cpu_kernels

            with code_path("kernels"):
                if not cpu_kernels.available():
                    return _finish(row, "SKIP", ["compiled CPU kernels not available (numba missing)"], t_cell)
        pair = load_pair(cell.pair)
        row["metric"] = pair.metric
        if cell.rejected:
            return _check_rejected(cell, row, threads, t_cell)
        try:
            res, secs = run_maskreg(cell, cell.stages(), threads)
        except Exception as exc:  # noqa: BLE001
            row["error"] = traceback.format_exc(limit=3)
            _reference(cell, row, pair)  # still shown: what ANTsPy makes of the same cell
            return _finish(row, "FAIL", [f"maskreg raised {type(exc).__name__}: {exc}"], t_cell)
        row["mr_s"] = secs
        mr_transform = common.as_sitk(res.transform())
        mr = evaluate(cell.pair, cell.masks, mr_transform)
        row["mr"], row["mr_ncc"] = mr.get(pair.metric), mr["ncc"]
        if cell.deformable:
            row["fold"] = res.jacobian_nonpositive_fraction
            lin = _linear_only(cell, threads)
            row["lin"] = None if lin["metrics"] is None else lin["metrics"].get(pair.metric)
            row["lin_error"] = lin["error"]
            _reference(cell, row, pair)
            _diagnose_deformable(cell, row, lin.get("transform"), res, threads)
        else:
            row["det"] = linear_determinant(mr_transform, pair.fixed)
            ref = _reference(cell, row, pair)
            _diagnose_linear(cell, row, mr_transform, ref.get("transform"), threads)
        status, reasons = verdict(cell, row)
        return _finish(row, status, reasons, t_cell)
    except Exception as exc:  # noqa: BLE001 (the harness itself: still one row)
        row["error"] = traceback.format_exc(limit=5)
        return _finish(row, "FAIL", [f"harness error {type(exc).__name__}: {exc}"], t_cell)


def _reference(cell: Cell, row: dict, pair: Pair) -> dict:
    """ANTsPy's figures for the cell into ``row``; returns :func:`run_ants`'s record (its transform included)."""
    ref = run_ants(cell)
    row["ants_s"] = ref["seconds"]
    row["ants_error"] = ref["error"]
    if ref["metrics"] is not None:
        row["ants_v"], row["ants_ncc"] = ref["metrics"].get(pair.metric), ref["metrics"]["ncc"]
    if not cell.deformable and ref.get("transform") is not None:
        row["ants_det"] = linear_determinant(ref["transform"], pair.fixed)
    return ref


def linear_determinant(transform, fixed) -> float:
    """The Jacobian determinant of a fixed -> moving SimpleITK transform at the fixed image's centre (central
    differences of 1 mm along the physical axes; constant for a linear transform). ``<= 0``: the map reflects or
    collapses space, a folded registration however well it scores."""
    from maskreg.engine.grid import Grid

    centre = Grid.of(fixed).centre()
    cols = [
        (
            np.asarray(transform.TransformPoint(tuple(centre + e)))
            - np.asarray(transform.TransformPoint(tuple(centre - e)))
        )
        / 2
        for e in np.eye(fixed.GetDimension())
    ]
    return float(np.linalg.det(np.stack(cols, 1)))


def _check_rejected(cell: Cell, row: dict, threads: int, t_cell: float) -> dict:
    from maskreg.errors import ConfigError

    row["ants"] = "-"
    try:
        res, secs = run_maskreg(cell, cell.stages(), threads)
    except ConfigError as exc:
        msg = str(exc)
        row["mr_text"] = "refused"
        if "dense" in msg and "cc" in msg:
            return _finish(row, "PASS", [f"refused: {msg.splitlines()[-1].strip()}"], t_cell)
        return _finish(row, "FAIL", [f"ConfigError without the reason (dense sampling, cc): {msg}"], t_cell)
    except Exception as exc:  # noqa: BLE001
        return _finish(row, "FAIL", [f"expected ConfigError, got {type(exc).__name__}: {exc}"], t_cell)
    row["mr_s"] = secs
    return _finish(row, "FAIL", ["cc with random sampling ran instead of being refused"], t_cell)


def _finish(row: dict, status: str, reasons: list[str], t_cell: float) -> dict:
    row["status"] = status
    row["reason"] = "; ".join(reasons)
    row["cell_s"] = time.perf_counter() - t_cell
    return row


def _bad(v) -> bool:
    return v is None or not np.isfinite(v)


def verdict(cell: Cell, row: dict) -> tuple[str, list[str]]:
    """PASS / FAIL / NO-REF and the reasons, from a row of :func:`run_cell` (criteria in the module doc)."""
    fails, notes = [], []
    name = row.get("metric", "metric")
    mr, ants_v = row.get("mr"), row.get("ants_v")
    if _bad(mr):
        fails.append(f"maskreg {name} is {mr}")
    compared = cell.stage == "moments" or cell.loss in ("cc", "gc", "mi")
    no_ref = False
    if row.get("ants_error"):
        no_ref = True
        notes.append(f"ANTsPy failed: {row['ants_error']}")
    elif _bad(ants_v):
        no_ref = True
        notes.append(f"ANTsPy {name} is {ants_v}")
    elif row.get("ants_det") is not None and row["ants_det"] <= 0:
        no_ref = True
        notes.append(
            f"ANTsPy's transform folds space (det {row['ants_det']:.3f}; its {name} {ants_v:.3f}): not a reference"
        )
    elif not _bad(mr):
        if compared and mr < ants_v - MARGIN:
            fails.append(f"{name} {mr:.3f} < ANTsPy {ants_v:.3f} - {MARGIN}")
            if row.get("obj"):
                own, ref = row["obj"]
                fails.append(
                    f"maskreg's {cell.loss} at its pose {own:.4f}, at ANTsPy's {ref:.4f}: " + _ranking(own, ref)
                )
            elif row.get("obj_error"):
                notes.append(f"loss at the poses not measured: {row['obj_error']}")
        elif not compared and mr < ants_v - MARGIN:
            notes.append(f"info ({cell.loss}, not a criterion): {name} {mr - ants_v:+.3f} vs ANTsPy")
    if row.get("det") is not None and row["det"] <= 0:
        fails.append(f"maskreg's transform folds space (det {row['det']:.3f})")
    if cell.deformable:
        lin = row.get("lin")
        if row.get("lin_error"):
            fails.append(f"linear-only run raised {row['lin_error']}")
        elif _bad(lin):
            fails.append(f"linear-only {name} is {lin}")
        elif not _bad(mr) and mr < lin:
            fails.append(f"{cell.stage} ends below its linear start: {name} {mr:.4f} < {lin:.4f}")
            if row.get("obj_deformable"):
                start, end = row["obj_deformable"]
                fails.append(
                    f"its {cell.loss} at full resolution {start:.4f} at the linear start, {end:.4f} at its last "
                    + ("iteration: the loss improved while the metric fell" if end < start else "iteration")
                )
        fold = row.get("fold")
        if fold is None or fold > 0:
            fails.append(
                f"folding: det J <= 0 at {fold * 100:.3f} % of voxels" if fold is not None else "no Jacobian reported"
            )
    if fails:
        return "FAIL", fails + notes
    if no_ref:
        return "NO-REF", notes
    return "PASS", notes


FLAT = 0.01  # two poses whose losses differ by less than this fraction are a tie for the loss


def _ranking(own: float, ref: float) -> str:
    """What maskreg's loss at its pose (``own``) and at ANTsPy's (``ref``) say (lower is better)."""
    if abs(own - ref) < FLAT * max(abs(own), abs(ref), 1e-12):
        return f"a tie within {FLAT:.0%} (the loss is flat between the poses the metric ranks apart)"
    return "the loss prefers maskreg's pose" if own < ref else "maskreg stopped in a worse optimum"


def stages_text(cell: Cell) -> str:
    parts = []
    for s in cell.stages():
        parts.append(s["type"] if s["type"] == "moments" else f"{s['type']}({s['loss']})")
    return ">".join(parts)


# ------------------------------------------------------------------------------------------------ table

COLUMNS = [
    ("pair", "pair"),
    ("masks", "masks"),
    ("stages", "stages"),
    ("loss", "loss"),
    ("sampling", "sampling"),
    ("path", "path"),
    ("metric", "metric"),
    ("mr_f", "maskreg"),
    ("ants_f", "ANTsPy"),
    ("diff_f", "diff"),
    ("lin_f", "linear only"),
    ("fold_f", "fold %"),
    ("ncc_f", "NCC mr/ANTs"),
    ("det_f", "det mr/ANTs"),
    ("obj_f", "loss at mr/ANTs pose"),
    ("mr_s_f", "mr s"),
    ("ants_s_f", "ANTs s"),
    ("ants", "ANTsPy run"),
    ("status", "status"),
    ("reason", "reason"),
]


def format_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        r["mr_f"] = r.get("mr_text") or common.fmt(r.get("mr"), 3)
        r["ants_f"] = common.fmt(r.get("ants_v"), 3)
        r["diff_f"] = (
            common.fmt(r["mr"] - r["ants_v"], 3, sign=True)
            if not _bad(r.get("mr")) and not _bad(r.get("ants_v"))
            else "-"
        )
        r["lin_f"] = common.fmt(r.get("lin"), 3)
        r["fold_f"] = common.fmt(None if r.get("fold") is None else 100 * r["fold"], 3)
        r["ncc_f"] = (
            f"{common.fmt(r.get('mr_ncc'), 3)}/{common.fmt(r.get('ants_ncc'), 3)}"
            if r.get("metric") == "dice" and r.get("mr_ncc") is not None
            else "-"
        )
        r["det_f"] = (
            f"{common.fmt(r.get('det'), 2)}/{common.fmt(r.get('ants_det'), 2)}" if r.get("det") is not None else "-"
        )
        r["obj_f"] = "/".join(common.fmt(v, 4) for v in r["obj"]) if r.get("obj") else "-"
        r["mr_s_f"] = common.fmt(r.get("mr_s"), 2)
        r["ants_s_f"] = common.fmt(r.get("ants_s"), 2)
        out.append(r)
    return out


def table(rows: list[dict]) -> str:
    return common.format_table(format_rows(rows), COLUMNS)


def summary(rows: list[dict]) -> str:
    from collections import Counter

    c = Counter(r["status"] for r in rows)
    return ", ".join(f"{k} {c[k]}" for k in ("PASS", "FAIL", "NO-REF", "SKIP") if c[k]) + f" of {len(rows)} cells"
