"""Deformable stages: masked losses drive the field only inside the ROI; fields are diffeomorphic,
invertible and deterministic; the Jacobian is right on oblique grids."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import maskreg
from maskreg.engine import field_image, resolved_stage, roi_box, roi_margin
from maskreg.engine.fields import FieldOps, jacobian_determinant
from maskreg.engine.grid import Grid
from maskreg.errors import MaskregError
from maskreg.qc.metrics import jacobian_determinant as sitk_jacobian


def squares(n: int = 128):
    """FireANTs' masked-loss example: fixed = a square rotated 45° (diamond), moving = the same square
    axis-aligned (edges blurred by 1 px), ROI = the upper-left half-plane x + y < n - 1."""
    yy, xx = np.mgrid[:n, :n].astype(float)
    c = (n - 1) / 2
    square = (np.abs(xx - c) < 28) & (np.abs(yy - c) < 28)
    diamond = (np.abs(xx - c) + np.abs(yy - c)) < 28 * np.sqrt(2)
    f = ndimage.gaussian_filter(diamond.astype(float), 1.0)
    m = ndimage.gaussian_filter(square.astype(float), 1.0)
    return f, m, (xx + yy) < 2 * c


@pytest.mark.slow
@pytest.mark.parametrize("kind,loss", [("syn", "cc"), ("syn", "mse"), ("greedy", "masked_cc")])
def test_masked_loss_matches_inside_roi_only(kind, loss, make_image):
    f, m, roi = squares()
    fi, mi = make_image(f, dtype=np.float32), make_image(m, dtype=np.float32)
    stages = [{"type": kind, "loss": loss, "scales": [2, 1], "iterations": [100, 50]}]
    masked = maskreg.register(fi, mi, make_image(roi, dtype=np.uint8), None, stages=stages, device="cpu")
    plain = maskreg.register(fi, mi, None, None, stages=stages, device="cpu")
    warp = lambda r: sitk.GetArrayFromImage(sitk.Resample(mi, fi, r.transform(), sitk.sitkLinear))  # noqa
    wm, wu = warp(masked), warp(plain)
    start = np.abs(m - f)

    def err(w, where):
        return np.abs(w - f)[where].sum() / start[where].sum()

    # Inside the ROI the masked result matches the fixed image: the residual, as a share of the initial
    # difference, stays below 15 % (what is left lies at the diamond's corners, where a smooth field cannot
    # make a right angle out of a blurred one; measured 2-8 %).
    assert err(wm, roi) < 0.15
    # Outside the ROI nothing drives the masked field: it stays near the moving square (> 50 % of the initial
    # difference left, measured 87-95 %), whereas the unmasked registration matched it (< 15 %).
    assert err(wm, ~roi) > 0.5
    assert err(wu, ~roi) < 0.15
    assert masked.jacobian_nonpositive_fraction == 0.0


@pytest.mark.slow
def test_syn_forward_inverse_and_determinism(make_image):
    f, m, _ = squares(96)
    fi, mi = make_image(f, dtype=np.float32), make_image(m, dtype=np.float32)
    stages = [{"type": "syn", "loss": "cc", "scales": [2, 1], "iterations": [60, 30]}]
    r1 = maskreg.register(fi, mi, stages=stages, device="cpu", seed=5)
    r2 = maskreg.register(fi, mi, stages=stages, device="cpu", seed=5)
    # the report knows of the fields before they are read as images; once made, the images are kept
    assert r1.has_fields and r1.summary()["deformable"]
    a1, a2 = (sitk.GetArrayFromImage(r.displacement) for r in (r1, r2))
    assert r1.displacement is r1.displacement and r1.inverse_displacement is r1.inverse_displacement
    assert np.array_equal(a1, a2)
    assert np.abs(a1).max() > 3  # a real deformation, not the identity
    # fields come back as computed (float32), with the phases of the call timed and reported
    assert r1.displacement.GetPixelID() == sitk.sitkVectorFloat32
    assert list(r1.phase_seconds) == ["set-up", "stages", "full-resolution fields"]
    assert all(v >= 0 for v in r1.phase_seconds.values())
    assert sum(r1.phase_seconds.values()) <= r1.seconds + 0.01
    assert r1.summary()["phase_seconds"] == r1.phase_seconds
    # forward ∘ inverse ≈ identity: x + w(x) + u(x + w(x)) = x for the inverse w
    fwd = sitk.DisplacementFieldTransform(sitk.Cast(r1.displacement, sitk.sitkVectorFloat64))
    inv = sitk.DisplacementFieldTransform(sitk.Cast(r1.inverse_displacement, sitk.sitkVectorFloat64))
    pts = np.argwhere((f > 0.5) | (m > 0.5))[::7][:, ::-1].astype(float)
    back = np.array([fwd.TransformPoint(inv.TransformPoint(p.tolist())) for p in pts])
    assert np.linalg.norm(back - pts, axis=1).mean() < 0.1


@pytest.mark.slow
def test_learning_rate_per_level_applies_to_its_level_only(make_image):
    """A list of rates gives each level its own step: [r, r] is the number r bit for bit, and raising only the
    finest level's rate leaves the first level's losses as they were and changes the second's."""
    f, m, _ = squares(64)

    def run(rate):
        stages = [
            {
                "type": "syn",
                "loss": "cc",
                "scales": [2, 1],
                "iterations": [20, 10],
                "learning_rate": rate,
                "tolerance": 0,
            }
        ]
        r = maskreg.register(
            make_image(f, dtype=np.float32), make_image(m, dtype=np.float32), stages=stages, device="cpu"
        )
        return r, sitk.GetArrayFromImage(r.displacement)

    (r_num, d_num), (_r_list, d_list), (r_fine, d_fine) = run(1.5), run([1.5, 1.5]), run([1.5, 3.0])
    assert np.array_equal(d_num, d_list)
    coarse = [r.stages[0].levels[0].losses for r in (r_num, r_fine)]
    fine = [r.stages[0].levels[1].losses for r in (r_num, r_fine)]
    assert coarse[0] == coarse[1]
    assert fine[0][0] == fine[1][0] and fine[0][1:] != fine[1][1:]  # same start, then larger steps
    assert not np.array_equal(d_num, d_fine)


def test_default_rates_count_from_the_finest_level_and_a_given_list_must_fit():
    default = resolved_stage({"type": "syn"})["learning_rate"]
    assert default == [1.5, 1.5, 3.0]
    assert resolved_stage({"type": "syn", "scales": [2, 1], "iterations": [5, 5]})["learning_rate"] == [1.5, 3.0]
    # what reports print: every setting the engine runs with, by stage kind
    syn = resolved_stage({"type": "syn", "scales": [2, 1], "iterations": [5, 5], "fluid_sigma": 2.0})
    assert syn["learning_rate"] == [1.5, 3.0] and syn["fluid_sigma"] == 2.0 and syn["elastic_sigma"] == 0.5
    assert resolved_stage({"type": "affine", "scales": [4, 2], "iterations": [9, 9]})["learning_rate"] == [0.25, 0.25]
    assert resolved_stage({"type": "moments"}) == {"type": "moments"}
    assert resolved_stage({"type": "syn", "scales": [8, 4, 2, 1], "iterations": [5] * 4})["learning_rate"] == [
        1.5,
        1.5,
        1.5,
        3.0,
    ]
    assert resolved_stage({"type": "greedy", "scales": [2, 1], "iterations": [5, 5]})["learning_rate"] == [0.5, 0.5]
    rates = [0.5, 0.25, 0.125]
    assert resolved_stage({"type": "rigid", "learning_rate": rates})["learning_rate"] == rates
    with pytest.raises(
        MaskregError,
        match=r"learning_rate \[1.0, 2.0\] must be one number or one value "
        r"per scale \[4, 2, 1\]",
    ):
        resolved_stage({"type": "syn", "learning_rate": [1.0, 2.0]})


def oblique_grid() -> Grid:
    d = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()
    return Grid((20, 18, 16), (1.2, 0.9, 2.5), (5.0, -3.0, 7.0), tuple(d))


def test_covering_crop_of_a_crop_is_itself_and_covers_a_coarser_box():
    grid = oblique_grid()
    box = grid.crop((3, 2, 4), (9, 7, 5))
    assert grid.covering_crop(box) == box
    coarse = box.corner_aligned((5, 4, 3))  # the same corner centres, about half the resolution
    assert grid.covering_crop(coarse) == box
    # half a voxel back along x: its end centres fall between voxels, rounded outward to one more voxel
    shifted = Grid(
        box.size, box.spacing, tuple(box.index_to_physical()[:3] @ np.array([-0.5, 0.0, 0.0, 1.0])), box.direction
    )
    cover = grid.covering_crop(shifted)
    assert cover.size == (10, 7, 5) and cover == grid.crop((2, 2, 4), (10, 7, 5))
    # larger than the grid: clipped to it
    assert grid.covering_crop(Grid((40, 2, 2), grid.spacing, grid.origin, grid.direction)).size == (20, 2, 2)


@pytest.mark.parametrize("kind", ["syn", "greedy"])
def test_fields_beyond_the_roi_box_extend_from_its_faces(kind, make_image):
    """A small ROI: the deformable stage works on the ROI's box (``roi_box``, ``roi_margin``), and the returned
    fields, forward and inverse, cover the whole oblique grid, each face's values repeated outward (border
    padding, exactly)."""
    d = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()
    grid = Grid((40, 36, 30), (1.2, 0.9, 2.5), (5.0, -3.0, 7.0), tuple(d))
    ref = make_image(np.zeros(grid.shape, np.float32), grid.spacing, grid.origin, grid.direction)
    zz, yy, xx = np.mgrid[: grid.shape[0], : grid.shape[1], : grid.shape[2]].astype(float)
    r2 = (zz - 15) ** 2 + (yy - 18) ** 2 + (xx - 20) ** 2
    fixed = np.exp(-r2 / (2 * 3.0**2)) + 0.3 * np.exp(-((xx - 22) ** 2 + (yy - 16) ** 2) / 8.0)
    moving = np.exp(-((zz - 15.5) ** 2 + (yy - 18.6) ** 2 + (xx - 19.2) ** 2) / (2 * 3.3**2))
    roi = r2 < 3.5**2
    stage = {"type": kind, "loss": "cc", "scales": [1], "iterations": [10]}
    res = maskreg.register(
        make_image(fixed, dtype=np.float32, like=ref),
        make_image(moving, dtype=np.float32, like=ref),
        make_image(roi, dtype=np.uint8, like=ref),
        None,
        stages=[stage],
        device="cpu",
    )
    _, box = roi_box(grid, torch.from_numpy(roi.astype(np.float32))[None, None], roi_margin(resolved_stage(stage)))
    assert np.prod([b.stop - b.start for b in box]) < 0.5 * np.prod(grid.shape)  # a box, not the grid
    assert res.stages[0].levels[0].shape == [b.stop - b.start for b in box]
    for field in (res.displacement, res.inverse_displacement):
        assert field.GetSize() == grid.size
        u = sitk.GetArrayFromImage(field)  # [z, y, x, 3]
        inner = u[box]
        assert np.abs(inner).max() > 0.05  # the field moved
        pads = [(b.start, n - b.stop) for b, n in zip(box, grid.shape, strict=True)] + [(0, 0)]
        np.testing.assert_array_equal(u, np.pad(inner, pads, mode="edge"))


def test_a_box_field_is_smoothed_as_if_it_went_on_beyond_its_open_faces():
    """A field on a box cut from a larger grid is smoothed as the field it stands for: the box's values with
    each open face repeated outward (``extend_from_faces``), while a face on the grid's own border keeps zero
    padding. Zero padding at the open faces pulled them towards 0 at every greedy update: a jump that folded
    the map there (the matrix's ``b2d_16_64-both-greedy-cc`` cell, 0.021 % of voxels)."""
    grid = Grid((30, 24, 20), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    # x reaches both grid faces; the y and z faces are open, each at least the kernel's reach (4 voxels) from
    # the grid's own border, whose zero padding would reach into the box on the whole grid too
    box_grid = grid.crop((0, 5, 6), (30, 12, 9))
    box = (slice(6, 15), slice(5, 17), slice(0, 30))  # tensor order (z, y, x)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 3, *box_grid.shape, generator=g) + 4.0  # far from 0, as a translation's field is
    ops = FieldOps(box_grid, torch.device("cpu"), open_faces=((True, True), (True, True), (False, False)))
    pads = [(b.start, n - b.stop) for b, n in zip(box, grid.shape, strict=True)]
    whole = torch.from_numpy(np.pad(u.numpy(), [(0, 0), (0, 0), *pads[:2], (0, 0)], mode="edge"))
    expected = FieldOps(grid, torch.device("cpu")).smooth(whole, 1.2)[(slice(None), slice(None), *box)]
    np.testing.assert_allclose(ops.smooth_field(u, 1.2).numpy(), expected.numpy(), atol=1e-5)
    closed = FieldOps(box_grid, torch.device("cpu"))  # the whole grid: zero padding everywhere, as before
    np.testing.assert_array_equal(closed.smooth_field(u, 1.2).numpy(), closed.smooth(u, 1.2).numpy())
    assert float((ops.smooth_field(u, 1.2) - closed.smooth(u, 1.2)).abs().max()) > 0.5  # the open faces differ


def test_jacobian_of_a_linear_field_on_an_oblique_grid():
    grid = oblique_grid()
    a = np.array([[1.1, 0.05, 0.0], [0.02, 0.95, 0.1], [0.0, -0.05, 1.2]])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)[..., ::-1]
    phys = idx @ (grid.direction_matrix @ np.diag(grid.spacing)).T + np.array(grid.origin)
    u = phys @ (a - np.eye(3)).T  # u(x) = (A - I) x, so det J = det A everywhere
    t = torch.as_tensor(np.moveaxis(u, -1, 0)[None], dtype=torch.float32)
    det = jacobian_determinant(t, FieldOps(grid, torch.device("cpu")))[0, 0].numpy()
    assert np.allclose(det[2:-2, 2:-2, 2:-2], np.linalg.det(a), atol=1e-4)
    # the QC's SimpleITK-based Jacobian of the written field agrees
    ref = sitk.GetArrayFromImage(sitk_jacobian(field_image(t, grid)))
    assert np.allclose(ref[2:-2, 2:-2, 2:-2], det[2:-2, 2:-2, 2:-2], atol=1e-4)


def test_exp_of_a_velocity_is_inverted_by_exp_of_its_negative():
    grid = oblique_grid()
    ops = FieldOps(grid, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    v = ops.smooth(torch.randn(1, 3, *grid.shape, generator=g) * 6.0, 2.0)
    u, w = ops.exp(v), ops.exp(-v)
    resid = ops.compose(u, w)  # (id + u) ∘ (id + w) - id
    inner = resid[..., 3:-3, 3:-3, 3:-3]
    assert float(ops.max_voxels(u)) > 0.5
    # interpolation of the fields is all that is left: a small fraction of the finest spacing (0.9 mm); the
    # issue asks < 0.1 voxel. Measured: 0.025 mm mean (max 0.17) with first steps <= 0.5 voxel; 0.017 mm
    # (max 0.09) with two more squarings, which cost 25 % of a syn stage's time
    norm = inner.pow(2).sum(1).sqrt()
    assert float(norm.mean()) < 0.035 and float(norm.max()) < 0.2
    assert float(jacobian_determinant(u, ops).min()) > 0


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
def test_iterations_coarse_exponential_sits_on_the_anchored_lattice_and_stays_close_to_the_exact_one(kernels, request):
    """The SyN iterations' exp(∓v/2) on a large grid: the coarse points are every other voxel of the lattice
    anchored at the world origin (so a crop of the grid by one voxel keeps them), the velocity reaches them
    exactly, and the result is the exact exponential to a small fraction of a voxel. Both code paths: the
    compiled resize kernel and the torch taps that CUDA runs."""
    if kernels == "torch":
        request.getfixturevalue("torch_kernels")
    d = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()
    grid = Grid((47, 41, 36), (1.1, 1.0, 1.3), (5.3, -3.7, 7.1), tuple(d))
    ops = FieldOps(grid, torch.device("cpu"), coarse_exp=True)
    assert ops.coarse is not None and ops.coarse.grid.spacing == (2.2, 2.0, 2.6)
    # coarse point 0 is a lattice voxel of the fine grid, at fine index -p (p = 0 or 1 per axis)
    first = grid.physical_to_index() @ np.append(ops.coarse.grid.origin, 1.0)
    pads = grid.lattice_pads((2, 2, 2))
    np.testing.assert_allclose(first[:3], [-p for p in pads], atol=1e-9)
    sub = grid.crop((1, 0, 1), (46, 41, 35))
    sub_first = grid.physical_to_index() @ np.append(FieldOps(sub, torch.device("cpu"), True).coarse.grid.origin, 1.0)
    step = (sub_first[:3] - first[:3]) / 2  # the same lattice from the crop: whole steps of 2 voxels
    np.testing.assert_allclose(step, np.round(step), atol=1e-9)

    g = torch.Generator().manual_seed(1)
    v = ops.smooth(torch.randn(1, 3, *grid.shape, generator=g), 3.0)
    v = v * (4.0 / ops.max_voxels(v))  # the longest velocity vector 4 voxels: exp(v/2) moves up to ~2
    n = ops.iteration_squarings(ops.max_voxels(v) * 0.5)
    um, up = ops.exp_pair_in_iteration(v, n, 0.5)
    # the iterations' exponential is the coarse grid's of the velocity at the coarse points (fine voxels 2j - p,
    # the nearest fine voxel where that lies beyond the grid), read exactly at the fine voxels on the lattice
    idx = [
        torch.clamp(torch.arange(n) * 2 - p, 0, m - 1)
        for n, p, m in zip(ops.coarse.grid.shape, reversed(pads), grid.shape, strict=False)
    ]
    cm, cp = ops.coarse.exp_pair(v[:, :, idx[0]][:, :, :, idx[1]][..., idx[2]], n, 0.5)
    on = [torch.arange(p, m, 2) for p, m in zip(reversed(pads), grid.shape, strict=False)]  # fine 2j - p inside
    at = [(i + p) // 2 for i, p in zip(on, reversed(pads), strict=False)]  # their coarse j
    for fine, coarse in ((um, cm), (up, cp)):
        torch.testing.assert_close(
            fine[:, :, on[0]][:, :, :, on[1]][..., on[2]],
            coarse[:, :, at[0]][:, :, :, at[1]][..., at[2]],
            atol=1e-5,
            rtol=0,
        )
    em, ep = ops.exp_pair(v, None, 0.5)
    assert float(ops.max_voxels(ep)) > 1.0
    err = (up - ep).pow(2).sum(1).sqrt()[..., 2:-2, 2:-2, 2:-2]
    # measured 0.048 mm mean, 0.24 max, for displacements up to 1.95 voxels (~2 mm)
    assert float(err.mean()) < 0.08 and float(err.max()) < 0.4, (float(err.mean()), float(err.max()))


@pytest.mark.slow
def test_jacobian_floor_keeps_a_collapsing_syn_from_folding(demo):
    """ITKElastix's 2D head pair (two contrasts) with its masks, affine mi then syn mse: mse pulls the
    ventricles shut, and without the fold gate the velocity's gradients reach ~5 mm/mm and exp(v) folds
    (0.072 % of the voxels, measured; each half-way map stays positive). With the default jacobian_floor the
    map does not fold, and the heads' Dice moves by less than 0.002 (0.9611 without, 0.9605 with)."""
    d = demo / "elastix_ct2d_head"
    read = lambda n, t=sitk.sitkFloat32: sitk.ReadImage(str(d / n), t)  # noqa: E731
    fixed, moving = read("fixed.nii.gz"), read("moving.nii.gz")
    fm, mm = read("fixed_mask.nii.gz", sitk.sitkUInt8), read("moving_mask.nii.gz", sitk.sitkUInt8)
    start = maskreg.register(
        fixed, moving, fm, mm, device="cpu", stages=[{"type": "moments"}, {"type": "affine", "loss": "mi"}]
    ).linear
    heads = sitk.GetArrayFromImage(fixed) > 20

    def run(**floor):
        st = [{"type": "syn", "loss": "mse", **floor}]
        r = maskreg.register(fixed, moving, fm, mm, stages=st, device="cpu", initial=start)
        warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, r.transform(), sitk.sitkLinear, 0.0)) > 20
        return r.jacobian_nonpositive_fraction, 2 * (heads & warped).sum() / (heads.sum() + warped.sum())

    (fold_off, dice_off), (fold_on, dice_on) = run(jacobian_floor=0), run()
    assert fold_off > 1e-4 and fold_on == 0.0, (fold_off, fold_on)
    assert abs(dice_on - dice_off) < 0.002, (dice_off, dice_on)


def test_label_term_raises_dice_on_the_brain_pair(demo):
    """The optional soft-Dice term (label_weight) pulls the labels together beyond the image term alone, more
    with a larger weight (measured mean Dice 0.6254, 0.6287, 0.6326 at weights 0, 1, 2)."""
    d = demo / "brain3d"
    read = lambda n, t=sitk.sitkFloat32: sitk.ReadImage(str(d / n), t)  # noqa: E731
    fixed, moving = read("mni_image.nii.gz"), read("vxm_image.nii.gz")
    fm, mm = read("mni_mask.nii.gz", sitk.sitkUInt8), read("vxm_mask.nii.gz", sitk.sitkUInt8)
    fl, ml = read("mni_labels.nii.gz", sitk.sitkUInt8), read("vxm_labels.nii.gz", sitk.sitkUInt8)
    start = maskreg.register(
        fixed,
        moving,
        fm,
        mm,
        device="cpu",
        stages=[{"type": "moments"}, {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [60, 30]}],
    ).linear
    a = sitk.GetArrayFromImage(fl)

    def mean_dice(weight):
        st = [{"type": "syn", "loss": "cc", "scales": [4, 2], "iterations": [30, 15], "label_weight": weight}]
        r = maskreg.register(
            fixed, moving, fm, mm, stages=st, device="cpu", initial=start, fixed_labels=fl, moving_labels=ml
        )
        assert r.jacobian_nonpositive_fraction == 0.0
        w = sitk.GetArrayFromImage(sitk.Resample(ml, fixed, r.transform(), sitk.sitkNearestNeighbor, 0))
        return np.mean([2 * ((a == v) & (w == v)).sum() / ((a == v).sum() + (w == v).sum()) for v in (1, 2)])

    none, one, two = mean_dice(0.0), mean_dice(1.0), mean_dice(2.0)
    assert none < one < two and two > none + 0.005, (none, one, two)


@pytest.mark.slow
def test_small_roi_in_a_large_oblique_image_is_registered_on_its_box_only(monkeypatch, make_image):
    """A 12 mm ROI in a 3D oblique, anisotropic image: the deformable levels work on the mask's box (plus a
    margin), the fields still cover the whole fixed grid, nothing folds anywhere, and inside the ROI the
    result is the one computed on the whole grid."""
    size, spacing = (96, 80, 40), (1.0, 1.25, 2.5)
    ref = sitk.Image(list(size), sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin((-40.0, 25.0, -30.0))
    ref.SetDirection(sitk.VersorTransform([0.2, 0.9, -0.3], 0.5).GetMatrix())
    grid = Grid.of(ref)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    pts = idx @ grid.index_to_physical()[:3, :3].T + grid.index_to_physical()[:3, 3]
    centre = pts.mean(0) + np.array([8.0, -5.0, 4.0])

    def blobs(shift):
        p = pts - shift
        v = sum(
            np.exp(-np.sum((p - centre - o) ** 2, 1) / (2 * 4.0**2))
            for o in (np.zeros(3), np.array([6.0, 3.0, -2.0]), np.array([-5.0, 4.0, 3.0]))
        )
        return v.reshape(size).transpose(2, 1, 0)

    def image(a, dtype=np.float32):
        return make_image(a, dtype=dtype, like=ref)

    f_arr, m_arr = blobs(np.zeros(3)), blobs(np.array([2.0, -1.5, 1.0]))  # moving: the blobs moved 2.7 mm
    roi = (np.linalg.norm(pts - centre, axis=1) < 12.0).reshape(size).transpose(2, 1, 0)
    stages = [{"type": "syn", "loss": "cc", "scales": [2, 1], "iterations": [60, 40], "learning_rate": 1.5}]

    def run():
        return maskreg.register(image(f_arr), image(m_arr), image(roi, np.uint8), None, stages=stages, device="cpu")

    res = run()
    finest = res.stages[0].levels[-1]
    assert np.prod(finest.shape) < 0.25 * np.prod(grid.shape)  # the box, not the grid
    assert res.displacement.GetSize() == size and res.inverse_displacement.GetSize() == size
    np.testing.assert_allclose(res.displacement.GetDirection(), ref.GetDirection())
    assert res.jacobian_nonpositive_fraction == 0.0
    warped = sitk.GetArrayFromImage(sitk.Resample(image(m_arr), image(f_arr), res.transform(), sitk.sitkLinear))
    before = np.abs(m_arr - f_arr)[roi].sum()
    after = np.abs(warped - f_arr)[roi].sum()
    assert after < 0.25 * before, after / before  # measured 0.10

    # the same registration on the whole grid. The two differ only where the SyN iterations exponentiate the
    # velocity on a half-resolution grid (FieldOps.exp_pair_in_iteration): the whole grid has one, the box is
    # under COARSE_EXP_MIN_VOXELS and has none (exact exponentials). With exact exponentials on both, the box
    # changes nothing (measured mean 0.0001 mm, max 0.0013); the coarse grid's approximation moves the result a
    # small fraction of the 2.7 mm shift (measured mean 0.037 mm, max 0.079)
    whole = lambda grid, mask, margin: (grid, tuple(slice(0, n) for n in grid.shape))  # noqa: E731
    monkeypatch.setattr(maskreg.engine.deformable_stage, "roi_box", whole)
    full = run()
    assert np.prod(full.stages[0].levels[-1].shape) == np.prod(grid.shape)
    monkeypatch.setattr(maskreg.engine.fields, "COARSE_EXP_MIN_VOXELS", 1 << 40)
    full_exact = run()
    monkeypatch.undo()
    monkeypatch.setattr(maskreg.engine.fields, "COARSE_EXP_MIN_VOXELS", 1 << 40)
    box_exact = run()

    def roi_diff(r1, r2):
        a, b = (sitk.GetArrayFromImage(r.displacement)[roi] for r in (r1, r2))
        return np.linalg.norm(a - b, axis=1)

    diff = roi_diff(box_exact, full_exact)
    assert diff.max() < 0.005, (diff.mean(), diff.max())
    diff = roi_diff(res, full)
    assert diff.mean() < 0.1 and diff.max() < 0.4, (diff.mean(), diff.max())
