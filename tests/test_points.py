"""Jittered point sampling of pointwise losses (maskreg.engine.points) and the linear stages' regular-step optimiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import maskreg
from maskreg.engine.losses import VALUE_AND_GRAD, mattes_mi, mse
from maskreg.engine.points import PointLoss, gradient_images, jitter, voxel_points
from maskreg.engine.sampling import grid_sample
from maskreg.stages import resolve_stage


def _blob(shape, centre, sigma):
    """A smooth anisotropic test volume ``[1, 1, *shape]``: a Gaussian blob plus a gentle ramp."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    r2 = ((zz - centre[0]) / sigma[0]) ** 2 + ((yy - centre[1]) / sigma[1]) ** 2 + ((xx - centre[2]) / sigma[2]) ** 2
    return (torch.exp(-0.5 * r2) + 0.002 * xx)[None, None]


def test_gradient_images_are_derivatives_in_normalised_units():
    img = _blob((9, 12, 15), (4.0, 6.0, 7.0), (2.5, 3.0, 4.0))
    g = gradient_images(img)
    assert g.shape == (1, 3, 9, 12, 15)
    # ∂I/∂q_x at an inner voxel: central difference per voxel × (n_x − 1) / 2
    expect = (img[0, 0, 4, 6, 9] - img[0, 0, 4, 6, 7]) / 2 * (15 - 1) / 2
    assert float(g[0, 0, 4, 6, 8]) == pytest.approx(float(expect), rel=1e-5)
    expect_z = (img[0, 0, 5, 6, 8] - img[0, 0, 3, 6, 8]) / 2 * (9 - 1) / 2
    assert float(g[0, 2, 4, 6, 8]) == pytest.approx(float(expect_z), rel=1e-5)


def test_points_are_jittered_within_their_voxels_and_fixed_values_interpolated():
    shape = (6, 7, 8)
    mask = torch.zeros(1, 1, *shape)
    mask[0, 0, 1:5, 2:6, 1:7] = 1
    idx, centres = voxel_points(mask)
    assert idx.numel() == int(mask.sum())
    gen = torch.Generator().manual_seed(3)
    pts = jitter(centres, shape, gen)
    half = torch.tensor([1 / 7, 1 / 6, 1 / 5])  # ½ voxel in normalised units, x first
    off = (pts - centres).abs()
    assert bool((off <= half + 1e-6).all())
    assert bool((off > 0.25 * half).any(dim=0).all())  # every axis moved for some points
    fixed = _blob(shape, (2.5, 3.0, 4.0), (2.0, 2.0, 3.0))
    pl = PointLoss(fixed, mask, fixed, mask, torch.Generator().manual_seed(3))
    expect = grid_sample(fixed, pl.points[:, :3].reshape(1, -1, 1, 1, 3)).reshape(-1)
    assert torch.allclose(pl.fixed_values.reshape(-1), expect)
    assert not torch.allclose(pl.fixed_values.reshape(-1), fixed.reshape(-1)[idx])  # not the voxel centres


def test_point_gradient_matches_finite_differences():
    """∂loss/∂θ through the moving gradient image against central differences of the loss with the weights
    frozen (the gradient treats them as constants), on a smooth volume where both must agree closely."""
    shape = (20, 24, 28)
    fixed = _blob(shape, (9.0, 11.0, 13.0), (4.0, 5.0, 6.0))
    moving = _blob(shape, (9.6, 10.5, 13.8), (4.2, 4.8, 6.1))
    mask = torch.zeros(1, 1, *shape)
    mask[0, 0, 3:17, 4:20, 4:24] = 1
    ones = torch.ones_like(mask)
    theta = torch.tensor([[1.01, 0.02, 0.0, 0.01], [-0.01, 0.99, 0.015, -0.02], [0.0, 0.01, 1.0, 0.03]])
    for loss_fn in (mse, mattes_mi):
        pl = PointLoss(fixed, mask, moving, ones, torch.Generator().manual_seed(0))
        _, d = pl(theta, VALUE_AND_GRAD[loss_fn.__name__.replace("mattes_", "")], bins=16)
        w = pl.fixed_weight
        eps = 1e-3
        fd = torch.zeros_like(theta)
        for i in range(3):
            for j in range(4):
                e = torch.zeros_like(theta)
                e[i, j] = eps
                vals = []
                for sgn in (1, -1):
                    q = pl.points @ (theta + sgn * e).T
                    mv = grid_sample(moving, q.reshape(1, -1, 1, 1, 3)).reshape(1, 1, -1)
                    vals.append(float(loss_fn(pl.fixed_values, mv, w, bins=16)))
                fd[i, j] = (vals[0] - vals[1]) / (2 * eps)
        rel = float((d - fd).norm() / fd.norm())
        assert rel < 0.05, (loss_fn.__name__, rel, d, fd)


def test_fraction_keeps_a_seeded_subset_and_estimates_the_overlap():
    shape = (16, 18, 20)
    fixed = _blob(shape, (8.0, 9.0, 10.0), (3.0, 3.0, 3.0))
    mask = torch.zeros(1, 1, *shape)
    mask[0, 0, 2:14, 3:15, 2:18] = 1
    n = int(mask.sum())

    def make(seed):
        return PointLoss(
            fixed,
            mask,
            fixed,
            mask,
            torch.Generator().manual_seed(seed),
            fraction=0.2,
        )

    a, b, c = make(1), make(1), make(2)
    assert a.count == round(0.2 * n)
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    full = PointLoss(fixed, mask, fixed, mask, torch.Generator().manual_seed(1))
    theta = torch.tensor([[1.0, 0, 0, 0.3], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])  # shifted: part of the mask leaves
    ow_full, ov_full = full.overlap(theta)
    ow, ov = a.overlap(theta)
    assert 0.5 * n < ow_full < 0.95 * n
    assert ow == pytest.approx(ow_full, rel=0.05) and ov == pytest.approx(ov_full, rel=0.05)
    assert ov <= n


def test_regular_step_converges_precisely_where_its_step_halves(make_image):
    """A linear stage's regular-step descent (the default optimizer) on a known 2.9 mm shift of an anisotropic
    scene (mse, no plateau test): the step halves on each overshoot, so the level ends converged (its step 2⁻⁵ of
    the first) long before its 300 iterations, at the shift to 0.01 mm; tolerance 0 runs every iteration and
    stays there."""
    yy, xx = np.mgrid[:64, :64].astype(float)

    def scene(dx, dy):
        x, y = xx - dx, yy - dy
        return np.exp(-((x - 30) ** 2 / 60 + (y - 34) ** 2 / 90)) + 0.6 * np.exp(-((x - 40) ** 2 + (y - 22) ** 2) / 30)

    fixed, moving = make_image(scene(0, 0), dtype=np.float32), make_image(scene(2.3, -1.7), dtype=np.float32)
    stage = {"type": "translation", "loss": "mse", "scales": [1], "iterations": [300], "tolerance": 1e-12}
    assert resolve_stage(stage)["optimizer"] == "regular_step"
    res = maskreg.register(fixed, moving, stages=[stage], device="cpu")
    lv = res.stages[0].levels[0]
    assert lv.converged and lv.iterations < 60, lv.iterations  # measured 20
    np.testing.assert_allclose(res.linear.translation, [2.3, -1.7], atol=0.01)
    assert lv.losses[-1] < 1e-3 * lv.losses[0]
    res0 = maskreg.register(fixed, moving, stages=[dict(stage, tolerance=0)], device="cpu")
    lv0 = res0.stages[0].levels[0]
    assert not lv0.converged and lv0.iterations == 300
    np.testing.assert_allclose(res0.linear.translation, [2.3, -1.7], atol=0.01)


@pytest.fixture(scope="module")
def known_pair(shared_data, make_image):
    """The MNI template at 2 mm (brain mask) and a copy moved by a known affine with 2 % noise onto a 2.0 mm
    grid, its mask moved the same way (like ``benchmarks/bench_linear.py``'s known pair, smaller)."""
    template = ("mni_icbm152_2009a", "template")
    src = sitk.ReadImage(str(shared_data(*template, "image.nii.gz")), sitk.sitkFloat32)
    gm = sitk.ReadImage(str(shared_data(*template, "gm_prob.nii.gz")), sitk.sitkFloat32)
    wm = sitk.ReadImage(str(shared_data(*template, "wm_prob.nii.gz")), sitk.sitkFloat32)

    def to_grid(img, spacing, transform=None, interp=sitk.sitkLinear):
        size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=False)]
        ref = sitk.Image(size, img.GetPixelID())
        ref.SetSpacing([spacing] * 3)
        ref.SetOrigin(img.GetOrigin())
        ref.SetDirection(img.GetDirection())
        sm = sitk.SmoothingRecursiveGaussian(img, 0.5 * math.sqrt(spacing**2 - 1.0))
        return sitk.Resample(sm, ref, transform or sitk.Transform(), interp, 0.0)

    mask1 = sitk.Cast((gm + wm) > 0.3, sitk.sitkFloat32)
    fixed = to_grid(src, 2.0)
    fmask = sitk.Cast(to_grid(mask1, 2.0) > 0.5, sitk.sitkUInt8)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    truth = sitk.AffineTransform(3)
    rot = sitk.VersorTransform((1.0, 2.0, 3.0), math.radians(6.0))
    mat = np.array(rot.GetMatrix()).reshape(3, 3) @ np.diag([1.03, 0.98, 1.02])
    truth.SetMatrix(mat.ravel().tolist())
    truth.SetCenter(centre.tolist())
    truth.SetTranslation((4.0, -6.0, 3.0))
    # moving(y) = source(T⁻¹(y)): resampling the source through T⁻¹ puts fixed point x at T(x); the noise is
    # added on a 1.2 mm grid, then the image goes to 2.0 mm with the anti-alias blur (a scanner's noise is
    # smoothed by a resampling as well)
    inv = truth.GetInverse()
    fine = to_grid(src, 1.2, inv)
    arr = sitk.GetArrayFromImage(fine)
    arr += np.random.default_rng(0).normal(0, 0.02 * float(arr.max()), arr.shape).astype(np.float32)
    noisy = make_image(arr, like=fine)
    sm = sitk.SmoothingRecursiveGaussian(noisy, 0.5 * math.sqrt(2.0**2 - 1.2**2))
    ref = sitk.Image([int(round(n * 1.2 / 2.0)) for n in fine.GetSize()], sitk.sitkFloat32)
    ref.SetSpacing([2.0] * 3)
    ref.SetOrigin(np.add(fine.GetOrigin(), (0.7, -0.4, 0.9)).tolist())
    ref.SetDirection(fine.GetDirection())
    moving = sitk.Resample(sm, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    mmask = sitk.Cast(
        sitk.Resample(to_grid(mask1, 1.2, inv), ref, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.5, sitk.sitkUInt8
    )
    return fixed, moving, fmask, mmask, truth


def test_affine_started_at_the_truth_stays_there(known_pair):
    """Started at the true affine, masked Mattes MI (32 bins) at full resolution must not walk away from it.
    Sampled at the fixed voxel centres it did, on benchmarks/bench_linear.py's known pair: 0.11 mm mean error
    while the loss fell (the interpolation blur of the moving image's noise rewarded it). Jittered points fix it."""
    fixed, moving, fmask, mmask, truth = known_pair
    pts = np.array(
        [
            fixed.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk[::-1]))
            for ijk in np.argwhere(sitk.GetArrayViewFromImage(fmask) > 0)[::7]
        ]
    )
    stage = {"type": "affine", "loss": "mi", "scales": [1], "iterations": [40]}
    res = maskreg.register(
        fixed, moving, fmask, mmask, [stage], device="cpu", initial=truth, sampling={"fraction": 0.3}
    )
    est = res.transform()
    err = np.linalg.norm(
        [np.subtract(est.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p))) for p in pts], axis=1
    )
    assert err.mean() < 0.06, err.mean()


def test_a_level_stops_once_its_step_has_halved_five_times_unless_tolerance_is_zero(known_pair):
    """regular_step's own convergence: on the known pair started at the truth, the step halves within a few
    iterations and the level stops (converged) long before its 300 iterations, and before the 20 the
    plateau test needs; tolerance 0 runs every iteration."""
    fixed, moving, fmask, mmask, truth = known_pair
    stage = {"type": "affine", "loss": "mi", "scales": [2], "iterations": [300], "tolerance": 1e-12}
    res = maskreg.register(
        fixed, moving, fmask, mmask, [stage], device="cpu", initial=truth, sampling={"fraction": 0.2}
    )
    lv = res.stages[0].levels[0]
    assert lv.converged and lv.iterations < 20, lv.iterations
    res0 = maskreg.register(
        fixed, moving, fmask, mmask, [dict(stage, tolerance=0)], device="cpu", initial=truth, sampling={"fraction": 0.2}
    )
    lv0 = res0.stages[0].levels[0]
    assert not lv0.converged and lv0.iterations == 300
