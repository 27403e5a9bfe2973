"""The separable filters every stage uses (Gaussian smoothing of images and fields, box means of the pyramid
and of local CC) against scipy.ndimage with zero padding: 2D and 3D, odd axis lengths, an asymmetric kernel
and kernels longer than an axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from maskreg.engine import losses
from maskreg.engine.pyramid import box_average, filter_axis, gaussian_blur, gaussian_weights


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
    # the pyramid's box average: an even factor averages f + 1 voxels with half weights at both ends
    k2 = np.array([0.5, 1.0, 0.5]) / 2
    want = ndimage.correlate1d(
        ndimage.correlate1d(a, np.ones(3) / 3, axis=0, mode="constant"), k2, axis=1, mode="constant"
    )
    np.testing.assert_allclose(box_average(t, (3, 2, 1))[0, 0].numpy(), want, atol=1e-5)


def scipy_local_cc(f: np.ndarray, m: np.ndarray, w: np.ndarray, sizes: tuple[int, ...]) -> float:
    """Local CC's loss by the textbook formula, its window statistics from scipy's box means (zero padding):
    ``-Σ w cc / Σ w``, ``cc = cov² / (v_f v_m + ε)``, means, variances and covariance weighted by ``w``."""

    def box(a):
        return ndimage.uniform_filter(a, sizes, mode="constant", cval=0.0)

    sw = np.maximum(box(w), losses.EPS)
    mf, mm = box(w * f) / sw, box(w * m) / sw
    vf = np.maximum(box(w * f * f) / sw - mf * mf, 0.0)
    vm = np.maximum(box(w * m * m) / sw - mm * mm, 0.0)
    cov = box(w * f * m) / sw - mf * mm
    return float(-(w * cov * cov / (vf * vm + losses.CC_EPS)).sum() / w.sum())


@pytest.mark.parametrize(
    "window,sizes",
    [(5, (5, 5, 5)), (7, (7, 7, 5)), (11, (9, 11, 5))],
    ids=["5", "7 shrunk on the 6-voxel axis", "11 shrunk on two axes"],
)
def test_local_cc_windows_are_box_means_shrunk_on_short_axes(window, sizes):
    """Local CC's window statistics are box means over ``window`` voxels (zero padding), the window shrunk to the
    largest odd size that fits on an axis shorter than it (thin slabs): the loss equals the scipy formula's, and
    would not with the window unshrunk."""
    rng = np.random.default_rng(2)
    f = rng.normal(size=(9, 14, 6))
    m = 0.6 * f + 0.4 * rng.normal(size=f.shape)
    w = (rng.random(f.shape) > 0.3) * rng.random(f.shape)  # soft weights with holes
    want = scipy_local_cc(f, m, w, sizes)
    tf, tm, tw = (torch.from_numpy(x)[None, None] for x in (f, m, w))
    assert float(losses.local_cc(tf, tm, tw, window)) == pytest.approx(want, rel=1e-10)
    assert float(losses.local_cc_autograd(tf, tm, tw, window)) == pytest.approx(want, rel=1e-10)
    if sizes != (window,) * 3:  # the shrinking matters
        assert scipy_local_cc(f, m, w, (window,) * 3) != pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("zero_padding", [True, False], ids=["zeros", "border"])
def test_axis_by_axis_decimation_equals_trilinear_resampling_onto_the_shrunk_grid(zero_padding):
    """The pyramid decimates one axis at a time; that must be what grid_sample onto ``Grid.shrink`` gives,
    for odd and even factors, a factor of 1, and sizes the factors do not divide (a last coarse voxel past
    the end: zero or border padding), on an oblique, anisotropic grid."""
    import SimpleITK as sitk

    from maskreg.engine.grid import Grid
    from maskreg.engine.pyramid import decimate_axis, downsample_mask, filter_decimate, resample

    img = sitk.Image([11, 10, 13], sitk.sitkFloat32)
    img.SetSpacing([0.9, 1.4, 2.2])
    img.SetDirection(sitk.VersorTransform((1.0, 2.0, 0.5), 0.4).GetMatrix())
    grid = Grid.of(img)
    t = torch.rand(1, 2, *grid.shape, generator=torch.Generator().manual_seed(2))
    for factors in [(2, 2, 2), (3, 1, 4), (4, 3, 2)]:  # x-first
        coarse = grid.shrink(factors)
        want = resample(t, grid, coarse, padding_mode="zeros" if zero_padding else "border")
        got = t
        for axis, f in enumerate(reversed(factors)):
            got = decimate_axis(got, axis, f, coarse.shape[axis], zero_padding)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        if zero_padding:  # the mask's box average, sampled at the coarse centres
            mask = (t[:, :1] > 0.5).float()
            old = resample(box_average(mask, tuple(reversed(factors))), grid, coarse).clamp(0, 1)
            torch.testing.assert_close(downsample_mask(mask, grid, coarse, factors), old, atol=2e-6, rtol=0)
            k = gaussian_weights(1.2)
            both = filter_decimate(t, (k, k, k), tuple(reversed(factors)), coarse.shape)
            torch.testing.assert_close(both, resample(gaussian_blur(t, (1.2,) * 3), grid, coarse), atol=2e-6, rtol=0)


def test_pyramid_levels_of_a_crop_are_the_whole_images_levels_where_they_overlap():
    """An oblique, anisotropic image and a crop of it (3, 1, 2 voxels off the low ends, x-first): their pyramid
    grids at shrink factors (4, 3, 2) share their voxel centres (the lattice is anchored at the world origin,
    not at each grid's first voxel), and the normalised-convolution images and mask fractions agree on the
    coarse voxels whose blur never reaches the crop's edge."""
    import SimpleITK as sitk

    from maskreg.engine.grid import Grid
    from maskreg.engine.pyramid import make_level

    img = sitk.Image([40, 36, 30], sitk.sitkFloat32)
    img.SetSpacing([0.9, 1.2, 1.8])
    img.SetOrigin([-17.3, 4.1, 9.6])
    img.SetDirection(sitk.VersorTransform((1.0, 2.0, 0.5), 0.4).GetMatrix())
    grid = Grid.of(img)
    gen = torch.Generator().manual_seed(3)
    t = torch.rand(1, 1, *grid.shape, generator=gen)
    mask = (torch.rand(1, 1, *grid.shape, generator=gen) > 0.3).float()
    lo = (3, 1, 2)
    sub = grid.crop(lo, tuple(n - a for n, a in zip(grid.size, lo, strict=False)))
    sl = (slice(None), slice(None)) + tuple(slice(a, None) for a in reversed(lo))
    factors = (4, 3, 2)
    whole, part = (g.shrink(factors, g.lattice_pads(factors)) for g in (grid, sub))
    # the crop's first coarse voxel is one of the whole grid's, and both have the same spacing
    first = whole.physical_to_index() @ np.append(part.index_to_physical()[:3, 3], 1.0)
    np.testing.assert_allclose(first[:3], np.round(first[:3]), atol=1e-9)
    assert part.spacing == whole.spacing
    off = tuple(int(round(v)) for v in first[:3])  # x-first index of the crop's coarse voxel 0 in the whole's
    lw = make_level(t, mask, grid, 4)
    lp = make_level(t[sl], mask[sl], sub, 4)
    assert lw.grid == whole and lp.grid == part
    # away from the crop's low faces (blur: sigma f/2 fine voxels, 3 sigma, plus the box) both agree
    keep = tuple(slice(int(np.ceil((1.5 * f + f) / f)) + 1, None) for f in reversed(factors))
    a = lw.image[
        (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(reversed(off), part.shape, strict=False))
    ]
    m = lw.mask[
        (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(reversed(off), part.shape, strict=False))
    ]
    torch.testing.assert_close(
        lp.image[(slice(None), slice(None)) + keep], a[(slice(None), slice(None)) + keep], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        lp.mask[(slice(None), slice(None)) + keep], m[(slice(None), slice(None)) + keep], atol=1e-6, rtol=0
    )
