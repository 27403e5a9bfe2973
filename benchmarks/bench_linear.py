"""Linear registration (moments → rigid → affine) on real 3D brains: maskreg vs ANTsPy vs FireANTs, CPU.

Run: ``.venv/bin/python benchmarks/bench_linear.py [--res 2 1] [--repeats 2] [--methods maskreg ants fireants]
[--ants-bins 32 64] [--pairs known subject] [--losses mi cc mse] [--threads 2]``.

Two pairs, each at 2 mm (fixed, moving and masks resampled to 2 mm first, after a Gaussian anti-alias) and at
1 mm (native):

* ``known``: fixed = the MNI ICBM152 2009a template (1 mm), mask = gm_prob + wm_prob > 0; moving = the same
  image resampled through a KNOWN affine (8° about an oblique axis, translation (6, -9, 4) mm, scaling/shear
  ≈ 3 %) onto a different grid (1.2 mm, identity direction cosines instead of the template's, another origin)
  with 2 % Gaussian noise; moving mask = the fixed mask moved the same way. Accuracy: mean and max of
  ``|T_est(x) - T_true(x)|`` (mm, LPS physical space) over the 1 mm fixed-mask voxels.
* ``subject``: fixed = MNI as above, moving = the voxelmorph test T1 (its own brain mask, another
  orientation). Accuracy: Dice on the 1 mm MNI grid of GM (MNI gm_prob > 0.5; FreeSurfer 3, 42) and WM (MNI
  wm_prob > 0.5; FreeSurfer 2, 41), moving labels warped with nearest neighbour through T_est.

Every method runs in its own fresh worker process (threads limited to ``--threads``); the time is the wall time
of the registration call alone (no I/O, no imports), best of ``--repeats``; the memory is the peak resident
set during the calls (the base, what the worker held before, in brackets). ``ncc`` is the masked global
correlation of fixed and warped moving at the run's resolution: a sanity check that the transform aligns.
Peers are optional: a missing one prints "not installed" and the pip command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported lazily inside the workers; only the annotation needs the name here
    import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# maskreg: rigid gets the bulk of the motion at 8 and 4 mm, affine refines down to the images' own resolution
# (10 iterations there, as ANTsPy's Affine); 20 % of the fixed-mask voxels as points, as ANTsPy's Regular 0.2.
# The affine MI uses 64 bins: with 32, maskreg's known-pair error stays at 0.04 mm, because the 32-bin
# objective is flat over 0.02-0.04 mm (L-BFGS from the truth stops at 0.022 mm, from maskreg's 4 mm level result
# at 0.038 mm); with 64 it is 0.016-0.018 mm. ANTsPy runs with its default 32 bins and with 64 (--ants-bins).
MASKREG_RIGID = {"scales": [4, 2], "iterations": [100, 50]}
MASKREG_AFFINE = {"scales": [4, 2, 1], "iterations": [100, 50, 10], "bins": 64}
MASKREG_SAMPLING = {"fraction": 0.2}
# FireANTs: its rigid and affine stages at every level (its defaults need more iterations than maskreg's)
FIREANTS_ITERS = {"scales": [4, 2, 1], "iterations": [100, 50, 25]}
# true fixed -> moving map of the "known" pair: T(x) = A (x - c) + c + t, c = fixed mask centroid
TRUE_ROT_DEG, TRUE_AXIS = 8.0, (1.0, 2.0, 3.0)
TRUE_T = (6.0, -9.0, 4.0)
TRUE_SCALE = (1.03, 0.98, 1.02)
TRUE_SHEAR = 0.03
MOVING_SPACING = 1.2
NOISE = 0.02


# ----------------------------------------------------------------------------------------------- data


def _sitk():
    import SimpleITK as sitk

    return sitk


def true_affine(center) -> np.ndarray:
    """Homogeneous 4x4 of the true fixed → moving map of the ``known`` pair."""
    import numpy as np

    ax = np.array(TRUE_AXIS) / np.linalg.norm(TRUE_AXIS)
    a = math.radians(TRUE_ROT_DEG)
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    shear = np.eye(3)
    shear[0, 1] = TRUE_SHEAR
    mat = rot @ np.diag(TRUE_SCALE) @ shear
    h = np.eye(4)
    h[:3, :3] = mat
    h[:3, 3] = np.asarray(center) + np.array(TRUE_T) - mat @ np.asarray(center)
    return h


def _affine_to_sitk(h):
    sitk = _sitk()
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(h[:3, :3].flatten().tolist())
    tx.SetTranslation(h[:3, 3].tolist())
    return tx


def _mask_points(mask):
    """Physical (LPS) points of the voxels of ``mask`` (N, 3) float64."""
    import numpy as np

    sitk = _sitk()
    a = sitk.GetArrayViewFromImage(mask) > 0
    kji = np.argwhere(a)
    ijk = kji[:, ::-1].astype(np.float64)
    d = np.array(mask.GetDirection()).reshape(3, 3) @ np.diag(mask.GetSpacing())
    return ijk @ d.T + np.array(mask.GetOrigin())


def prepare(res_list: list[int], pairs: list[str]) -> dict:
    """Write every pair at every resolution under ``OUT/linear`` once (cached); return their paths."""
    import numpy as np

    sitk = _sitk()
    root = common.OUT / "linear"
    root.mkdir(parents=True, exist_ok=True)
    vxm = common.DATA / "voxelmorph_brain_t1" / "test_scan"
    paths: dict = {}
    f1 = root / "fixed_1mm.nii.gz"
    fm1 = root / "fixed_mask_1mm.nii.gz"
    fl1 = root / "fixed_labels_1mm.nii.gz"
    if not (f1.exists() and fm1.exists() and fl1.exists()):
        img, mask, labels = common.mni_brain()
        sitk.WriteImage(img, str(f1))
        sitk.WriteImage(mask, str(fm1))
        sitk.WriteImage(labels, str(fl1))
    paths["eval"] = {"fixed_mask_1mm": str(fm1), "fixed_labels_1mm": str(fl1), "fixed_1mm": str(f1)}

    if "known" in pairs:
        m1 = root / "known_moving_1mm.nii.gz"
        mm1 = root / "known_moving_mask_1mm.nii.gz"
        truth = root / "known_truth.json"
        if not (m1.exists() and mm1.exists() and truth.exists()):
            fixed = sitk.ReadImage(str(f1))
            fmask = sitk.ReadImage(str(fm1))
            pts = _mask_points(fmask)
            h = true_affine(pts.mean(0))
            # moving grid: identity direction, 1.2 mm, covering T(fixed box), origin off the fixed lattice
            size = np.array(fixed.GetSize())
            d = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
            corners = np.array(
                [[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)], float
            ) @ d.T + np.array(fixed.GetOrigin())
            mc = corners @ h[:3, :3].T + h[:3, 3]
            lo, hi = mc.min(0) - 3.7, mc.max(0) + 3.7
            ref = sitk.Image([int(math.ceil(v)) for v in (hi - lo) / MOVING_SPACING], sitk.sitkUInt8)
            ref.SetSpacing([MOVING_SPACING] * 3)
            ref.SetOrigin(lo.tolist())
            inv = _affine_to_sitk(np.linalg.inv(h))  # moving points -> fixed points
            mov = sitk.Resample(fixed, ref, inv, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            arr = sitk.GetArrayFromImage(mov)
            rng = np.random.default_rng(0)
            hi_val = float(np.percentile(arr[arr > 0], 99))
            arr = np.clip(arr + rng.normal(0, NOISE * hi_val, arr.shape).astype(np.float32), 0, None)
            noisy = sitk.GetImageFromArray(arr)
            noisy.CopyInformation(mov)
            mmask = sitk.Resample(sitk.Cast(fmask, sitk.sitkFloat32), ref, inv, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            sitk.WriteImage(noisy, str(m1))
            sitk.WriteImage(sitk.Cast(mmask > 0.5, sitk.sitkUInt8), str(mm1))
            truth.write_text(json.dumps({"fixed_to_moving": h.tolist()}))
        paths["known_truth"] = json.loads(truth.read_text())["fixed_to_moving"]
    if "subject" in pairs:
        sl = root / "subject_moving_labels_1mm.nii.gz"
        if not sl.exists():
            sitk.WriteImage(common.voxelmorph_gm_wm(), str(sl))
        paths["subject_moving_labels_1mm"] = str(sl)

    for res in res_list:
        for pair in pairs:
            if pair == "known":
                src = {
                    "fixed": f1,
                    "fixed_mask": fm1,
                    "moving": root / "known_moving_1mm.nii.gz",
                    "moving_mask": root / "known_moving_mask_1mm.nii.gz",
                }
            else:
                src = {
                    "fixed": f1,
                    "fixed_mask": fm1,
                    "moving": vxm / "image.nii.gz",
                    "moving_mask": vxm / "mask.nii.gz",
                }
            if res == 1:
                paths[(pair, res)] = {k: str(v) for k, v in src.items()}
                continue
            out = {}
            for k, v in src.items():
                p = root / f"{pair}_{k}_{res}mm.nii.gz"
                if not p.exists():
                    img = sitk.ReadImage(str(v))
                    r = common.mask_resample(img, float(res)) if "mask" in k else common.image_resample(img, float(res))
                    sitk.WriteImage(r, str(p))
                out[k] = str(p)
            paths[(pair, res)] = out
    return paths


# --------------------------------------------------------------------------------------------- workers


def _probe_matrix(tx) -> list[list[float]]:
    """Homogeneous 4x4 of any SimpleITK linear transform (exact for affine maps)."""
    import numpy as np

    o = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    h = np.eye(4)
    for i, e in enumerate(np.eye(3)):
        h[:3, i] = np.array(tx.TransformPoint(tuple(e))) - o
    h[:3, 3] = o
    return h.tolist()


def _worker_maskreg(spec: dict) -> dict:
    import maskreg

    extra = spec.get("stage_extra") or {}
    stages = [
        {"type": "moments"},
        {"type": "rigid", "loss": spec["loss"], **MASKREG_RIGID, **extra},
        {"type": "affine", "loss": spec["loss"], **MASKREG_AFFINE, **extra},
    ]
    sampling = {"random": int(spec["random"])} if spec.get("random") else spec.get("sampling") or MASKREG_SAMPLING
    run = common.maskreg_call(
        *common.read_pair(spec["paths"]), stages, device="cpu", threads=spec["threads"], seed=0, sampling=sampling
    )
    meas = common.measure(run, spec["repeats"])
    res = meas.pop("result")
    return {
        **meas,
        "matrix": _probe_matrix(res.transform()),
        "stages": common.stage_report(res),
        "version": getattr(maskreg, "__version__", "dev"),
    }


def _worker_ants(spec: dict) -> dict:
    import tempfile

    import ants

    fixed, moving, fm, mm = common.ants_pair(spec["paths"])
    run = common.ants_call(
        fixed,
        moving,
        tempfile.mkdtemp(prefix="bench_ants_"),
        type_of_transform="Affine",
        mask=fm,
        moving_mask=mm,
        aff_sampling=int(spec.get("bins") or 32),
    )
    meas = common.measure(run, spec["repeats"])
    out = meas.pop("result")
    return {
        **meas,
        "matrix": _probe_matrix(common.read_transform_files(out["fwdtransforms"])),
        "version": ants.__version__,
    }


def _worker_fireants(spec: dict) -> dict:
    import importlib.metadata as md

    import numpy as np
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.moments import MomentsRegistration
    from fireants.registration.rigid import RigidRegistration

    common.set_threads(spec["threads"], libraries=True)
    p = spec["paths"]

    fixed_b, fixed_prod = common.fireants_images(p["fixed"], p["fixed_mask"])
    moving_b, moving_prod = common.fireants_images(p["moving"], p["moving_mask"])
    loss = "masked_" + spec["loss"]
    scales, iters = FIREANTS_ITERS["scales"], FIREANTS_ITERS["iterations"]

    def run():
        mom = MomentsRegistration(1, fixed_prod, moving_prod, moments=1, blur=False, progress_bar=False)
        mom.optimize()
        rig = RigidRegistration(
            scales,
            iters,
            fixed_b,
            moving_b,
            loss_type=loss,
            progress_bar=False,
            init_translation=mom.get_rigid_transl_init(),
            init_moment=mom.get_rigid_moment_init(),
        )
        rig.optimize()
        aff = AffineRegistration(
            scales,
            iters,
            fixed_b,
            moving_b,
            loss_type=loss,
            progress_bar=False,
            init_rigid=rig.get_rigid_matrix().detach(),
        )
        aff.optimize()
        return aff.get_affine_matrix().detach().cpu().numpy()[0]

    meas = common.measure(run, spec["repeats"])
    h = meas.pop("result")
    return {**meas, "matrix": np.asarray(h, dtype=np.float64).tolist(), "version": md.version("fireants")}


WORKERS = {"maskreg": _worker_maskreg, "ants": _worker_ants, "fireants": _worker_fireants}
PEER_OF = {"ants": "ants", "fireants": "fireants"}


# ------------------------------------------------------------------------------------------ evaluation


class Evaluator:
    def __init__(self, paths: dict):
        import numpy as np

        sitk = _sitk()
        self.paths = paths
        self.fmask1 = sitk.ReadImage(paths["eval"]["fixed_mask_1mm"])
        self.pts = _mask_points(self.fmask1)
        self.truth = np.array(paths["known_truth"]) if "known_truth" in paths else None
        self.flabels = sitk.ReadImage(paths["eval"]["fixed_labels_1mm"])
        self.mlabels = (
            sitk.ReadImage(paths["subject_moving_labels_1mm"]) if "subject_moving_labels_1mm" in paths else None
        )
        self._imgs: dict = {}

    def errors(self, h) -> tuple[float, float]:
        import numpy as np

        d = self.pts @ (np.asarray(h)[:3, :3] - self.truth[:3, :3]).T + (np.asarray(h)[:3, 3] - self.truth[:3, 3])
        e = np.linalg.norm(d, axis=1)
        return float(e.mean()), float(e.max())

    def dice(self, h) -> tuple[float, float]:
        """Dice of GM and WM: the moving labels warped with nearest neighbour through ``h``."""
        import numpy as np

        sitk = _sitk()
        w = sitk.Resample(self.mlabels, self.flabels, _affine_to_sitk(np.asarray(h)), sitk.sitkNearestNeighbor, 0)
        d = common.dice(self.flabels, w, (1, 2))
        return d[1], d[2]

    def ncc(self, pair: str, res: int, h) -> float:
        """``maskreg.qc.metrics.masked_ncc`` of fixed and warped moving inside the fixed mask, at ``res``."""
        import numpy as np

        from maskreg.qc.metrics import masked_ncc

        sitk = _sitk()
        key = (pair, res)
        if key not in self._imgs:
            p = self.paths[key]
            self._imgs[key] = (
                sitk.ReadImage(p["fixed"], sitk.sitkFloat32),
                sitk.ReadImage(p["moving"], sitk.sitkFloat32),
                sitk.GetArrayFromImage(sitk.ReadImage(p["fixed_mask"])) > 0,
            )
        f, m, fm = self._imgs[key]
        w = sitk.Resample(m, f, _affine_to_sitk(np.asarray(h)), sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
        return masked_ncc(f, w, fm)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--res", type=int, nargs="+", default=[2, 1], choices=[1, 2], help="resolutions in mm")
    ap.add_argument("--repeats", type=int, default=2, help="best of N wall times (default 2)")
    ap.add_argument("--methods", nargs="+", default=["maskreg", "ants", "fireants"], choices=list(WORKERS))
    ap.add_argument("--pairs", nargs="+", default=["known", "subject"], choices=["known", "subject"])
    ap.add_argument(
        "--losses",
        nargs="+",
        default=["mi"],
        choices=["mi", "cc", "mse"],
        help="maskreg losses to run (mi is the reference of the time ratio); default mi",
    )
    ap.add_argument(
        "--maskreg-extra",
        type=json.loads,
        default=None,
        help="extra keys for maskreg's rigid and affine stages, JSON, e.g. '{\"learning_rate\": 0.5}'",
    )
    ap.add_argument(
        "--maskreg-sampling",
        type=json.loads,
        default=MASKREG_SAMPLING,
        help=f'maskreg\'s sampling, JSON: "dense" or {{"fraction": f}} (default {MASKREG_SAMPLING})',
    )
    ap.add_argument(
        "--ants-bins",
        type=int,
        nargs="+",
        default=[32, 64],
        help="ANTsPy runs, one per MI bin count (its aff_sampling; default 32 = its default, and 64)",
    )
    ap.add_argument(
        "--maskreg-random",
        type=int,
        default=0,
        metavar="N",
        help="also run maskreg (mi, mse) with random sampling of N fixed-mask points per iteration",
    )
    args = common.standard_main(ap, WORKERS, timeout=3600)
    if args is None:
        return
    print(
        f"threads per method: {args.threads}; repeats: best of {args.repeats}; maskreg stages moments → rigid "
        f"{MASKREG_RIGID} → affine {MASKREG_AFFINE}, sampling {args.maskreg_sampling}"
        + (f", extra {args.maskreg_extra}" if args.maskreg_extra else "")
        + f"; FireANTs moments → rigid → affine, each {FIREANTS_ITERS}"
    )
    available = common.check_peers(args.methods, PEER_OF)
    t0 = time.perf_counter()
    paths = prepare(sorted(args.res, reverse=True), args.pairs)
    print(
        f"data prepared in {time.perf_counter() - t0:.1f} s under {common.shown_path(common.OUT / 'linear')} (2 mm = "
        f"fixed, moving and masks resampled to 2 mm with a Gaussian anti-alias first)"
    )
    ev = Evaluator(paths)

    rows, details = [], []
    for pair in args.pairs:
        for res in sorted(args.res, reverse=True):
            ident = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
            runs = [("identity", None, None)]
            for m in args.methods:
                losses = args.losses if m == "maskreg" else ["mi"]
                variants = [(loss, 0, None) for loss in losses]
                if m == "maskreg" and args.maskreg_random:
                    variants += [(loss, args.maskreg_random, None) for loss in losses if loss != "cc"]
                if m == "ants":
                    variants = [("mi", 0, b) for b in args.ants_bins]
                for loss, rnd, bins in variants:
                    runs.append(
                        (
                            m,
                            loss,
                            {
                                "method": m,
                                "loss": loss,
                                "paths": paths[(pair, res)],
                                "bins": bins,
                                "repeats": args.repeats,
                                "threads": args.threads,
                                "random": rnd,
                                "stage_extra": args.maskreg_extra if m == "maskreg" else None,
                                "sampling": args.maskreg_sampling,
                            },
                        )
                    )
            ref_time = None
            for m, loss, spec in runs:
                name = m if m == "identity" else f"{m} ({loss})"
                if spec and spec.get("random"):
                    name = f"{m} ({loss}, random {spec['random']})"
                if spec and spec.get("bins") and spec["bins"] != 32:
                    name = f"{m} ({loss}, {spec['bins']} bins)"
                row = {"pair": pair, "res": f"{res} mm", "method": name}
                if spec is None:
                    out = {"matrix": ident}
                elif not available[m][0]:
                    row["note"] = common.pip_hint(PEER_OF[m])
                    rows.append(row)
                    continue
                else:
                    print(f"running {name} on {pair} at {res} mm ...", flush=True)
                    out = common.run_worker(Path(__file__), spec, timeout=args.timeout)
                if "error" in out:
                    row["note"] = out["error"][:160]
                    rows.append(row)
                    continue
                h = out["matrix"]
                if "best_s" in out:
                    row.update(common.timing_cells(out, 1))
                    if m == "maskreg" and loss == "mi" and not spec.get("random"):
                        ref_time = out["best_s"]
                if pair == "known":
                    mean, mx = ev.errors(h)
                    row["mean_err_mm"], row["max_err_mm"] = common.fmt(mean, 3), common.fmt(mx, 3)
                else:
                    g, w = ev.dice(h)
                    row.update(dice_gm=common.fmt(g, 3), dice_wm=common.fmt(w, 3), dice_mean=common.fmt((g + w) / 2, 3))
                row["ncc"] = common.fmt(ev.ncc(pair, res, h), 4)
                if "stages" in out:
                    details.append(
                        f"{pair} {res} mm {name}: "
                        + "; ".join(
                            f"{s['type']} {s['seconds']:.2f} s"
                            + (
                                f" (iterations {s['iterations']}, level s {s['level_seconds']})"
                                if s["iterations"]
                                else ""
                            )
                            for s in out["stages"]
                        )
                    )
                rows.append(row)
            common.add_ratio([r for r in rows if r["pair"] == pair and r["res"] == f"{res} mm"], ref_time, "x_maskreg")

    cols = [
        ("pair", "pair"),
        ("res", "res"),
        ("method", "method"),
        ("time_s", "time s"),
        ("x_maskreg", "× maskreg"),
        ("runs_s", "runs s"),
    ]
    acc_known = [("mean_err_mm", "mean err mm"), ("max_err_mm", "max err mm")]
    acc_subj = [("dice_gm", "Dice GM"), ("dice_wm", "Dice WM"), ("dice_mean", "Dice mean")]
    tail = [("ncc", "ncc"), ("peak_mb", "peak MB (base)"), ("note", "note")]
    print()
    for pair, acc in (("known", acc_known), ("subject", acc_subj)):
        sel = [r for r in rows if r["pair"] == pair]
        if sel:
            print(common.format_table(sel, cols + acc + tail))
            print()
    if details:
        print("maskreg per-stage wall times (last run):")
        print("\n".join("  " + d for d in details))
    print(f"\nload average at the end: {common.load_average()}")


if __name__ == "__main__":
    main()
