"""Snakemake glue: warp the moving image and its mask onto the fixed grid."""

from maskreg import io, logs, transforms, warp

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    subject = sm.wildcards.subject
    fixed = io.read_image(sm.input.fixed, subject=subject, role="fixed")
    moving = io.read_image(sm.input.moving, subject=subject, role="moving")
    moving_mask = io.read_image(sm.input.moving_mask, subject=subject, role="moving_mask")
    _, _, tx = transforms.read_chain(sm.input.linear, sm.input.get("warp"), subject=subject)
    io.write_image(warp.warp_image(moving, fixed, tx, sm.params.interpolation), sm.output.image)
    io.write_image(warp.warp_mask(moving_mask, fixed, tx), sm.output.mask)
    log.info("warped image and mask onto the fixed grid %s", fixed.GetSize())
