"""Command line: ``maskreg register``, ``maskreg apply``, ``maskreg mask``, ``maskreg train`` (no Snakemake needed),
and ``maskreg cohort`` (a cohort table from a BIDS dataset, with pybids).

Transforms map fixed-space points to moving-space points (ITK/ANTs convention, LPS mm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskreg import __version__

# the inline --stages example of `maskreg register --help` (tests/test_cli.py checks that it is a valid list)
INLINE_STAGES_EXAMPLE = "[{type: rigid, loss: mi}, {type: syn, loss: cc, scales: [2, 1], iterations: [40, 20]}]"


def _read_stages(given: str, sampling) -> list:
    """The stage list of ``--stages``: a YAML file with a ``stages:`` list (or the list alone), or the list
    inline (``"[{type: rigid}, {type: syn, loss: cc}]"``), checked as maskreg.register and the workflow check
    it (:mod:`maskreg.stages`), before any image is read. Raises MaskregError."""
    import os

    import yaml

    from maskreg.errors import MaskregError
    from maskreg.stages import check_stages

    inline = not os.path.exists(given) and given.lstrip().startswith(("[", "{", "-"))
    what = "--stages (inline)" if inline else f"--stages {given}"
    try:
        if inline:
            data = yaml.safe_load(given)
        else:
            with open(given) as fh:
                data = yaml.safe_load(fh)
    except OSError as exc:
        raise MaskregError(f"{what}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise MaskregError(f"{what}: not valid YAML ({' '.join(str(exc).split())})") from None
    stages = data.get("stages") if isinstance(data, dict) else data
    if not isinstance(stages, list):
        raise MaskregError(
            f"{what}: expected a 'stages:' list as in config/config.yaml "
            f"(e.g. stages: [{{type: rigid}}, {{type: affine}}])"
        )
    check_stages(stages, sampling, "--stages (inline)" if inline else given)  # as the workflow names a file
    return stages


def _register(a: argparse.Namespace) -> None:
    import maskreg
    from maskreg import io, transforms

    sampling = {"random": a.random} if a.random else {"fraction": a.fraction} if a.fraction else "dense"
    from maskreg.stages import PRESETS

    stages = _read_stages(a.stages, sampling) if a.stages else PRESETS[a.preset]
    fixed = io.read_image(a.fixed, role="fixed")
    moving = io.read_image(a.moving, role="moving")
    fm = io.read_image(a.fixed_mask, role="fixed_mask") if a.fixed_mask else None
    mm = io.read_image(a.moving_mask, role="moving_mask") if a.moving_mask else None
    init = transforms.read_transform(a.initial, role="initial transform") if a.initial else None
    res = maskreg.register(
        fixed,
        moving,
        fm,
        mm,
        stages=stages,
        device=a.device,
        seed=a.seed,
        sampling=sampling,
        initial=init,
        threads=a.threads,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    transforms.write_linear(res.linear, out / "affine.mat")
    if res.displacement is not None:
        transforms.write_field(res.displacement, out / "warp.nii.gz")
        transforms.write_field(res.inverse_displacement, out / "inverse_warp.nii.gz")
    with io.atomic_path(out / "registration.json") as tmp:
        tmp.write_text(json.dumps(res.summary(), indent=1))
    if a.warped:
        from maskreg.warp import warp_image

        io.write_image(warp_image(moving, fixed, res.transform()), a.warped)
    print(f"wrote {out / 'affine.mat'} ({res.device}, {res.seconds:.1f} s)")


def _apply(a: argparse.Namespace) -> None:
    from maskreg import io, transforms, warp
    from maskreg.errors import MaskregError

    ref = io.read_image(a.reference, role="reference")
    linear, field, tx = transforms.read_chain(a.transform, a.warp)
    if a.landmarks:
        pts = io.read_landmarks(a.landmarks, ref.GetDimension(), role="landmarks")
        if a.inverse:  # moving-space points -> fixed space: A^-1 first, then the inverse field
            inv_field = transforms.read_field(a.inverse_warp, role="inverse_warp") if a.inverse_warp else None
            if field is not None and inv_field is None:
                raise MaskregError("maskreg apply --inverse with --warp needs --inverse-warp (inverse_warp.nii.gz)")
            tx = transforms.inverse_chain(linear, inv_field)
        io.write_landmarks(warp.warp_points(pts, tx), a.output)
        return
    img = io.read_image(a.input, role="input", check_finite=a.kind == "image")
    if a.kind == "labels":
        out = warp.warp_labels(img, ref, tx, a.label_method)
    elif a.kind == "mask":
        out = warp.warp_mask(img, ref, tx)
    else:
        out = warp.warp_image(img, ref, tx, a.interpolation)
    io.write_image(out, a.output)


def _mask(a: argparse.Namespace) -> None:
    from maskreg import io, masks

    image = io.read_image(a.image, role="image")
    given = io.read_image(a.mask, role="mask", check_finite=False) if a.mask else None
    out = masks.prepare_mask(
        image,
        given,
        missing=a.missing,
        threshold=a.threshold,
        largest_component=a.largest_component,
        fill_holes=a.fill_holes,
        dilate_mm=a.dilate_mm,
        erode_mm=a.erode_mm,
        role="mask",
    )
    io.write_image(out, a.output)


def _train(a: argparse.Namespace) -> None:
    import maskreg
    from maskreg import config as mcfg
    from maskreg.errors import ConfigError
    from maskreg.learning import learning_problems, plan, resolve_learning
    from maskreg.stages import check_stages

    cfg = mcfg.load_yaml(a.config) if a.config else {}
    registration = cfg.get("registration") or {}
    check_stages(registration.get("stages"), registration.get("sampling", "dense"), a.config or "")
    problems = learning_problems(cfg.get("learning"))
    if problems:
        raise ConfigError(problems, a.config or "learning")
    learning = resolve_learning(cfg.get("learning"))
    table = mcfg.read_table(a.cohort)
    table = mcfg.resolve_paths(table, Path(a.cohort).resolve().parent)
    subjects = list(table["subject"])
    splits = list(table["split"]) if "split" in table.columns else None
    the_plan = plan(subjects, splits, learning["folds"])
    folds = learning["folds"]
    if (folds <= 1) != (a.fold is None) or (a.fold is not None and not 0 <= a.fold < folds):
        want = "no --fold" if folds <= 1 else f"--fold 0 to {folds - 1}"
        raise ConfigError([f"learning.folds is {folds}: give {want}"], "maskreg train")
    name = "model" if folds <= 1 else f"fold{a.fold}"
    keep = set(the_plan.train[name])
    rows = [r for r in table.to_dict("records") if r["subject"] in keep]
    path = maskreg.train_model(
        rows, registration, learning, a.out, device=a.device, seed=learning["seed"], threads=a.threads
    )
    print(path)


def _cohort(a: argparse.Namespace) -> None:
    from maskreg.bids import ROLES, bids_cohort, save_cohort

    selections = {r: getattr(a, r) for r in ROLES if getattr(a, r)}
    template = {"fixed": a.fixed_template, "fixed_mask": a.fixed_template_mask, "fixed_labels": a.fixed_template_labels}
    cohort = bids_cohort(
        a.bids,
        selections,
        template=template,
        derivatives=a.derivatives or [],
        participants=a.participant_label,
        missing=a.missing,
    )
    for line in cohort.warnings:
        print(f"maskreg cohort: warning: {line}", file=sys.stderr)
    out = save_cohort(cohort.table, a.out, absolute=a.absolute)
    print(f"wrote {out}: {len(cohort.table)} row(s)")


_COHORT_EXAMPLES = """\
A filter is BIDS entities as key=value pairs: "suffix=T1w,datatype=anat,acq=mprage". key= asks for the entity
to be absent, key=* for any value; scope=self|raw|derivatives|all|PIPELINE says where to look (default self,
the --bids dataset, for --fixed/--moving; all for masks and labels); extension defaults to .nii.gz/.nii.
Rows: one per subject, or per subject x session (subject id sub-01_ses-1) where the dataset has sessions; a
filter naming session pins it. A filter matching several files for one row is an error listing them. Rows
without a fixed or moving image are skipped with a warning (--missing error: an error); a missing mask or
label map leaves its cell empty, with a warning. Paths are written relative to the table's folder.

examples:
  maskreg cohort --bids ds/ --out cohort.tsv --fixed suffix=T1w --moving suffix=T2w
  maskreg cohort --bids ds/ --derivatives ds/derivatives/masks --out cohort.tsv --fixed suffix=T1w \\
      --moving suffix=FLAIR --fixed-mask "suffix=mask,desc=brain,space="
  maskreg cohort --bids ds/ --out cohort.tsv --moving "suffix=T1w,run=1" \\
      --fixed-template mni.nii.gz --fixed-template-mask mni_mask.nii.gz
  maskreg cohort --bids ds/ --out cohort.tsv --fixed "suffix=T1w,ses=pre" --moving suffix=T1w
"""


def _cohort_parser(sub) -> None:
    """``maskreg cohort``."""
    c = sub.add_parser(
        "cohort",
        help="write a cohort table from a BIDS dataset (needs pybids: pip install 'maskreg[bids]')",
        description="Write the workflow's cohort table from a BIDS dataset, selecting images by BIDS entities.",
        epilog=_COHORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--bids", required=True, metavar="DIR", help="the BIDS dataset (its dataset_description.json)")
    c.add_argument("--out", required=True, help="the cohort table to write: .tsv (or .csv)")
    c.add_argument("--moving", required=True, metavar="FILTER", help="each row's moving image, e.g. suffix=T2w")
    fixed = c.add_mutually_exclusive_group(required=True)
    fixed.add_argument("--fixed", metavar="FILTER", help="each row's fixed image, e.g. suffix=T1w")
    fixed.add_argument("--fixed-template", metavar="PATH", help="one fixed image for every row (e.g. MNI)")
    for role in ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels"):
        what = "mask" if role.endswith("mask") else "label map"
        c.add_argument("--" + role.replace("_", "-"), metavar="FILTER", help=f"each row's {role.split('_')[0]} {what}")
    c.add_argument("--fixed-template-mask", metavar="PATH", help="with --fixed-template: its mask")
    c.add_argument("--fixed-template-labels", metavar="PATH", help="with --fixed-template: its label map")
    c.add_argument(
        "--derivatives", nargs="+", metavar="DIR", help="derivative datasets to search too (masks, label maps)"
    )
    c.add_argument("--participant-label", nargs="+", metavar="LABEL", help="only these subjects (01 or sub-01)")
    c.add_argument(
        "--missing",
        choices=["skip", "error"],
        default="skip",
        help="a row without a match: skip it (or leave an optional cell empty) with a warning, or fail (default skip)",
    )
    c.add_argument(
        "--absolute", action="store_true", help="write absolute paths (default: relative to the table's folder)"
    )
    c.set_defaults(func=_cohort)


def _register_parser(sub) -> None:
    """``maskreg register``."""
    from maskreg.stages import PRESETS, WORKFLOW_PRESET

    r = sub.add_parser("register", help="register a moving image to a fixed image (masks optional)")
    r.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA, ... as SimpleITK reads); the output grid")
    r.add_argument("moving", help="moving image, registered onto the fixed one")
    r.add_argument("--fixed-mask", help="region of interest (or valid data) of the fixed image, nonzero = inside")
    r.add_argument("--moving-mask", help="region of interest (or valid data) of the moving image")
    r.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=WORKFLOW_PRESET,
        help=f"a named stage list: rigid, affine (moments, rigid, affine with MI) or syn (those and a SyN stage "
        f"with local CC: the workflow's default); default {WORKFLOW_PRESET}. --stages overrides it",
    )
    r.add_argument(
        "--stages",
        help="the stages: a YAML file with a 'stages:' list as in config/config.yaml, or the list inline, e.g. "
        f'"{INLINE_STAGES_EXAMPLE}"',
    )
    r.add_argument(
        "--out",
        required=True,
        help="output folder for affine.mat, registration.json and, when a "
        "deformable stage ran, warp.nii.gz and inverse_warp.nii.gz",
    )
    r.add_argument("--warped", help="also write the moving image warped onto the fixed grid here")
    r.add_argument(
        "--initial",
        nargs="+",
        metavar="TRANSFORM",
        help="initial transform(s), fixed → moving points, in antsApplyTransforms' -t order (e.g. "
        "1Warp.nii.gz 0GenericAffine.mat): ITK/ANTs .mat/.txt/.h5 files or displacement fields",
    )
    r.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    r.add_argument("--random", type=int, help="sample N points from the fixed mask per iteration")
    r.add_argument("--fraction", type=float, help="sample this fraction of the fixed-mask voxels per level (0-1]")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int)
    r.set_defaults(func=_register)


def _apply_parser(sub) -> None:
    """``maskreg apply``."""
    a = sub.add_parser("apply", help="warp an image, mask or label map (or map landmarks) with a transform")
    a.add_argument("transform", help="ITK/ANTs linear transform file (fixed → moving points)")
    a.add_argument(
        "--warp",
        help="displacement field applied before the linear part: T(x) = A(x + u(x)) (the registration's warp.nii.gz)",
    )
    a.add_argument(
        "--inverse",
        action="store_true",
        help="with --landmarks: map moving-space points to fixed space (A⁻¹, then the inverse warp)",
    )
    a.add_argument("--inverse-warp", help="with --inverse and --warp: the registration's inverse_warp.nii.gz")
    a.add_argument("--reference", required=True, help="image defining the output grid (the fixed image)")
    a.add_argument("--input", help="moving-space image, mask or label map")
    a.add_argument("--kind", choices=["image", "mask", "labels"], default="image")
    a.add_argument("--interpolation", choices=["linear", "bspline", "nearest"], default="linear")
    a.add_argument("--label-method", choices=["generic", "nearest"], default="generic")
    a.add_argument(
        "--landmarks",
        help="points: CSV x,y[,z] in LPS mm, or 3D Slicer .fcsv/.mrk.json; fixed-space points are mapped to "
        "moving space (or moving to fixed with --inverse); the output's format follows --output's extension",
    )
    a.add_argument("--output", required=True)
    a.set_defaults(func=_apply)


def _mask_parser(sub) -> None:
    """``maskreg mask``."""
    m = sub.add_parser("mask", help="prepare a mask for one image (as the workflow's mask step)")
    m.add_argument("image")
    m.add_argument("--mask", help="given mask; without it --missing decides")
    m.add_argument("--missing", choices=["allones", "auto"], default="allones")
    m.add_argument("--threshold", type=float)
    m.add_argument("--largest-component", action="store_true")
    m.add_argument("--fill-holes", action="store_true")
    m.add_argument("--dilate-mm", type=float, default=0.0)
    m.add_argument("--erode-mm", type=float, default=0.0)
    m.add_argument("--output", required=True)
    m.set_defaults(func=_mask)


def _train_parser(sub) -> None:
    """``maskreg train``."""
    t = sub.add_parser(
        "train",
        help="train a registration network on a cohort's training rows (as the workflow's train_model job)",
    )
    t.add_argument("cohort", help="cohort table (TSV/CSV): rows with split 'train' train the model")
    t.add_argument(
        "--config",
        help="YAML with the registration.stages (their linear part runs first) and the learning section "
        "(config/README.md); default: no linear stage and the default learning settings",
    )
    t.add_argument("--out", required=True, help="output folder for model.pt, training.json and training.png")
    t.add_argument("--fold", type=int, help="with learning.folds k >= 2: the fold whose model to train (0..k-1)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    t.add_argument("--threads", type=int)
    t.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskreg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"maskreg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    for add in (_register_parser, _apply_parser, _mask_parser, _train_parser, _cohort_parser):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from maskreg.errors import MaskregError

    args = build_parser().parse_args(argv)
    if args.command == "apply" and not (args.input or args.landmarks):
        print("maskreg apply: give --input or --landmarks", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except MaskregError as exc:
        print(f"maskreg {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
