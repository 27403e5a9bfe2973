"""Learning-based registration on real MR -> transrectal ultrasound pairs (issue 27), cross-validated.

Data: the 19 prostate pairs of ``shared/data/deepreg_prostate_mrus`` (fixed TRUS, moving MR; gland label 1,
case-specific landmark labels 2 and 3 with their LPS centroids). Rows are dealt into ``--folds`` folds in case
order; each fold's pairs are registered by methods that never saw them:

* ``header``: the images' headers (identity);
* ``centre``: maskreg's ``moments`` stage with ``centre: geometry`` (the centres of the images' extents
  correspond), the start of the networks: the volumes are crops around the gland whose headers do not place them;
* ``linear``: maskreg moments -> rigid (mi) -> affine (mi), no masks (the gland is the evaluation label);
* ``syn``: maskreg SyN with mi from the headers, no masks; ``ants``: ANTsPy ``SyN`` (mattes) from its default
  start (the intensities' centres of mass);
* ``net-image``, ``net-label``, ``net-both``: ``centre``, then the network trained on the other folds' pairs
  (each after its own ``centre`` stage, as the workflow trains after a row's linear stages) by the image loss only
  (mi), the labels only (every label of a pair, one per step), or both;
* ``net+syn``: ``net-both`` refined by SyN with mi at the two finest levels.

Per test pair: gland Dice, landmark TRE (mm and voxels of the fixed image; mean over the pair's landmarks:
``|T(x_f) - x_m|`` with ``T`` fixed -> moving), the share of folded voxels (det J <= 0), inverse consistency (mean
``|T^-1(T(x)) - x|`` over the fixed gland's voxels, mm) and the time per pair; per network, its training time.
``--curve`` adds a learning curve: the gland Dice of fold 0's pairs with networks trained on 0, 5, 10 and all of
the other pairs.

Run: ``.venv/bin/python benchmarks/bench_learned.py [--folds 5] [--steps 1000] [--methods ...] [--curve]
[--threads 2] [--run-folds N] [--learning JSON]`` (``--learning``: settings over every network's, e.g.
``'{"regulariser_weight": 5}'``; ``--run-folds 0 --curve``: the learning curve alone). Prints one row per method
(mean ± sd over the pairs) and writes the per-pair table to ``benchmarks/out/learned.tsv``. The header's spacing
(0.4 mm) is nominal (the data's README): TRE is also given in voxels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PROSTATE = common.DATA / "deepreg_prostate_mrus"
METHODS = ("header", "centre", "linear", "syn", "ants", "net-image", "net-label", "net-both", "net+syn")
NETWORKS = {
    "net-image": {"image_loss": "mi", "image_weight": 1.0, "label_weight": 0.0},
    "net-label": {"image_weight": 0.0, "label_weight": 1.0},
    "net-both": {"image_loss": "mi", "image_weight": 0.5, "label_weight": 1.0},
}
CENTRE = {"type": "moments", "centre": "geometry"}
LINEAR = [{"type": "moments", "masks": "none"}, {"type": "rigid", "masks": "none"}, {"type": "affine", "masks": "none"}]
SYN = {"type": "syn", "loss": "mi", "masks": "none"}
SYN_AFTER_NETWORK = {**SYN, "scales": [2, 1], "iterations": [40, 10]}


def read_case(folder: Path) -> dict:
    import pandas as pd
    import SimpleITK as sitk

    out = {"case": folder.name}
    for side, sub in (("fixed", "fixed_trus"), ("moving", "moving_mr")):
        out[side] = sitk.ReadImage(str(folder / sub / "image.nii.gz"), sitk.sitkFloat32)
        out[f"{side}_labels"] = sitk.ReadImage(str(folder / sub / "labels.nii.gz"))
        table = pd.read_csv(folder / sub / "landmarks.csv")
        out[f"{side}_landmarks"] = table[["x_lps", "y_lps", "z_lps"]].to_numpy(float)
    return out


def evaluate(case: dict, res, transform) -> dict:
    """Gland Dice, landmark TRE (mm, voxels), folding and inverse consistency of a fixed -> moving transform."""
    import numpy as np
    import SimpleITK as sitk

    fixed, fl, ml = case["fixed"], case["fixed_labels"], case["moving_labels"]
    warped = sitk.Resample(ml, fixed, transform, sitk.sitkNearestNeighbor)
    gland = common.dice(fl, warped, [1])[1]
    tre = []
    for xf, xm in zip(case["fixed_landmarks"], case["moving_landmarks"], strict=True):
        tre.append(float(np.linalg.norm(np.asarray(transform.TransformPoint(tuple(xf))) - xm)))
    tre_mm = float(np.mean(tre)) if tre else float("nan")
    out = {"dice": gland, "tre_mm": tre_mm, "tre_vox": tre_mm / min(fixed.GetSpacing())}
    fields = res is not None and res.has_fields  # ANTsPy's and the linear methods' are not measured here
    out["fold_pct"] = 100 * (res.jacobian_nonpositive_fraction or 0.0) if fields else float("nan")
    out["inv_mm"] = inverse_consistency(fixed, fl, res) if fields else float("nan")
    return out


def inverse_consistency(fixed, labels, res) -> float:
    """Mean ``|T^-1(T(x)) - x|`` (mm) over the fixed gland's voxels: the round trip as one SimpleITK transform
    (points go through the last transform added first), sampled on the fixed grid in one call."""
    import numpy as np
    import SimpleITK as sitk

    from maskreg.transforms import displacement_transform

    round_trip = sitk.CompositeTransform(3)
    round_trip.AddTransform(displacement_transform(res.inverse_displacement))  # T^-1 = (id + u_inv) o L^-1
    round_trip.AddTransform(res.linear.inverse().to_sitk())
    round_trip.AddTransform(res.linear.to_sitk())  # T = L o (id + u), applied first
    round_trip.AddTransform(displacement_transform(res.displacement))
    error = sitk.TransformToDisplacementField(
        round_trip,
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    norms = np.linalg.norm(sitk.GetArrayViewFromImage(error), axis=-1)
    return float(norms[sitk.GetArrayViewFromImage(labels) == 1].mean())


def train_network(cases: list[dict], settings: dict, out: Path, threads: int):
    import maskreg
    from maskreg.engine.learn import TrainingPair, save_model, train

    pairs = [
        TrainingPair(
            c["case"],
            c["fixed"],
            c["moving"],
            maskreg.register(c["fixed"], c["moving"], stages=[CENTRE], device="cpu").linear,
            fixed_labels=c["fixed_labels"],
            moving_labels=c["moving_labels"],
        )
        for c in cases
    ]
    model = train(pairs, settings, device="cpu", threads=threads, progress=False)
    save_model(model, out)
    return out, model.meta["seconds"]


def register(case: dict, method: str, models: dict, threads: int, tmp: Path):
    """(result or None, SimpleITK transform, seconds) of one method on one pair."""
    import maskreg

    f, m = case["fixed"], case["moving"]
    if method == "header":
        import SimpleITK as sitk

        return None, sitk.Transform(3, sitk.sitkIdentity), 0.0
    if method == "ants":
        return register_ants(case, threads, tmp)
    stages = {
        "centre": [CENTRE],
        "linear": LINEAR,
        "syn": [SYN],
        "net+syn": [CENTRE, {"type": "network", "model": str(models.get("net-both", ""))}, SYN_AFTER_NETWORK],
    }.get(method) or [CENTRE, {"type": "network", "model": str(models.get(method, ""))}]
    t = time.perf_counter()
    res = maskreg.register(f, m, stages=stages, device="cpu", threads=threads, subject=case["case"])
    return res, res.transform(), time.perf_counter() - t


def register_ants(case: dict, threads: int, tmp: Path):
    import ants
    import numpy as np

    def to_ants(img):
        import SimpleITK as sitk

        a = ants.from_numpy(
            sitk.GetArrayFromImage(img).T.astype(np.float32),
            origin=img.GetOrigin(),
            spacing=img.GetSpacing(),
            direction=np.asarray(img.GetDirection()).reshape(3, 3),
        )
        return a

    f, m = to_ants(case["fixed"]), to_ants(case["moving"])
    t = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform="SyN", random_seed=1, outprefix=str(tmp / case["case"]))
    seconds = time.perf_counter() - t
    return None, common.read_transform_files(reg["fwdtransforms"]), seconds


def folds_of(cases: list[dict], k: int) -> list[list[int]]:
    return [[i for i in range(len(cases)) if i % k == j] for j in range(k)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: maskreg's learning default)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--curve", action="store_true", help="also the learning curve on fold 0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-folds", type=int, help="run only the first N folds (a quick look)")
    ap.add_argument("--learning", type=json.loads, default={}, help="learning settings over every network's (JSON)")
    args = ap.parse_args()
    common.set_threads(args.threads)
    if not PROSTATE.is_dir():
        print(f"no data at {common.shown_path(PROSTATE)}; nothing to measure")
        return 0
    import pandas as pd

    cases = [read_case(p) for p in sorted(PROSTATE.glob("case*"))]
    base = {**({} if args.steps is None else {"steps": args.steps}), **args.learning}
    rows, trained = [], []
    work = Path(tempfile.mkdtemp(prefix="bench_learned_"))
    for j, test in enumerate(folds_of(cases, args.folds)[: args.run_folds]):
        train_cases = [c for i, c in enumerate(cases) if i not in test]
        models = {}
        for name, settings in NETWORKS.items():
            if name in args.methods or (name == "net-both" and "net+syn" in args.methods):
                models[name], secs = train_network(train_cases, {**settings, **base}, work / f"{name}{j}", args.threads)
                trained.append({"fold": j, "network": name, "train_s": secs, "pairs": len(train_cases)})
                print(f"fold {j}: {name} trained on {len(train_cases)} pairs in {secs:.0f} s", flush=True)
        for i in test:
            for method in args.methods:
                res, tx, secs = register(cases[i], method, models, args.threads, work)
                rows.append(
                    {"fold": j, "case": cases[i]["case"], "method": method, "s": secs, **evaluate(cases[i], res, tx)}
                )
            print(f"fold {j}: {cases[i]['case']} done", flush=True)
    if args.curve:
        learning_curve(cases, folds_of(cases, args.folds)[0], base, work, args.threads)
    if not rows:  # --run-folds 0: the learning curve alone
        return 0
    table = pd.DataFrame(rows)
    common.OUT.mkdir(parents=True, exist_ok=True)
    table.to_csv(common.OUT / "learned.tsv", sep="\t", index=False)
    summary = []
    for method in args.methods:
        t = table[table.method == method]
        summary.append(
            {
                "method": method,
                **{k: f"{t[k].mean():.3f} ± {t[k].std():.3f}" for k in ("dice", "tre_mm", "tre_vox")},
                "fold %": f"{t['fold_pct'].mean():.4f}",
                "inv mm": f"{t['inv_mm'].mean():.3f}",
                "s/pair": f"{t['s'].mean():.2f}",
            }
        )
    cols = [(k, k) for k in ("method", "dice", "tre_mm", "tre_vox", "fold %", "inv mm", "s/pair")]
    print(f"\n{common.machine_note()}; {common.commit(True)}; {len(cases)} pairs, {args.folds} folds\n")
    print(common.format_table(summary, cols, markdown=True))
    if trained:
        tr = pd.DataFrame(trained).groupby("network")["train_s"].mean()
        print("\ntraining time per model (s): " + ", ".join(f"{k} {v:.0f}" for k, v in tr.items()))
    return 0


def learning_curve(cases: list[dict], test: list[int], base: dict, work: Path, threads: int) -> None:
    """Gland Dice of fold 0's pairs with ``net-both`` trained on 0 (``centre`` alone), 5, 10 and all of the other
    pairs."""
    import numpy as np

    others = [c for i, c in enumerate(cases) if i not in test]
    print("\nlearning curve (fold 0, net-both): training pairs -> gland Dice")
    for n in (0, 5, 10, len(others)):
        if n == 0:  # no network: its start
            d = [evaluate(cases[i], *register(cases[i], "centre", {}, threads, work)[:2])["dice"] for i in test]
        else:
            path, _ = train_network(others[:n], {**NETWORKS["net-both"], **base}, work / f"curve{n}", threads)
            d = []
            for i in test:
                res, tx, _ = register(cases[i], "net-both", {"net-both": path}, threads, work)
                d.append(evaluate(cases[i], res, tx)["dice"])
        print(f"  {n:3d}: {np.mean(d):.3f}")


if __name__ == "__main__":
    sys.exit(main())
