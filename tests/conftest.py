"""Shared test fixtures: paths to the repository, its demo data and the team's shared real scans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "demo"
# shared/ lies beside the repository (CI clones main with shared/ next to it); MASKREG_DATA overrides
SHARED_DATA = Path(os.environ.get("MASKREG_DATA", REPO.parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    """A file of the shared data folder, or skip the test with the reason when it is not there."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (set MASKREG_DATA to the shared/data folder)")
    return p


def report_files(html: str) -> dict[str, bytes]:
    """The files embedded in a Snakemake report (``data:...;filename=NAME;base64,...`` URIs), decoded."""
    import base64
    import re

    out = {}
    for name, data in re.findall(r'data:[^"\s]*?;filename=([^;"]+);base64,([A-Za-z0-9+/=]+)', html):
        out[name] = base64.b64decode(data)
    return out


def make_image(a, spacing=None, origin=None, direction=None):
    """A SimpleITK image from an array (``[z,] y, x``) with optional geometry."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(a)
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


@pytest.fixture
def torch_kernels():
    """Run the test on torch's own CPU operators: the compiled kernels of ``maskreg.engine.cpu_kernels`` off (the
    CUDA code path, and the fallback where numba is missing)."""
    from maskreg.engine import cpu_kernels

    with cpu_kernels.switched(False):
        yield
