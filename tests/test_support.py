"""The rows a deformable iteration samples (maskreg.engine.support): they cover the fixed mask grown by the reach and
the sampling margins, and sampling only there changes nothing in the result."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import maskreg
from maskreg.engine import cpu_kernels
from maskreg.engine.support import WeightSupport


def _grown(mask: np.ndarray, radii: tuple[int, int, int]) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=np.ones([2 * r + 1 for r in radii], bool))


def _every_row(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges ``[0, X)`` for every row of a ``(Z, Y, X)`` box: sample everything."""
    return np.zeros(shape[:2], np.int64), np.full(shape[:2], shape[2], np.int64)


def _covered(shape: tuple[int, int, int], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    x = np.arange(shape[2])
    return (x >= lo[..., None]) & (x < hi[..., None])


@pytest.mark.parametrize("reach", [0.0, 1.3, 4.0])
def test_rows_are_the_row_extents_of_the_mask_grown_by_a_box(reach):
    rng = np.random.default_rng(0)
    mask = np.zeros((14, 17, 23), bool)  # z, y, x
    mask[4:9, 5:11, 6:13] = rng.random((5, 6, 7)) > 0.4  # holes: rows need not be intervals
    mask[12, 2, 20] = True  # a lone voxel near two faces
    spacing = (0.8, 1.1, 2.5)  # x, y, z (mm)
    sup = WeightSupport(mask.astype(np.float32), spacing)
    radii = sup.radii(reach)
    assert radii == tuple(int(np.ceil(reach / s - 1e-9)) + 2 for s in reversed(spacing))
    grown = _grown(mask, radii)
    lo, hi = sup.rows(reach)
    got = _covered(mask.shape, lo, hi)
    assert not (grown & ~got).any()  # every voxel of the grown mask is sampled
    # and each row's range is exactly that row's extent of the grown mask (nothing beyond it)
    for z, y in np.ndindex(*mask.shape[:2]):
        xs = np.flatnonzero(grown[z, y])
        assert (lo[z, y], hi[z, y]) == ((xs[0], xs[-1] + 1) if xs.size else (0, 0))
    assert sup.fraction(reach) == pytest.approx(got.mean())
    assert sup.fraction(0.0) < sup.fraction(4.0) < 1.0


@pytest.mark.skipif(not cpu_kernels.enabled(torch.zeros(1)), reason="numba kernels not available")
@pytest.mark.parametrize("kind", ["syn", "greedy"])
def test_deformable_on_the_support_equals_sampling_the_whole_box(kind, monkeypatch, make_image):
    """A round ROI in an oblique anisotropic box: the compiled iterations sample a fraction of the box, and the
    fields are those of sampling every voxel, to the bit (a zero weight takes nothing from a sample)."""
    size, spacing = (44, 40, 24), (1.0, 1.2, 2.0)
    zz, yy, xx = np.mgrid[: size[2], : size[1], : size[0]].astype(float)
    p = np.stack([xx * spacing[0], yy * spacing[1], zz * spacing[2]])
    c = np.array([22.0, 24.0, 23.0])[:, None, None, None]
    r2 = ((p - c) ** 2).sum(0)
    fixed = np.exp(-r2 / (2 * 9.0**2)) + 0.5 * np.exp(
        -((p - c - np.array([6.0, 0, 0])[:, None, None, None]) ** 2).sum(0) / (2 * 4.0**2)
    )
    moving = np.exp(-((p - c - np.array([1.5, -1.0, 1.0])[:, None, None, None]) ** 2).sum(0) / (2 * 10.0**2))
    roi = r2 < 14.0**2

    def image(a, dtype=np.float32):
        return make_image(a, spacing, direction=sitk.VersorTransform([0.3, -0.2, 0.9], 0.4).GetMatrix(), dtype=dtype)

    stages = [{"type": kind, "loss": "cc", "scales": [2, 1], "iterations": [15, 10]}]

    def run():
        return maskreg.register(image(fixed), image(moving), image(roi, np.uint8), None, stages=stages, device="cpu")

    fractions = []
    rows = WeightSupport.rows

    def spy(self, reach_mm):
        lo, hi = rows(self, reach_mm)
        fractions.append(float((hi - lo).sum()) / float(np.prod(self.shape)))
        return lo, hi

    monkeypatch.setattr(WeightSupport, "rows", spy)
    a = run()
    assert max(fractions) < 0.9 and min(fractions) < 0.8  # rows were skipped at every level
    monkeypatch.setattr(WeightSupport, "rows", lambda self, reach_mm: _every_row(self.shape))
    b = run()
    da, db = (sitk.GetArrayFromImage(r.displacement) for r in (a, b))
    assert np.abs(da).max() > 0.2  # the field moved
    assert np.array_equal(da, db)
    assert np.array_equal(
        sitk.GetArrayFromImage(a.inverse_displacement), sitk.GetArrayFromImage(b.inverse_displacement)
    )
