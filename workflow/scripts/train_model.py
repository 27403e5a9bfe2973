"""Snakemake glue: train one model on its training rows and write model.pt, training.json and training.png."""

from pathlib import Path

import maskreg
from maskreg import logs

sm = snakemake  # noqa: F821
with logs.job(sm.log[0]):
    maskreg.train_model(
        sm.params.rows,
        sm.params.registration,
        sm.params.learning,
        Path(sm.output.model).parent,
        device=sm.params.device,
        seed=sm.params.seed,
        threads=sm.threads,
        progress=False,
    )
