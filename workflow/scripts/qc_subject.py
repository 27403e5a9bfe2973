"""Snakemake glue: metrics, the registration figure and the Jacobian determinant map of one subject."""

import pandas as pd

from maskreg import io, logs, transforms
from maskreg.qc import evaluate, figures

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    s = sm.wildcards.subject
    inp = sm.input
    read = lambda key, **kw: io.read_image(inp[key], subject=s, role=key, **kw)  # noqa: E731
    fixed, moving = read("fixed"), read("moving")
    linear, field, chain = transforms.read_chain(inp.linear, inp.get("warp"), subject=s)
    labels = {}
    if "fixed_labels" in inp.keys():
        labels = {k: read(k, check_finite=False) for k in ("fixed_labels", "moving_labels", "warped_labels")}
    points = {}
    if "fixed_landmarks" in inp.keys():
        dim = fixed.GetDimension()
        fixed_points, moving_points = io.read_landmark_pair(inp.fixed_landmarks, inp.moving_landmarks, dim, subject=s)
        points = {"fixed_points": fixed_points, "moving_points": moving_points}
    fixed_mask, warped, warped_mask = read("fixed_mask"), read("warped"), read("warped_mask")
    row, dice, extra = evaluate.subject_metrics(
        s,
        fixed,
        moving,
        fixed_mask,
        read("moving_mask"),
        warped,
        warped_mask,
        chain,
        linear.matrix,
        evaluate.read_report(inp.report),
        **labels,
        **points,
        field=field,
        flag_thresholds=dict(sm.params.flags),
    )
    io.write_table(pd.DataFrame([row], columns=evaluate.METRIC_COLUMNS), sm.output.metrics)
    io.write_table(dice, sm.output.dice)
    jacobian = evaluate.jacobian_output(fixed, linear.matrix, field, full=extra["jacobian"], **dict(sm.params.jacobian))
    io.write_image(jacobian, sm.output.jacobian)
    title = f"{s}   NCC {row['ncc_before']:.3f} → {row['ncc_after']:.3f}"
    if labels:
        title += f"   mean Dice {row['dice_before']:.3f} → {row['dice_after']:.3f}"
    if row["flags"]:
        title += f"   flags: {row['flags'].replace(';', ', ')}"
    figures.registration_overlay(
        fixed,
        extra["before"],
        warped,
        sm.output.figure,
        fixed_mask=fixed_mask,
        warped_mask=warped_mask,
        fixed_labels=labels.get("fixed_labels"),
        warped_labels=labels.get("warped_labels"),
        jacobian=extra["jacobian"],
        title=title,
    )
    log.info(
        "%s",
        {k: row[k] for k in ("ncc_before", "ncc_after", "dice_before", "dice_after", "displacement_max_mm", "flags")},
    )
