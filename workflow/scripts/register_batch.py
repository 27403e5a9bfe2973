"""Snakemake glue: register a batch of subjects in this one process (resources.register.batch_size > 1);
each subject's results and log go to its folder under the batch's output folder, then `register` publishes
them (see maskreg.jobs)."""

from maskreg import jobs, logs

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]) as log:
    status = jobs.register_batch(
        sm.params.jobs,
        sm.output[0],
        with_fields=sm.params.with_fields,
        registration=sm.params.registration,
        device=sm.params.device,
        seed=sm.params.seed,
        threads=sm.threads,
    )
    logs.setup(sm.log[0])  # the subjects' jobs sent the log to their own files; one summary line each here
    for subject, s in status.items():
        log.info("%s: %s", subject, f"registered in {s['seconds']:.1f} s" if s["ok"] else f"FAILED: {s['error']}")
