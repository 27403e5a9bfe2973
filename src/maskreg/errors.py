"""Exceptions with messages a user can act on.

Every error raised for bad input names *who* (subject, role such as ``fixed`` or ``moving_mask``),
*which file or key*, *what is wrong* and, where possible, *what to do*.
"""

from __future__ import annotations


class MaskregError(ValueError):
    """Base class of maskreg's user-facing errors."""


class InputError(MaskregError):
    """An input file (image, mask, labels, landmarks, transform) is missing or unusable."""


class ConfigError(MaskregError):
    """The configuration or the cohort table is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the {source}:\n{lines}")


class OverlapError(MaskregError):
    """Too few voxels of the fixed mask map into the moving image (and its mask) at some level."""


class MaskError(MaskregError):
    """A mask is empty, was emptied by a preparation step, or does not fit its image."""


def where(subject: str | None = None, role: str | None = None, path: str | None = None) -> str:
    """Return a prefix such as ``"subject 'sub01', moving_mask 'a/b.nii.gz': "`` (parts may be absent)."""
    parts = []
    if subject:
        parts.append(f"subject '{subject}'")
    if role and path:
        parts.append(f"{role} '{path}'")
    elif role:
        parts.append(role)
    elif path:
        parts.append(f"'{path}'")
    return (", ".join(parts) + ": ") if parts else ""
