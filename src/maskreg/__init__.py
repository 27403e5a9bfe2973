"""maskreg: masked image registration for cohorts (torch engine, SimpleITK I/O, Snakemake workflow).

Conventions used throughout: physical coordinates are ITK's LPS in mm; a transform maps points of the fixed
image's space to the moving image's space, so ``warped(x) = moving(T(x))`` as in ITK and ANTs.
"""

__version__ = "0.1.0"

__all__ = ["register", "RegistrationResult", "__version__"]


def __getattr__(name: str):
    """``maskreg.register`` and ``maskreg.RegistrationResult`` load the torch engine on first use, so jobs that
    only prepare masks, warp or draw QC (``maskreg.io``, ``maskreg.masks``, ``maskreg.warp``, ``maskreg.qc``)
    never import torch: about 1.5 s saved per job."""
    if name in ("register", "RegistrationResult"):
        from maskreg import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'maskreg' has no attribute '{name}'")
