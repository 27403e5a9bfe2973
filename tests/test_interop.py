"""Our transform files in other tools: SimpleITK and ANTs (antspyx) applying them reproduce our warps."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import maskreg
from maskreg import transforms, warp

ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install -e '.[test]' installs it)")

STAGES = [
    {"type": "moments"},
    {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [40, 20]},
    {"type": "syn", "loss": "cc", "scales": [2, 1], "iterations": [20, 10]},
]


@pytest.fixture(scope="module", params=["2d", "3d"])
def result(request, tmp_path_factory, demo):
    out = tmp_path_factory.mktemp(f"interop{request.param}")
    if request.param == "2d":
        f, m = demo / "antspy_brain2d" / "r64.nii.gz", demo / "antspy_brain2d" / "r16.nii.gz"
    else:  # oblique directions, different grids (LIA moving vs LPS-flipped fixed)
        f, m = demo / "brain3d" / "mni_image.nii.gz", demo / "brain3d" / "vxm_image.nii.gz"
    fixed, moving = sitk.ReadImage(str(f), sitk.sitkFloat32), sitk.ReadImage(str(m), sitk.sitkFloat32)
    res = maskreg.register(fixed, moving, stages=STAGES, device="cpu")
    transforms.write_linear(res.linear, out / "affine.mat")
    transforms.write_field(res.displacement, out / "warp.nii.gz")
    transforms.write_field(res.inverse_displacement, out / "inverse_warp.nii.gz")
    ours = warp.warp_image(moving, fixed, transforms.read_chain(out / "affine.mat", out / "warp.nii.gz")[2])
    return f, m, out, sitk.GetArrayFromImage(ours), res


def test_ants_apply_transforms_reproduces_our_warp(result):
    f, m, out, ours, _ = result
    fixed, moving = ants.image_read(str(f)), ants.image_read(str(m))
    # ANTs' list order: [warp, affine] -- the warp is applied first to points: T(x) = A(x + u(x))
    theirs = ants.apply_transforms(
        fixed, moving, [str(out / "warp.nii.gz"), str(out / "affine.mat")], interpolator="linear"
    ).numpy()
    theirs = np.asarray(theirs).T  # antspyx arrays are x-first
    scale = float(np.abs(ours).max())
    inside = ours != 0  # ANTs and ITK may differ on the last voxel at the moving image's border
    assert np.abs(ours - theirs)[inside].mean() < 1e-3 * scale
    assert np.percentile(np.abs(ours - theirs)[inside], 99) < 1e-2 * scale


def test_written_chain_maps_points_like_the_result(result):
    _, _, out, _, res = result
    lin, field, chain = transforms.read_chain(out / "affine.mat", out / "warp.nii.gz")
    dim = lin.dim
    fixed_grid = res.fixed_grid
    rng = np.random.default_rng(0)
    idx = rng.uniform(3, np.array(fixed_grid.size) - 4, (50, dim))
    pts = idx @ (fixed_grid.direction_matrix @ np.diag(fixed_grid.spacing)).T + np.array(fixed_grid.origin)
    # linear part: exactly the result's matrix (<= 1e-4 mm)
    assert np.abs(lin.apply(pts) - res.linear.apply(pts)).max() < 1e-4
    # whole chain: the file (float32 field) against the in-memory result (float64 field): <= 1e-3 voxel
    direct = np.array([res.transform().TransformPoint(p.tolist()) for p in pts])
    via_files = np.array([chain.TransformPoint(p.tolist()) for p in pts])
    assert np.abs(direct - via_files).max() < 1e-3 * min(fixed_grid.spacing)


def test_landmarks_forward_then_inverse_return_home(result):
    """Fixed points -> moving space with the forward chain, back with the inverse chain (A^-1 first,
    then the inverse warp): within 0.1 voxel."""
    _, _, out, _, res = result
    lin, _, forward = transforms.read_chain(out / "affine.mat", out / "warp.nii.gz")
    inverse = transforms.inverse_chain(lin, transforms.read_field(out / "inverse_warp.nii.gz"))
    g = res.fixed_grid
    rng = np.random.default_rng(1)
    idx = rng.uniform(4, np.array(g.size) - 5, (40, g.dim))
    pts = idx @ (g.direction_matrix @ np.diag(g.spacing)).T + np.array(g.origin)
    moved = warp.warp_points(pts, forward)
    back = warp.warp_points(moved, inverse)
    assert np.linalg.norm(moved - pts, axis=1).max() > 1.0
    assert np.linalg.norm(back - pts, axis=1).mean() < 0.1 * min(g.spacing)


def test_starting_from_ants_syn_output(tmp_path, demo):
    """ANTs' own SyN result ([1Warp.nii.gz, 0GenericAffine.mat]) as the initial transform: with no stages the
    written chain warps like ``ants.apply_transforms``; a short masked greedy refinement improves the
    match (NCC inside the brain)."""
    f, m = demo / "antspy_brain2d" / "r64.nii.gz", demo / "antspy_brain2d" / "r16.nii.gz"
    af, am = ants.image_read(str(f)), ants.image_read(str(m))
    reg = ants.registration(
        af, am, type_of_transform="SyN", reg_iterations=(20, 10, 0), outprefix=str(tmp_path / "ants_")
    )
    fwd = reg["fwdtransforms"]
    assert fwd[0].endswith("Warp.nii.gz") and fwd[1].endswith("GenericAffine.mat")
    fixed, moving = sitk.ReadImage(str(f), sitk.sitkFloat32), sitk.ReadImage(str(m), sitk.sitkFloat32)
    t0 = transforms.read_transform(fwd)
    start = maskreg.register(fixed, moving, stages=[], initial=t0, device="cpu")
    ours = sitk.GetArrayFromImage(warp.warp_image(moving, fixed, start.transform()))
    theirs = np.asarray(ants.apply_transforms(af, am, fwd, interpolator="linear").numpy()).T
    inside = ours != 0
    assert np.abs(ours - theirs)[inside].mean() < 1e-3 * float(np.abs(ours).max())

    mask = sitk.Cast(fixed > 10, sitk.sitkUInt8)
    refined = maskreg.register(
        fixed,
        moving,
        mask,
        stages=[{"type": "greedy", "loss": "cc", "scales": [2, 1], "iterations": [20, 10]}],
        initial=t0,
        device="cpu",
    )
    brain = sitk.GetArrayFromImage(mask) > 0
    fix = sitk.GetArrayFromImage(fixed)

    def ncc(a):
        x, y = fix[brain] - fix[brain].mean(), a[brain] - a[brain].mean()
        return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))

    after = sitk.GetArrayFromImage(warp.warp_image(moving, fixed, refined.transform()))
    assert ncc(after) > ncc(ours) + 0.01  # measured: 0.858 (ANTs SyN, 20/10 its) -> 0.913
    assert refined.jacobian_nonpositive_fraction == 0.0
