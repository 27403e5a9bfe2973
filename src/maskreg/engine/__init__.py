"""The registration engine: the only package of maskreg that imports torch.

:func:`register` is the entry point; the rest of maskreg (io, masks, transforms, warp, qc, the workflow) reaches
the engine through ``maskreg.register`` only, so the jobs that never register never import torch.
"""

from maskreg.engine.core import (
    LevelReport,
    RegistrationResult,
    StageReport,
    field_image,
    pick_device,
    register,
    resolved_stage,
    roi_box,
    roi_margin,
)

__all__ = [
    "LevelReport",
    "RegistrationResult",
    "StageReport",
    "field_image",
    "pick_device",
    "register",
    "resolved_stage",
    "roi_box",
    "roi_margin",
]
