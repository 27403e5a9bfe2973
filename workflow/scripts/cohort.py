"""Snakemake glue: the cohort tables and summary figure."""
from maskreg import logs
from maskreg.qc import evaluate

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    metrics = evaluate.write_cohort(list(sm.params.subjects), sm.output.metrics, sm.output.dice,
                                    sm.output.summary, sm.output.failures)
    log.info("cohort: %d subjects, %d failed", len(metrics), int((metrics.status == "failed").sum()))
