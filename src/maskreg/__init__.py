"""maskreg: masked image registration for cohorts (torch engine, SimpleITK I/O, Snakemake workflow).

Conventions used throughout: physical coordinates are ITK's LPS in mm; a transform maps points of the fixed
image's space to the moving image's space, so ``warped(x) = moving(T(x))`` as in ITK and ANTs.
"""

__version__ = "0.1.0"

from maskreg.register import RegistrationResult, register  # noqa: E402

__all__ = ["register", "RegistrationResult", "__version__"]
