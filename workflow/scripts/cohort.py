"""Snakemake glue: the cohort tables and summary figure."""
from maskreg import io, logs
from maskreg.qc import evaluate, figures

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    metrics, dice = evaluate.cohort_tables(list(sm.params.subjects))
    io.write_table(metrics, sm.output.metrics)
    io.write_table(dice, sm.output.dice)
    figures.cohort_summary(metrics, sm.output.summary)
    log.info("cohort: %d subjects, %d failed", len(metrics), int((metrics.status == "failed").sum()))
