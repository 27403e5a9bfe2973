"""Snakemake glue: register one subject and write its transforms and report."""

from maskreg import jobs, logs

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]):
    labels = {k: sm.input[k] for k in ("fixed_labels", "moving_labels") if k in sm.input.keys()}
    jobs.register_subject(
        sm.wildcards.subject,
        fixed=sm.input.fixed,
        moving=sm.input.moving,
        fixed_mask=sm.input.fixed_mask,
        moving_mask=sm.input.moving_mask,
        initial=list(sm.input.initial),
        outputs={k: sm.output[k] for k in sm.output.keys()},
        registration=sm.params.registration,
        device=sm.params.device,
        seed=sm.params.seed,
        threads=sm.threads,
        kinds=sm.params.kinds,
        model=sm.input.get("model"),
        **labels,
    )
