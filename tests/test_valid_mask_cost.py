"""A ``valid`` mask is eroded by a box at every pyramid level (elastix's rule: radii of tens of voxels for a
fine moving image at a coarse level). The erosion is separable: it must give exactly what the dense box gives,
for any radii per axis (0 included, larger than the image included), in 2D and 3D, on the numpy path (CPU) and
on the torch path (what CUDA runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from maskreg.engine.pyramid import dilate_box, erode_voxels, valid_mask_radii

# (shape in tensor order, radii per axis): anisotropic grids, a different radius on every axis, a radius 0,
# radii beyond an axis' length, a one-voxel axis
CASES = [
    ((37, 53), (3, 0)),
    ((37, 53), (0, 7)),
    ((40, 29), (5, 11)),
    ((9, 64), (12, 2)),
    ((1, 31), (2, 4)),
    ((6, 33, 47), (1, 4, 9)),
    ((6, 33, 47), (0, 5, 2)),
    ((12, 20, 25), (3, 0, 0)),
    ((5, 18, 22), (7, 20, 2)),
    ((20, 16, 24), (13, 6, 1)),
]


def random_mask(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A float32 mask with values in [0, 1] (some exactly 0.5, which is outside), blobs of inside voxels."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 1.5)
    mask = (smooth > np.median(smooth)).astype(np.float32) * rng.uniform(0.4, 1.0, shape).astype(np.float32)
    mask.flat[rng.integers(0, mask.size, max(1, mask.size // 50))] = 0.5
    return mask


def scipy_erosion(mask: np.ndarray, radii: tuple[int, ...]) -> np.ndarray:
    """The reference: binary erosion by the full ``2 r + 1`` box, outside the image counting as inside."""
    box = np.ones([2 * r + 1 for r in radii], dtype=bool)
    return ndimage.binary_erosion(mask > 0.5, structure=box, border_value=1)


def dense_maxpool_erosion(mask: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """The previous implementation: one dense max-pool of the outside over the whole box (-inf padding)."""
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[mask.dim() - 3]
    outside = (mask <= 0.5).to(mask.dtype)
    return 1.0 - pool(outside, kernel_size=tuple(2 * r + 1 for r in radii), stride=1, padding=tuple(radii))


@pytest.mark.parametrize(("shape", "radii"), CASES, ids=lambda v: "x".join(map(str, v)))
def test_separable_erosion_equals_the_dense_box(shape, radii):
    mask = random_mask(shape, seed=sum(shape) + sum(radii))
    t = torch.from_numpy(mask)[None, None]
    out = erode_voxels(t, radii)
    assert out.shape == t.shape and out.dtype == t.dtype and out.device == t.device
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(out[0, 0].numpy().astype(bool), scipy_erosion(mask, radii))
    assert torch.equal(out, dense_maxpool_erosion(t, radii))


@pytest.mark.parametrize(("shape", "radii"), CASES, ids=lambda v: "x".join(map(str, v)))
def test_box_dilation_on_torch_tensors_equals_numpy(shape, radii):
    """The torch branch of the erosion (other devices than the CPU) is the same box."""
    outside = random_mask(shape, seed=7 * sum(shape)) <= 0.5
    expected = ndimage.binary_dilation(outside, structure=np.ones([2 * r + 1 for r in radii], dtype=bool))
    np.testing.assert_array_equal(dilate_box(outside, radii), expected)
    got = dilate_box(torch.from_numpy(outside)[None, None], radii)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool
    np.testing.assert_array_equal(got[0, 0].numpy(), expected)


def test_moving_mask_radii_at_a_coarse_level_are_handled_whole():
    """A fine moving grid at a coarse level: elastix's radii of tens of voxels in-plane, fewer across slices
    (0.98 x 0.98 x 2 mm at a 12 mm level), on a mask touching the image's border (not eroded there)."""
    radii = tuple(reversed(valid_mask_radii((12, 12, 6), "moving")))  # tensor order (z, y, x)
    assert radii == (13, 25, 25)
    mask = np.zeros((20, 96, 96), np.float32)
    mask[:, 10:90, 5:96] = 1.0  # reaches the x border and both z borders
    out = erode_voxels(torch.from_numpy(mask)[None, None], radii)[0, 0].numpy().astype(bool)
    # scipy's binary_erosion lists every offset of a structure this large (it ran out of memory): the box's
    # minimum filter is the same erosion
    box = [2 * r + 1 for r in radii]
    np.testing.assert_array_equal(out, ndimage.minimum_filter(mask > 0.5, size=box, mode="constant", cval=True))
    assert out[:, 48, 60:].all() and not out[:, 48, :30].any()
