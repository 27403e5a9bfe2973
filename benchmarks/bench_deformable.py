"""Deformable registration on real brain pairs (3D, and one 2D): maskreg vs ANTsPy (SyN, SyNQuick) vs FireANTs.

Run: ``.venv/bin/python benchmarks/bench_deformable.py [--res 2 1] [--pairs brain afids] [--repeats 1] [--rounds 1]
[--methods maskreg maskreg-fast ants-syn ants-synquick fireants] [--maskreg-fast YAML] [--threads 2] [--quick]``.

Two pairs, at 2 mm (default: images resampled to 2 mm isotropic after a Gaussian anti-alias, masks resampled
linearly and thresholded at 0.5, label maps with nearest neighbour) and/or 1 mm (the images as they are):

* ``brain``: fixed = the MNI ICBM152 2009a template, mask gm_prob + wm_prob > 0, labels GM (gm_prob > 0.5) = 1
  and WM (wm_prob > 0.5, wins ties) = 2; moving = the voxelmorph test T1 with its brain mask, FreeSurfer
  labels 3, 42 -> 1 and 2, 41 -> 2. Accuracy: Dice of GM, WM and their mean on the fixed grid.
* ``afids``: fixed = MNI152NLin6Asym (FSL's MNI152 T1 1 mm), moving = Colin27, both skull-stripped, neither
  with a mask in the data: both masks come from ``maskreg.masks.auto_mask`` (Otsu foreground, largest
  component, closing, hole filling: the brain's outline on these images). Accuracy: target registration
  error of the 32 AFIDs landmarks (MNI152NLin6Asym rater consensus; Colin27 mean of the 32 rater sessions),
  read from the Slicer ``.fcsv`` files (RAS -> LPS):
  ``|T(p_fixed) - p_moving|`` in mm, mean and max.

* ``brain2d``: 2D, fixed = ANTsPy's example slice r16, moving = r64 (two subjects' axial T1 slices,
  256 x 256 at 1 mm, bundled in ``resources/demo/antspy_brain2d``), masks from ``auto_mask``, registered on
  their own grid whatever ``--res`` says (the ``res`` column reads ``native``). No labels exist: accuracy is the
  Dice of the brain outlines (fixed mask vs warped moving mask) and the NCC of the images inside the fixed
  mask. Both are weak (the outline is what the masks give, and NCC favours methods that optimise a
  correlation), but they separate a registration that worked from one that did not.

For every method and pair the same code evaluates the fixed -> moving transform the method returned, read back
from ANTs-ordered transform files with ``maskreg.transforms.read_transform``: labels warped with
``maskreg.warp.warp_labels(..., "nearest")``, landmarks with ``TransformPoint``, and the share of fixed-mask
voxels where the Jacobian determinant of the whole map (linear part included) is <= 0, from the map's
displacement field on the fixed grid. Each method runs in its own fresh worker process (threads limited to
``--threads``); the time is the wall time of the registration call alone (images loaded, peers imported, no
file output), best of ``--repeats``; the memory is the peak resident set during the calls (the base, what the
worker held before, in brackets). ``--rounds N`` runs the whole list of methods N times in turn (a fresh worker
each time, ``--repeats`` calls in each) and keeps the best: a drift in the machine's speed then reaches every
method alike, instead of the one that ran during it. ``--quick`` divides every iteration count that a method
exposes by 4 (a smoke test; not for figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

ROOT = common.OUT / "deformable"
METHODS = ["maskreg", "maskreg-fast", "ants-syn", "ants-synquick", "fireants"]
PAIRS = ["brain", "afids", "brain2d"]
BRAIN2D = HERE.parent / "resources" / "demo" / "antspy_brain2d"  # ANTsPy's r16/r64 slices (licence beside)
# FireANTs: moments -> affine (masked MI, maskreg's affine scales/iterations) -> greedy (masked local CC with
# the settings of FireANTs' own brain scripts, scripts/pairwise/test_lpba40.py and test_mgh10.py)
FIREANTS_AFFINE = {"scales": [4, 2, 1], "iterations": [100, 50, 25]}
FIREANTS_GREEDY = {
    "scales": [4, 2, 1],
    "iterations": [200, 100, 50],
    "cc_kernel_size": 7,
    "smooth_grad_sigma": 2.0,
    "smooth_warp_sigma": 0.5,
    "optimizer_lr": 0.5,
}
ANTS_SYN_REG_ITERATIONS = (40, 20, 0)  # ants.registration's default for type_of_transform="SyN"
QUICK_DIVISOR = 4
# AFIDs whose Colin27 placements spread more than this (rms distance to their mean, mm) are left out of the
# "reliable" TRE mean: the ventral occipital horns (29, 30) spread 11-12 mm, every other landmark < 3 mm
RATER_SPREAD_MM = 5.0


def _sitk():
    import SimpleITK as sitk

    return sitk


def quick_iterations(its, quick: bool) -> list[int]:
    """``its`` divided by 4 (rounded up, zeros kept) with ``--quick``, else as they are."""
    return [int(math.ceil(i / QUICK_DIVISOR)) if quick else int(i) for i in its]


# ------------------------------------------------------------------------------------------- stage lists


def fast_stages(spec: str | None) -> list[dict]:
    """``--maskreg-fast``: a YAML/JSON stage list replaces the default list; a mapping updates its deformable
    stage(s); nothing gives the default list with the deformable stage at iterations [40, 20, 10]."""
    import yaml

    stages = copy.deepcopy(common.default_stages())
    value = yaml.safe_load(spec) if spec else {"iterations": [40, 20, 10]}
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        raise SystemExit(f"--maskreg-fast: expected a YAML/JSON list of stages or a mapping, got {value!r}")
    for s in stages:
        if s["type"] in ("syn", "greedy"):
            s.update(value)
    return stages


def quick_stages(stages: list[dict], quick: bool) -> list[dict]:
    out = copy.deepcopy(stages)
    for s in out:
        if "iterations" in s:
            s["iterations"] = quick_iterations(s["iterations"], quick)
    return out


# ----------------------------------------------------------------------------------------------- data


def afids_landmarks() -> dict:
    """Fixed (MNI152NLin6Asym rater consensus) and moving (Colin27, mean of all rater sessions) landmarks, LPS
    mm, read from the Slicer ``.fcsv`` files with ``maskreg.io.read_landmarks`` (file order), checked row by row
    against the LPS columns of the data's ``landmarks.csv`` (which also give the ids and names)."""
    import csv

    import numpy as np

    from maskreg.io import read_landmarks

    src = common.DATA / "afids_templates" / "source_fcsv"
    fixed = read_landmarks(src / "tpl-MNI152NLin6Asym_res-01_desc-groundtruth_afids.fcsv", 3)
    sessions = [read_landmarks(p, 3) for p in sorted(src.glob("tpl-MNIColin27_desc-rater*_afids.fcsv"))]
    if not sessions or any(s.shape != fixed.shape for s in sessions):
        raise SystemExit(f"AFIDs: the Colin27 rater files under {src} do not all hold {len(fixed)} landmarks")
    moving = np.mean(sessions, axis=0)
    # inter-rater spread on Colin27: rms distance of the sessions' placements to their mean
    spread = np.sqrt(np.mean([np.sum((s - moving) ** 2, axis=1) for s in sessions], axis=0))
    tables = {}
    for name, pts in (("mni152nlin6asym", fixed), ("colin27", moving)):
        with open(common.DATA / "afids_templates" / name / "landmarks.csv") as fh:
            tables[name] = list(csv.DictReader(fh))
        ref = np.array([[float(r[k]) for k in ("x_lps", "y_lps", "z_lps")] for r in tables[name]])
        if ref.shape != pts.shape or np.abs(ref - pts).max() > 1e-3:
            raise SystemExit(f"AFIDs {name}: the .fcsv points differ from landmarks.csv's LPS columns (> 1e-3 mm)")
    rows = tables["mni152nlin6asym"]
    return {
        "ids": [int(r["id"]) for r in rows],
        "names": [r["name"] for r in rows],
        "fixed": fixed.tolist(),
        "moving": moving.tolist(),
        "colin27_sessions": len(sessions),
        "colin27_rms_mm": spread.tolist(),
    }


def _prepare_1mm() -> dict:
    """The 1 mm sources of both pairs (float32 images, uint8 masks and labels), written once under ROOT."""
    sitk = _sitk()
    from maskreg.masks import auto_mask

    vxm = common.DATA / "voxelmorph_brain_t1" / "test_scan"
    afd = common.DATA / "afids_templates"
    p = {
        "brain": {
            k: ROOT / f"brain_{k}_1mm.nii.gz"
            for k in ("fixed", "fixed_mask", "fixed_labels", "moving", "moving_mask", "moving_labels")
        },
        "afids": {k: ROOT / f"afids_{k}_1mm.nii.gz" for k in ("fixed", "fixed_mask", "moving", "moving_mask")},
    }
    b = p["brain"]
    if not all(v.exists() for v in b.values()):
        img, mask, labels = common.mni_brain()
        common.write_image(img, b["fixed"])
        common.write_image(mask, b["fixed_mask"])
        common.write_image(labels, b["fixed_labels"])
        ml = common.voxelmorph_gm_wm()
        common.write_image(sitk.Cast(sitk.ReadImage(str(vxm / "image.nii.gz")), sitk.sitkFloat32), b["moving"])
        common.write_image(sitk.Cast(sitk.ReadImage(str(vxm / "mask.nii.gz")) > 0, sitk.sitkUInt8), b["moving_mask"])
        common.write_image(ml, b["moving_labels"])
    a = p["afids"]
    if not all(v.exists() for v in a.values()):
        for role, name in (("fixed", "mni152nlin6asym"), ("moving", "colin27")):
            img = sitk.Cast(sitk.ReadImage(str(afd / name / "image.nii.gz")), sitk.sitkFloat32)
            common.write_image(img, a[role])
            common.write_image(auto_mask(img), a[f"{role}_mask"])
    lm = ROOT / "afids_landmarks.json"
    if not lm.exists():
        lm.write_text(json.dumps(afids_landmarks(), indent=1))
    return {pair: {k: str(v) for k, v in d.items()} for pair, d in p.items()} | {"landmarks": str(lm)}


def prepare(res_list: list[int], pairs: list[str]) -> dict:
    """Every pair at every resolution under ``OUT/deformable`` (cached); return their paths."""
    sitk = _sitk()
    ROOT.mkdir(parents=True, exist_ok=True)
    src = _prepare_1mm()
    paths: dict = {"landmarks": src["landmarks"]}
    for pair in pairs:
        if pair == "brain2d":
            for res in res_list:
                paths[(pair, res)] = _prepare_2d()
            continue
        for res in res_list:
            if res == 1:
                paths[(pair, res)] = dict(src[pair])
                continue
            out = {}
            for k, v in src[pair].items():
                p = ROOT / f"{pair}_{k}_{res}mm.nii.gz"
                if not p.exists():
                    img = sitk.ReadImage(v)
                    if k.endswith("labels"):
                        r = sitk.Cast(
                            common.smooth_resample(img, float(res), interp=sitk.sitkNearestNeighbor), sitk.sitkUInt8
                        )
                    elif k.endswith("mask"):
                        r = common.mask_resample(img, float(res))
                    else:
                        r = common.image_resample(img, float(res))
                    common.write_image(r, p)
                out[k] = str(p)
            paths[(pair, res)] = out
    return paths


def _prepare_2d() -> dict:
    """The 2D pair (float32 images, ``auto_mask`` masks; the masks double as one-label maps), written once."""
    sitk = _sitk()
    from maskreg.masks import auto_mask

    p = {k: ROOT / f"brain2d_{k}.nii.gz" for k in ("fixed", "fixed_mask", "moving", "moving_mask")}
    if not all(v.exists() for v in p.values()):
        for role, name in (("fixed", "r16"), ("moving", "r64")):
            img = sitk.Cast(sitk.ReadImage(str(BRAIN2D / f"{name}.nii.gz")), sitk.sitkFloat32)
            common.write_image(img, p[role])
            common.write_image(auto_mask(img), p[f"{role}_mask"])
    out = {k: str(v) for k, v in p.items()}
    return out | {"fixed_labels": out["fixed_mask"], "moving_labels": out["moving_mask"]}


# --------------------------------------------------------------------------------------------- workers
# Each worker runs the registration (timed), then writes the fixed -> moving transform as ANTs-ordered files
# (first listed applied first to points) under spec["out"] and returns their paths.


def _worker_maskreg(spec: dict) -> dict:
    import maskreg
    from maskreg.transforms import write_field, write_linear

    device = spec.get("device", "cpu")
    run = common.maskreg_call(
        *common.read_pair(spec["paths"]), spec["stages"], device=device, threads=spec["threads"], seed=0
    )
    meas = common.measure(run, spec["repeats"], device)
    res = meas.pop("result")
    # register() returns with the fields as tensors (FireANTs' optimize() likewise); making them SimpleITK
    # images is timed on its own and reported beside the stages
    _, meas["fields_s"] = common.timed(lambda: (res.displacement, res.inverse_displacement))
    out = Path(spec["out"])
    files = []
    if res.displacement is not None:
        write_field(res.displacement, out / "warp.nii.gz")
        files.append(str(out / "warp.nii.gz"))
    write_linear(res.linear, out / "affine.mat")
    files.append(str(out / "affine.mat"))  # T(x) = L(x + u(x)): the field first, then the linear part
    return {
        **meas,
        "transform": files,
        "stages": common.stage_report(res),
        "own_jac_nonpos": res.jacobian_nonpositive_fraction,
        "version": getattr(maskreg, "__version__", "dev"),
    }


def _worker_ants(spec: dict) -> dict:
    import ants

    # float images for antsRegistration (masks as they are)
    fixed, moving, fm, mm = common.ants_pair(spec["paths"], pixeltype="float")
    kw = {"mask": fm, "moving_mask": mm, "mask_all_stages": bool(spec.get("mask_all_stages"))}
    if spec["method"] == "ants-syn":
        kw["type_of_transform"] = "SyN"
        kw["reg_iterations"] = tuple(quick_iterations(ANTS_SYN_REG_ITERATIONS, spec["quick"]))
    else:
        kw["type_of_transform"] = "antsRegistrationSyNQuick[s]"
    meas = common.measure(common.ants_call(fixed, moving, spec["out"], **kw), spec["repeats"])
    res = meas.pop("result")
    return {
        **meas,
        "transform": list(res["fwdtransforms"]),
        "version": ants.__version__,
        "settings": {k: v for k, v in kw.items() if k not in ("mask", "moving_mask")},
    }


def _worker_fireants(spec: dict) -> dict:
    import importlib.metadata as md

    import torch
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration

    common.set_threads(spec["threads"], libraries=True)
    p = spec["paths"]
    dev = spec.get("device", "cpu")
    fixed_b, fixed_prod = common.fireants_images(p["fixed"], p["fixed_mask"], dev)
    moving_b, moving_prod = common.fireants_images(p["moving"], p["moving_mask"], dev)
    q = spec["quick"]
    g = FIREANTS_GREEDY

    def run():
        mom = MomentsRegistration(1, fixed_prod, moving_prod, moments=1, blur=False, progress_bar=False)
        mom.optimize()
        aff = AffineRegistration(
            FIREANTS_AFFINE["scales"],
            quick_iterations(FIREANTS_AFFINE["iterations"], q),
            fixed_b,
            moving_b,
            loss_type="masked_mi",
            progress_bar=False,
            init_rigid=mom.get_affine_init(),
        )
        aff.optimize()
        reg = GreedyRegistration(
            g["scales"],
            quick_iterations(g["iterations"], q),
            fixed_b,
            moving_b,
            loss_type="masked_cc",
            cc_kernel_size=g["cc_kernel_size"],
            deformation_type="compositive",
            smooth_grad_sigma=g["smooth_grad_sigma"],
            smooth_warp_sigma=g["smooth_warp_sigma"],
            optimizer="Adam",
            optimizer_lr=g["optimizer_lr"],
            init_affine=aff.get_affine_matrix().detach(),
            progress_bar=False,
        )
        reg.optimize()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return reg

    meas = common.measure(run, spec["repeats"], dev)
    reg = meas.pop("result")
    # one displacement field on the fixed grid, LPS mm, affine included: T(x) = x + d(x)
    path = Path(spec["out"]) / "warp.nii.gz"
    if _sitk().ReadImage(p["fixed"]).GetDimension() == 2:
        # FireANTs 1.5.0 builds its 2D warp image with GetImageFromArray([H, W, 2]) and no isVector, i.e. a
        # 3D scalar image, and CopyInformation then fails: build it as the vector image it is
        import fireants.registration.deformablemixin as dm

        orig = dm.sitk.GetImageFromArray
        dm.sitk.GetImageFromArray = lambda a, isVector=None: orig(a, isVector=True)
        try:
            reg.save_as_ants_transforms([str(path)])
        finally:
            dm.sitk.GetImageFromArray = orig
    else:
        reg.save_as_ants_transforms([str(path)])
    return {**meas, "transform": [str(path)], "version": md.version("fireants")}


WORKERS = {
    "maskreg": _worker_maskreg,
    "maskreg-fast": _worker_maskreg,
    "ants-syn": _worker_ants,
    "ants-synquick": _worker_ants,
    "fireants": _worker_fireants,
}
PEER_OF = {"ants-syn": "ants", "ants-synquick": "ants", "fireants": "fireants"}


# ------------------------------------------------------------------------------------------ evaluation


def jacobian_determinant(tx, ref):
    """Jacobian determinant of the map ``tx`` (fixed -> moving points) at the voxels of ``ref``'s grid (numpy
    array, ``[z,] y, x``), from the map's displacement field on that grid, through
    ``maskreg.qc.metrics.jacobian_determinant`` (physical space, direction cosines included, 2D or 3D)."""
    sitk = _sitk()
    from maskreg.qc.metrics import jacobian_determinant as field_jacobian

    disp = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()
    )
    return sitk.GetArrayFromImage(field_jacobian(disp))


class Evaluator:
    """The same measures for every method's transform on one pair at one resolution."""

    def __init__(self, pair: str, paths: dict, landmarks: dict):
        import numpy as np

        sitk = _sitk()
        self.pair = pair
        self.fixed = sitk.ReadImage(paths["fixed"])
        self.fmask = sitk.GetArrayFromImage(sitk.ReadImage(paths["fixed_mask"])) > 0
        self.flabels = sitk.ReadImage(paths["fixed_labels"]) if "fixed_labels" in paths else None
        self.mlabels = sitk.ReadImage(paths["moving_labels"]) if "moving_labels" in paths else None
        self.moving = sitk.ReadImage(paths["moving"])
        self.pf = np.array(landmarks["fixed"]) if pair == "afids" else None
        self.pm = np.array(landmarks["moving"]) if pair == "afids" else None
        self.reliable = (np.array(landmarks["colin27_rms_mm"]) <= RATER_SPREAD_MM) if pair == "afids" else None

    def __call__(self, tx) -> dict:
        import numpy as np

        from maskreg.warp import warp_labels, warp_points

        out = {}
        if self.flabels is not None:
            w = warp_labels(self.mlabels, self.flabels, tx, "nearest")
            d = common.dice(self.flabels, w, (1,) if self.pair == "brain2d" else (1, 2))
            dice = list(d.values())
            if self.pair == "brain2d":
                from maskreg.qc.metrics import masked_ncc
                from maskreg.warp import warp_image

                warped = warp_image(self.moving, self.fixed, tx)
                out.update(dice_mask=dice[0], ncc=masked_ncc(self.fixed, warped, self.flabels))
            else:
                out.update(dice_gm=dice[0], dice_wm=dice[1], dice_mean=sum(dice) / 2)
        if self.pf is not None:
            e = np.linalg.norm(warp_points(self.pf, tx) - self.pm, axis=1)
            out.update(tre_mean=float(e.mean()), tre_max=float(e.max()), tre_reliable=float(e[self.reliable].mean()))
        det = jacobian_determinant(tx, self.fixed)[self.fmask]
        out.update(jac_nonpos=float((det <= 0).mean()), jac_min=float(det.min()))
        return out


# ------------------------------------------------------------------------------------------------ main


def run_rounds(specs: dict[str, dict], rounds: int, what: str, timeout: float | None) -> dict[str, dict]:
    """Each method's worker result over ``rounds`` rounds, the methods in turn within a round (a fresh worker per
    method and round): the times of every round (``times_s``, ``best_s`` their minimum), the largest peak memory,
    the smallest base, and the rest (transform files, stages) from the last round. A method that fails in a
    round keeps that error and runs no more rounds."""
    merged: dict[str, dict] = {}
    for r in range(max(1, rounds)):
        for m, spec in specs.items():
            if "error" in merged.get(m, {}):
                continue
            print(
                f"running {m} on {what}" + (f" (round {r + 1} of {rounds})" if rounds > 1 else "") + " ...", flush=True
            )
            out = common.run_worker(Path(__file__), spec, timeout=timeout)
            prev = merged.get(m)
            if prev is not None and "error" not in out:
                out["times_s"] = prev["times_s"] + out["times_s"]
                out["best_s"] = min(out["times_s"])
                for key, pick in (("peak_rss_mb", max), ("base_rss_mb", min), ("gpu_peak_mb", max)):
                    values = [v for v in (prev.get(key), out.get(key)) if v is not None]
                    if values:
                        out[key] = pick(values)
            merged[m] = out
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--res", type=int, nargs="+", default=[2], choices=[1, 2], help="resolutions in mm (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N wall times (default 1)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the methods in turn N times, each time in fresh workers, and keep each one's best (default 1)",
    )
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--pairs", nargs="+", default=PAIRS, choices=PAIRS)
    ap.add_argument(
        "--maskreg-fast",
        default=None,
        metavar="YAML",
        help="stages of the maskreg-fast row: a YAML/JSON list of stages, or a mapping merged into the "
        "default list's deformable stage (default '{iterations: [40, 20, 10]}')",
    )
    ap.add_argument(
        "--ants-mask-all-stages",
        action="store_true",
        help="ants-syn: masks in the affine stage too (ANTsPy's default masks only the SyN stage)",
    )
    ap.add_argument("--device", default="cpu", help="maskreg's and FireANTs' device: cpu (default) or cuda")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"divide every exposed iteration count by {QUICK_DIVISOR} (smoke test, not for figures)",
    )
    args = common.standard_main(ap, WORKERS, timeout=7200)
    if args is None:
        return
    stages = quick_stages(common.default_stages(), args.quick)
    stages_fast = quick_stages(fast_stages(args.maskreg_fast), args.quick)
    ants_its = quick_iterations(ANTS_SYN_REG_ITERATIONS, args.quick)
    print(
        f"threads per method: {args.threads}; repeats: best of {args.repeats}"
        + (f" calls in each of {args.rounds} rounds (methods in turn)" if args.rounds > 1 else "")
        + (f"; QUICK: iteration counts / {QUICK_DIVISOR} (not for figures)" if args.quick else "")
    )
    print(f"maskreg stages ({common.CONFIG.relative_to(common.REPO)}): {common.stages_text(stages)}")
    if "maskreg-fast" in args.methods:
        print(f"maskreg-fast stages: {common.stages_text(stages_fast)}")
    print(
        f"ants-syn: type_of_transform='SyN' (affine 2100x1200x1200x0 at shrink 4/2/2/1, fixed in ANTsPy; SyN "
        f"Mattes MI, reg_iterations {tuple(ants_its)}), mask_all_stages={args.ants_mask_all_stages}; "
        f"ants-synquick: 'antsRegistrationSyNQuick[s]' (iterations fixed in ANTsPy"
        + (", NOT reduced by --quick)" if args.quick else ")")
    )
    print(
        f"fireants: moments → affine masked MI {FIREANTS_AFFINE['scales']} "
        f"{quick_iterations(FIREANTS_AFFINE['iterations'], args.quick)} → greedy masked CC "
        f"{FIREANTS_GREEDY['scales']} {quick_iterations(FIREANTS_GREEDY['iterations'], args.quick)}, "
        + ", ".join(f"{k} {v}" for k, v in FIREANTS_GREEDY.items() if k not in ("scales", "iterations"))
    )
    available = common.check_peers(args.methods, PEER_OF)
    t0 = time.perf_counter()
    res_list = sorted(args.res, reverse=True)
    paths = prepare(res_list, args.pairs)
    landmarks = json.loads(Path(paths["landmarks"]).read_text())
    print(f"data prepared in {time.perf_counter() - t0:.1f} s under {common.shown_path(ROOT)}")

    sitk = _sitk()
    tables: dict[str, list[dict]] = {p: [] for p in args.pairs}
    details = []
    for pair in args.pairs:
        for res in res_list[:1] if pair == "brain2d" else res_list:  # 2D: its own grid, once
            ev = Evaluator(pair, paths[(pair, res)], landmarks)
            label = "native" if pair == "brain2d" else f"{res} mm"
            specs = {
                m: {
                    "method": m,
                    "paths": paths[(pair, res)],
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "quick": args.quick,
                    "device": args.device,
                    "out": str(ROOT / "runs" / f"{pair}_{res}mm" / m),
                    "stages": stages_fast if m == "maskreg-fast" else stages,
                    "mask_all_stages": args.ants_mask_all_stages,
                }
                for m in args.methods
                if available[m][0]
            }
            results = run_rounds(specs, args.rounds, f"{pair} at {label}", args.timeout)
            rows = []
            for m in ["identity"] + args.methods:
                row = {"res": label, "method": m}
                rows.append(row)
                if m == "identity":
                    out = {"tx": sitk.Transform(ev.fixed.GetDimension(), sitk.sitkIdentity)}
                elif not available[m][0]:
                    row["note"] = common.pip_hint(PEER_OF[m])
                    continue
                else:
                    out = results[m]
                    if "error" in out:
                        row["note"] = out["error"][:200]
                        continue
                    out["tx"] = common.read_transform_files(out["transform"])
                    row.update(common.timing_cells(out, 1))
                    if out.get("own_jac_nonpos") is not None:
                        row["own_jac"] = f"{100 * out['own_jac_nonpos']:.3f}"
                    if "stages" in out:
                        details.append(
                            f"{pair} {row['res']} {m}: "
                            + "; ".join(
                                f"{s['type']} {s['seconds']:.1f} s"
                                + (f" (iterations {s['iterations']})" if s["iterations"] else "")
                                for s in out["stages"]
                            )
                            + (
                                f"; fields to SimpleITK images {out['fields_s']:.2f} s (after the timed call)"
                                if "fields_s" in out
                                else ""
                            )
                        )
                t1 = time.perf_counter()
                acc = ev(out["tx"])
                row.update(
                    dice_mask=common.fmt(acc.get("dice_mask"), 3),
                    ncc=common.fmt(acc.get("ncc"), 3),
                    dice_gm=common.fmt(acc.get("dice_gm"), 3),
                    dice_wm=common.fmt(acc.get("dice_wm"), 3),
                    dice_mean=common.fmt(acc.get("dice_mean"), 3),
                    tre_mean=common.fmt(acc.get("tre_mean")),
                    tre_max=common.fmt(acc.get("tre_max")),
                    tre_reliable=common.fmt(acc.get("tre_reliable")),
                    jac=f"{100 * acc['jac_nonpos']:.3f}",
                    jac_min=common.fmt(acc["jac_min"], 3),
                )
                print(
                    f"  {m}: evaluated in {time.perf_counter() - t1:.1f} s: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in acc.items()),
                    flush=True,
                )
            ref = next((r["_t"] for r in rows if r["method"] == "maskreg" and "_t" in r), None)
            common.add_ratio(rows, ref, "x_maskreg")
            tables[pair] += rows

    n_reliable = sum(v <= RATER_SPREAD_MM for v in landmarks["colin27_rms_mm"])
    head = [
        ("res", "res"),
        ("method", "method"),
        ("time_s", "time s"),
        ("x_maskreg", "× maskreg"),
        ("runs_s", "runs s"),
        ("peak_mb", "peak MB (base)"),
        ("gpu_mb", "GPU peak MB"),
    ]
    acc_cols = {
        "brain": [("dice_gm", "Dice GM"), ("dice_wm", "Dice WM"), ("dice_mean", "Dice mean")],
        "afids": [
            ("tre_mean", "TRE mean mm"),
            ("tre_max", "TRE max mm"),
            ("tre_reliable", f"TRE mean mm, {n_reliable} AFIDs"),
        ],
        "brain2d": [("dice_mask", "Dice brain outline"), ("ncc", "NCC in fixed mask")],
    }
    tail = [
        ("jac", "det J ≤ 0 % (mask)"),
        ("jac_min", "min det J (mask)"),
        ("own_jac", "maskreg's own det ≤ 0 %"),
        ("note", "note"),
    ]
    for pair in args.pairs:
        what = {
            "brain": "MNI ICBM152 2009a ← voxelmorph T1",
            "afids": "MNI152NLin6Asym ← Colin27, 32 AFIDs",
            "brain2d": "2D: ANTsPy r16 ← r64",
        }[pair]
        print(f"\n**{pair}** ({what})\n")
        print(common.format_table(tables[pair], head + acc_cols[pair] + tail, markdown=True))
    if details:
        print("\nmaskreg per-stage wall times (last run):")
        print("\n".join("  " + d for d in details))
    print(f"\nload average at the end: {common.load_average()}")


if __name__ == "__main__":
    main()
