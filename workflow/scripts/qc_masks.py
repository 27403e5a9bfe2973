"""Snakemake glue: the mask figure of one subject."""

from maskreg import io, logs
from maskreg.qc import figures

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]):
    s = sm.wildcards.subject
    figures.mask_overview(
        io.read_image(sm.input.fixed, subject=s, role="fixed"),
        io.read_image(sm.input.fixed_mask, subject=s, role="fixed_mask"),
        io.read_image(sm.input.moving, subject=s, role="moving"),
        io.read_image(sm.input.moving_mask, subject=s, role="moving_mask"),
        sm.output[0],
        title=f"{s}: prepared masks",
    )
