"""Snakemake glue: register one subject and write its transforms and report."""
import json

import maskreg
from maskreg import io, logs, transforms

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    subject = sm.wildcards.subject
    reg = sm.params.registration
    fixed = io.read_image(sm.input.fixed, subject=subject, role="fixed")
    moving = io.read_image(sm.input.moving, subject=subject, role="moving")
    fixed_mask = io.read_image(sm.input.fixed_mask, subject=subject, role="fixed_mask")
    moving_mask = io.read_image(sm.input.moving_mask, subject=subject, role="moving_mask")
    initial = transforms.read_transform(list(sm.input.initial), subject=subject, role="initial_transform") \
        if sm.input.initial else None
    labels = {}
    if "fixed_labels" in sm.input.keys():
        labels = {k: io.read_image(sm.input[k], subject=subject, role=k, check_finite=False)
                  for k in ("fixed_labels", "moving_labels")}
    result = maskreg.register(
        fixed, moving, fixed_mask, moving_mask, stages=reg.get("stages"), device=sm.params.device,
        seed=sm.params.seed, sampling=reg.get("sampling", "dense"),
        min_overlap_voxels=reg.get("min_overlap_voxels", 100), initial=initial, subject=subject,
        threads=sm.threads, mask_kinds=tuple(sm.params.kinds), **labels)
    log.info("registered on %s in %.1f s", result.device, result.seconds)
    transforms.write_linear(result.linear, sm.output.linear)
    if "warp" in sm.output.keys():  # a linear-only subject in a deformable cohort gets zero fields
        result.ensure_fields()
        transforms.write_field(result.displacement, sm.output.warp)
        transforms.write_field(result.inverse_displacement, sm.output.inverse_warp)
    with io.atomic_path(sm.output.report) as tmp:
        tmp.write_text(json.dumps({"subject": subject, **result.summary()}, indent=1))
