"""Snakemake glue: prepare one image's mask (see maskreg.masks.prepare_mask)."""

import SimpleITK as sitk

from maskreg import io, logs, masks

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    subject, role = sm.wildcards.subject, sm.wildcards.role
    opts = {k: v for k, v in sm.params.options.items() if k != "kind"}  # kind is the engine's business
    image = io.read_image(sm.input.image, subject=subject, role=role)
    given = None
    if sm.input.mask:
        given = io.read_image(sm.input.mask, subject=subject, role=f"{role}_mask", check_finite=False)
        log.info("%s mask from the cohort: %s", role, sm.input.mask)
    else:
        log.info("%s mask: none given, using '%s'", role, opts.get("missing", "allones"))
    mask = masks.prepare_mask(image, given, subject=subject, role=f"{role}_mask", **opts)
    io.write_image(mask, sm.output[0])
    arr = sitk.GetArrayViewFromImage(mask)
    log.info("%s mask: %d voxels (%.1f%% of the image)", role, int(arr.sum()), 100.0 * arr.mean())
