"""Shared test fixtures: paths to the repository, its demo data and the team's shared real scans, the one builder of
SimpleITK test images, and the decoder of Snakemake reports.

Tests take these as fixture arguments (``def test_x(repo, make_image): ...``); nothing is imported from here. Code
that runs at import time (``pytest.mark.parametrize`` lists, module constants) computes a path from its own
``Path(__file__)`` instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository's root folder."""
    return _REPO


@pytest.fixture(scope="session")
def demo(repo: Path) -> Path:
    """The demo data shipped with the repository (``resources/demo``)."""
    return repo / "resources" / "demo"


@pytest.fixture(scope="session")
def shared_data(repo: Path) -> Callable[..., Path]:
    """``shared_data(*parts)``: a file (or, without parts, the folder) of the team's shared real scans, or skip the
    test with the reason when it is not there. shared/ lies beside the repository (CI clones main with shared/
    next to it); ``MASKREG_DATA`` overrides."""
    root = Path(os.environ.get("MASKREG_DATA", repo.parent / "shared" / "data"))

    def shared(*parts: str) -> Path:
        p = root.joinpath(*parts)
        if not p.exists():
            pytest.skip(f"shared data not found: {p} (set MASKREG_DATA to the shared/data folder)")
        return p

    return shared


@pytest.fixture(scope="session")
def report_files() -> Callable[[str], dict[str, bytes]]:
    """``report_files(html)``: the files embedded in a Snakemake report (``data:...;filename=NAME;base64,...``
    URIs), decoded, by name."""
    import base64
    import re

    def decode(html: str) -> dict[str, bytes]:
        out = {}
        for name, data in re.findall(r'data:[^"\s]*?;filename=([^;"]+);base64,([A-Za-z0-9+/=]+)', html):
            out[name] = base64.b64decode(data)
        return out

    return decode


def _build_image(a, spacing=None, origin=None, direction=None, *, dtype=None, like=None, vector: bool = False):
    import numpy as np
    import SimpleITK as sitk

    arr = np.ascontiguousarray(a if dtype is None else np.asarray(a).astype(dtype))
    img = sitk.GetImageFromArray(arr, isVector=vector)
    if like is not None:
        img.SetSpacing(like.GetSpacing())
        img.SetOrigin(like.GetOrigin())
        img.SetDirection(like.GetDirection())
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


@pytest.fixture(scope="session")
def odd_label_case(make_image) -> Callable[[int], tuple]:
    """``odd_label_case(seed)``: ``(labels, reference, transform, array)`` for label warping: a 2D float32 map
    (1.5 x 2 mm) of value 7 with rectangles of -3, 2, 300 and 41 (negative labels, no background 0) placed by
    ``seed``, a 90 x 70 reference grid (1.1 x 1.3 mm) about half of which maps outside the map, and a rigid
    transform."""
    import numpy as np
    import SimpleITK as sitk

    def case(seed: int) -> tuple:
        rng = np.random.default_rng(seed)
        arr = np.full((60, 80), 7.0, np.float32)
        for v in (-3.0, 2.0, 300.0, 41.0):
            y, x = rng.integers(5, 45), rng.integers(5, 60)
            arr[y : y + rng.integers(4, 15), x : x + rng.integers(4, 20)] = v
        labels = make_image(arr, spacing=(1.5, 2.0), origin=(-10.0, 4.0))
        ref = sitk.Image([90, 70], sitk.sitkUInt8)
        ref.SetSpacing((1.1, 1.3))
        ref.SetOrigin((15.0, 10.0))
        return labels, ref, sitk.Euler2DTransform([50.0, 60.0], 0.2, (-3.3, 2.7)), arr

    return case


@pytest.fixture(scope="session")
def make_image() -> Callable[..., object]:
    """``make_image(a, spacing=None, origin=None, direction=None, *, dtype=None, like=None, vector=False)``: a
    SimpleITK image from an array (``[z,] y, x``; with ``vector``, ``[z,] y, x, components``), its values cast to
    the numpy ``dtype`` first when given, and its geometry copied from the image ``like`` and/or set from
    ``spacing``, ``origin`` and ``direction`` (x first, as SimpleITK takes them)."""
    return _build_image


@pytest.fixture
def torch_kernels():
    """Run the test on torch's own CPU operators: the compiled kernels of ``maskreg.engine.cpu_kernels`` off (the
    CUDA code path, and the fallback where numba is missing)."""
    from maskreg.engine import cpu_kernels

    with cpu_kernels.switched(False):
        yield


@pytest.fixture(scope="session")
def snakemake_cmd(repo):
    """``snakemake_cmd(workdir, *args, profile="local", snakefile=None)``: the command line that runs the workflow
    (or ``snakefile``) on the project folder ``workdir`` with its ``config.yaml`` and ``profiles/<profile>`` (none
    when ``profile`` is None), then ``args``."""

    def cmd(workdir: Path, *args: str, profile: str | None = "local", snakefile: Path | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(snakefile or repo / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "config.yaml"),
            *(["--profile", str(repo / "profiles" / profile)] if profile else []),
            *args,
        ]

    return cmd


@pytest.fixture(scope="session")
def snakemake(snakemake_cmd):
    """``snakemake(workdir, *args, timeout=900, profile="local", snakefile=None, **kw)``: the command of
    ``snakemake_cmd`` run, its completed process (output captured as text; ``kw`` go to ``subprocess.run``)."""

    def run(
        workdir: Path,
        *args: str,
        timeout: int = 900,
        profile: str | None = "local",
        snakefile: Path | None = None,
        **kw,
    ) -> subprocess.CompletedProcess:
        cmd = snakemake_cmd(workdir, *args, profile=profile, snakefile=snakefile)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    return run
