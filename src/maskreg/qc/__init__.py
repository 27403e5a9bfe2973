"""Quality control: metrics (Dice, masked NCC, Jacobian determinant, TRE) and PNG figures."""

from maskreg.qc.metrics import (
    dice_per_label,
    jacobian_determinant,
    jacobian_map,
    jacobian_stats,
    log_jacobian,
    masked_ncc,
    mean_dice,
    tre,
)

__all__ = [
    "dice_per_label",
    "mean_dice",
    "masked_ncc",
    "jacobian_determinant",
    "jacobian_map",
    "log_jacobian",
    "jacobian_stats",
    "tre",
]
