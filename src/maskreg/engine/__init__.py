"""The registration engine: the only package of maskreg that imports torch.

:func:`register` is the entry point; the rest of maskreg (io, masks, transforms, warp, qc, the workflow) reaches
the engine through ``maskreg.register`` only, so the jobs that never register never import torch.
"""

from maskreg.engine.deformable_stage import roi_box, roi_margin
from maskreg.engine.register import pick_device, register, resolved_stage, warm_up
from maskreg.engine.result import LevelReport, RegistrationResult, StageReport, field_image

__all__ = [
    "LevelReport",
    "RegistrationResult",
    "StageReport",
    "field_image",
    "pick_device",
    "warm_up",
    "register",
    "resolved_stage",
    "roi_box",
    "roi_margin",
]
