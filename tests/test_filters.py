"""The separable filters every stage uses (Gaussian smoothing of images and fields, box means of the pyramid
and of local CC) against scipy.ndimage with zero padding: 2D and 3D, odd axis lengths, an asymmetric kernel
and kernels longer than an axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from maskreg.losses import _box
from maskreg.pyramid import box_average, filter_axis, gaussian_blur, gaussian_weights


@pytest.mark.parametrize("shape", [(2, 7, 12, 9), (3, 11, 5)], ids=["3d", "2d"])
def test_filter_axis_is_a_zero_padded_correlation(shape):
    rng = np.random.default_rng(0)
    a = rng.normal(size=shape).astype(np.float32)
    t = torch.from_numpy(a)[None]
    for kernel in ((0.1, 0.5, 0.2, 0.15, 0.05), gaussian_weights(1.5), tuple(np.linspace(1, 2, 23))):
        for axis in range(len(shape) - 1):
            got = filter_axis(t, kernel, axis)[0].numpy()
            want = ndimage.correlate1d(a, np.asarray(kernel), axis=1 + axis, mode="constant", cval=0.0)
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_gaussian_blur_and_box_means_match_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(9, 14, 6)).astype(np.float32)
    t = torch.from_numpy(a)[None, None]
    sig = (0.8, 1.5, 4.0)  # the last kernel (25 taps) is longer than its 6-voxel axis
    want = a
    for axis, s in enumerate(sig):
        want = ndimage.correlate1d(want, np.asarray(gaussian_weights(s)), axis=axis, mode="constant", cval=0.0)
    np.testing.assert_allclose(gaussian_blur(t, sig)[0, 0].numpy(), want, atol=1e-5)
    # local CC's box mean: window 5; window 7 shrinks to 5 on the 6-voxel axis
    np.testing.assert_allclose(_box(t, 5)[0, 0].numpy(),
                               ndimage.uniform_filter(a, 5, mode="constant", cval=0.0), atol=1e-5)
    np.testing.assert_allclose(_box(t, 7)[0, 0].numpy(),
                               ndimage.uniform_filter(a, (7, 7, 5), mode="constant", cval=0.0), atol=1e-5)
    # the pyramid's box average: an even factor averages f + 1 voxels with half weights at both ends
    k2 = np.array([0.5, 1.0, 0.5]) / 2
    want = ndimage.correlate1d(ndimage.correlate1d(a, np.ones(3) / 3, axis=0, mode="constant"), k2, axis=1,
                               mode="constant")
    np.testing.assert_allclose(box_average(t, (3, 2, 1))[0, 0].numpy(), want, atol=1e-5)
