"""Snakemake glue: warp the moving label map onto the fixed grid (generic-label or nearest)."""

from maskreg import io, logs, transforms, warp

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    subject = sm.wildcards.subject
    fixed = io.read_image(sm.input.fixed, subject=subject, role="fixed")
    labels = io.read_image(sm.input.labels, subject=subject, role="moving_labels", check_finite=False)
    _, _, tx = transforms.read_chain(sm.input.linear, sm.input.get("warp"), subject=subject)
    io.write_image(warp.warp_labels(labels, fixed, tx, sm.params.method, subject=subject), sm.output[0])
    log.info("warped labels (%s) onto the fixed grid %s", sm.params.method, fixed.GetSize())
