"""Snakemake glue: the cohort tables and summary figure."""

from maskreg import logs
from maskreg.qc import evaluate

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    metrics = evaluate.write_cohort(
        list(sm.params.subjects), sm.output.metrics, sm.output.dice, sm.output.summary, sm.output.failures
    )
    flagged = metrics[metrics["flags"] != ""]  # metrics.flags would be pandas' own attribute
    log.info(
        "cohort: %d subjects, %d failed, %d flagged",
        len(metrics),
        int((metrics.status == "failed").sum()),
        len(flagged),
    )
    for _, row in flagged.iterrows():  # flags come from each subject's qc/metrics.tsv (qc.flags thresholds)
        log.info("flagged %s: %s", row["subject"], row["flags"])
