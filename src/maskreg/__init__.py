"""maskreg: masked image registration for cohorts (torch engine, SimpleITK I/O, Snakemake workflow).

Conventions used throughout: physical coordinates are ITK's LPS in mm; a transform maps points of the fixed
image's space to the moving image's space, so ``warped(x) = moving(T(x))`` as in ITK and ANTs.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that finish their share of a parallel loop sleep instead of spinning (libgomp spins ~300k
# iterations by default). torch and the CPU kernels both run on torch's libgomp, which reads this once, when
# torch is imported: it takes effect when maskreg is imported first (the workflow's scripts and the CLI do).
# Why: with one of 2 cores busy with another process, the spinning thread takes the time the straggling one
# needs, and a registration beside a busy core slows down far more spinning than sleeping (benchmarks/HISTORY.md).
# On an idle machine, sleeping costs a few percent (threads take a few microseconds to wake). A value already set
# wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["register", "RegistrationResult", "train_model", "warm_up", "__version__"]


def __getattr__(name: str):
    """``maskreg.register``, ``maskreg.RegistrationResult``, ``maskreg.warm_up`` and ``maskreg.train_model`` (a
    cohort's network, :mod:`maskreg.engine.learn`) load the torch engine on first use, so jobs that
    only prepare masks, warp or draw QC (``maskreg.io``, ``maskreg.masks``, ``maskreg.warp``, ``maskreg.qc``)
    never import torch, whose import is a large part of a short job's time."""
    if name in ("register", "RegistrationResult", "warm_up"):
        from maskreg import engine

        return getattr(engine, name)
    if name == "train_model":
        from maskreg.engine import learn

        return learn.train_model
    raise AttributeError(f"module 'maskreg' has no attribute '{name}'")
