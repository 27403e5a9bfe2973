"""Names of the similarity losses, importable without torch (configuration checks run before any job)."""

from __future__ import annotations

LOSS_NAMES = ("mse", "cc", "gc", "mi", "nmi")
ALIASES = {
    "masked_mse": "mse",
    "masked_cc": "cc",
    "masked_mi": "mi",
    "masked_nmi": "nmi",
    "lncc": "cc",
    "ncc": "cc",
    "global_cc": "gc",
}
# losses computed over neighbourhoods: they need the dense grid, not scattered samples
NEEDS_DENSE = {"cc"}
# losses differentiable in the moving (second) image only: the histogram bins the fixed one by nearest bin
MOVING_GRADIENT_ONLY = {"mi", "nmi"}


def canonical(name: str) -> str:
    """The canonical loss name of ``name`` (FireANTs' ``masked_*`` names accepted); ValueError if unknown."""
    key = ALIASES.get(name, name)
    if key not in LOSS_NAMES:
        raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(sorted(LOSS_NAMES) + sorted(ALIASES))}")
    return key
