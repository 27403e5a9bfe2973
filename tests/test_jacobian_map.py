"""The Jacobian determinant map written as ``results/{subject}/transforms/jacobian.nii.gz`` and the composite
``.h5`` transform: real files written and read back with SimpleITK, values compared with SimpleITK's and ANTs'
own Jacobian filters and with finite differences of the transform ITK reads from our files.

Convention under test: the map is ``det J`` of the fixed → moving point map ``T(x) = A(x + u(x)) + b`` in
physical LPS mm (``det(A) · det(I + ∂u/∂x)``), on the fixed grid, float32."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from maskreg import transforms
from maskreg.qc import evaluate, metrics

SIZE = (22, 18, 14)  # x, y, z voxels
SPACING = (0.8, 1.3, 2.1)  # anisotropic, mm
ORIGIN = (-5.0, 3.0, 7.0)
INNER = (slice(2, -2),) * 3  # ANTs' derivative filter treats the outer two voxel layers differently from ITK's


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = _rotation(0.3, -0.2, 0.5)  # direction cosines, columns = image axes in LPS


def _grid(direction: np.ndarray) -> sitk.Image:
    img = sitk.Image(SIZE, sitk.sitkFloat32)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(direction.flatten().tolist())
    return img


def _points(grid: sitk.Image) -> np.ndarray:
    """Physical LPS points (mm) of every voxel centre, array shape ``(z, y, x, 3)``."""
    zyx = np.meshgrid(*[np.arange(n, dtype=float) for n in grid.GetSize()[::-1]], indexing="ij")
    index = np.stack(zyx[::-1], axis=-1)  # (z, y, x, [i, j, k])
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    return (index * grid.GetSpacing()) @ direction.T + grid.GetOrigin()


def _field(grid: sitk.Image, values: np.ndarray) -> sitk.Image:
    field = sitk.GetImageFromArray(values.astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    return field


def _smooth_field(grid: sitk.Image, amplitude: float = 2.0) -> sitk.Image:
    """A smooth nonlinear displacement (mm) of the physical coordinates (sines and cosines)."""
    p = _points(grid)
    q = (p - p.reshape(-1, 3).mean(axis=0)) / 8.0
    u = amplitude * np.stack(
        [np.sin(q[..., 1] + 0.5 * q[..., 2]), np.cos(q[..., 0]) * q[..., 2], np.sin(q[..., 0] - q[..., 1])], axis=-1
    )
    return _field(grid, u)


def _quadratic_field(grid: sitk.Image, strength: float) -> tuple[sitk.Image, np.ndarray]:
    """A displacement (mm) quadratic in the physical coordinates, and its exact ``det(I + ∂u/∂x)``, ``(z, y, x)``.

    Along any index axis of any grid it is a quadratic, so ITK's 3-point and ANTs' 5-point central differences
    are both exact inside: the references must agree with ours to rounding. ``strength`` 1 folds a third of the grid."""
    p = _points(grid)
    length = 10.0  # mm
    qx, qy, qz = np.moveaxis((p - p.reshape(-1, 3).mean(axis=0)) / length, -1, 0)
    u = strength * length * np.stack([qy**2 + 0.5 * qx * qz, qx**2 - qy * qz, 0.5 * qz**2 + qx * qy], axis=-1)
    grad = np.stack(  # rows: components of u; columns: ∂/∂x, ∂/∂y, ∂/∂z (physical)
        [
            np.stack([0.5 * qz, 2 * qy, 0.5 * qx], axis=-1),
            np.stack([2 * qx, -qz, -qy], axis=-1),
            np.stack([qy, qx, qz], axis=-1),
        ],
        axis=-2,
    )
    return _field(grid, u), np.linalg.det(np.eye(3) + strength * grad)


def _ants_jacobian(path, *, log: bool = False) -> np.ndarray:
    """ANTs' ``CreateJacobianDeterminantImage`` (through ANTsPy) of a written warp, as a ``(z, y, x)`` array."""
    ants = pytest.importorskip("ants")
    domain = ants.from_numpy(np.zeros(SIZE, np.float32), origin=list(ORIGIN), spacing=list(SPACING), direction=OBLIQUE)
    return ants.create_jacobian_determinant_image(domain, str(path), do_log=log).numpy().transpose(2, 1, 0)


def _written_and_read(img: sitk.Image, path) -> sitk.Image:
    sitk.WriteImage(img, str(path), useCompression=True)
    return sitk.ReadImage(str(path))


def _itk_reference(field: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field, True))


def _point_jacobian(tx: sitk.Transform, point: np.ndarray, step: float = 0.25) -> np.ndarray:
    """``∂T/∂x`` at a physical point by central differences of ITK's ``TransformPoint`` (step in mm), 3×3."""
    columns = []
    for e in np.eye(3):
        ahead, behind = tx.TransformPoint((point + step * e).tolist()), tx.TransformPoint((point - step * e).tolist())
        columns.append(np.subtract(ahead, behind) / (2 * step))
    return np.stack(columns, axis=1)


def test_axis_aligned_map_equals_simpleitk_filter_everywhere(tmp_path):
    """Identity direction, anisotropic spacing: our file equals ITK's filter on the same field at every voxel,
    the boundary layer included (float32 storage the only difference)."""
    grid = _grid(np.eye(3))
    field = _written_and_read(sitk.Cast(_smooth_field(grid), sitk.sitkVectorFloat32), tmp_path / "warp.nii.gz")
    out = evaluate.jacobian_output(grid, np.eye(3), field, include_linear=False)
    back = _written_and_read(out, tmp_path / "jacobian.nii.gz")
    assert back.GetPixelID() == sitk.sitkFloat32 and back.GetSize() == grid.GetSize()
    ref = _itk_reference(sitk.Cast(field, sitk.sitkVectorFloat64))
    ours = sitk.GetArrayFromImage(back)
    assert np.ptp(ours) > 0.1  # a real deformation, not the identity
    assert np.abs(ours - ref).max() < 1e-6


def test_oblique_map_matches_the_exact_jacobian_and_ants(tmp_path):
    """Oblique anisotropic grid, a quadratic field written as warp.nii.gz: our map equals the exact determinant
    and ANTs' CreateJacobianDeterminantImage (which honours direction cosines) inside, and SimpleITK's filter
    on the field re-expressed along the image axes everywhere."""
    grid = _grid(OBLIQUE)
    warp = tmp_path / "warp.nii.gz"
    quadratic, exact = _quadratic_field(grid, strength=0.1)
    transforms.write_field(quadratic, warp)
    field = transforms.read_field(warp)
    ours = sitk.GetArrayFromImage(evaluate.jacobian_output(grid, np.eye(3), field, include_linear=False))
    assert np.abs(ours - exact)[(slice(1, -1),) * 3].max() < 1e-5  # one-voxel boundary: zero-flux differences
    assert np.abs(ours[INNER] - _ants_jacobian(warp)[INNER]).max() < 1e-5
    # SimpleITK's filter on the same vectors expressed along the image axes (Dᵀu; det is invariant) agrees
    # everywhere; applied to the vectors as they are (derivatives along index axes, direction ignored) it is wrong
    along_axes = sitk.GetImageFromArray(sitk.GetArrayFromImage(field).astype(np.float64) @ OBLIQUE, isVector=True)
    along_axes.SetSpacing(SPACING)
    assert np.abs(_itk_reference(along_axes) - ours).max() < 1e-6
    blind = _itk_reference(sitk.Cast(field, sitk.sitkVectorFloat64))
    assert np.abs(blind[INNER] - ours[INNER]).max() > 1e-2


def test_smooth_field_differs_from_ants_by_its_finer_stencil_only(tmp_path):
    """On a field that is not quadratic, ANTs' 5-point differences and ITK's 3-point ones (ours, and the QC
    metric's) part by the truncation error alone, well below the map's own variation."""
    grid = _grid(OBLIQUE)
    warp = tmp_path / "warp.nii.gz"
    transforms.write_field(_smooth_field(grid), warp)
    ours = sitk.GetArrayFromImage(evaluate.jacobian_output(grid, np.eye(3), transforms.read_field(warp)))
    theirs = _ants_jacobian(warp)
    assert np.abs(ours[INNER] - theirs[INNER]).max() < 2e-3 < 0.05 < np.ptp(ours[INNER])


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["axis_aligned", "oblique"])
def test_full_map_is_the_jacobian_of_the_chain_itk_reads_from_our_files(tmp_path, direction):
    """affine.mat + warp.nii.gz written by maskreg, read back as ITK's composite transform: central differences
    of ITK's ``TransformPoint`` in physical space give the determinant our file holds, det(A)·det(I + B) for
    the affine displacement u(x) = B(x - c)."""
    grid = _grid(direction)
    b = np.array([[0.10, 0.05, -0.02], [0.03, -0.08, 0.04], [-0.06, 0.02, 0.15]])
    p = _points(grid)
    linear = transforms.LinearTransform(np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.2]]), [1, -2, 3])
    transforms.write_linear(linear, tmp_path / "affine.mat")
    transforms.write_field(_field(grid, (p - p.reshape(-1, 3).mean(axis=0)) @ b.T), tmp_path / "warp.nii.gz")
    lin, field, chain = transforms.read_chain(tmp_path / "affine.mat", tmp_path / "warp.nii.gz")
    out = _written_and_read(evaluate.jacobian_output(grid, lin.matrix, field), tmp_path / "jacobian.nii.gz")
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(out, get)(), getattr(grid, get)(), atol=1e-5), get
    det = sitk.GetArrayFromImage(out)
    expected = np.linalg.det(linear.matrix) * np.linalg.det(np.eye(3) + b)
    assert np.abs(det[(slice(1, -1),) * 3] - expected).max() < 1e-5  # zero-flux differences on the boundary
    rng = np.random.default_rng(0)
    for z, y, x in rng.integers(2, np.array(SIZE[::-1]) - 2, size=(5, 3)):
        assert abs(np.linalg.det(_point_jacobian(chain, p[z, y, x])) - det[z, y, x]) < 1e-4


def test_linear_only_subject_gets_a_constant_map_and_the_log_floor_of_ants(tmp_path):
    grid = _grid(OBLIQUE)
    a = np.diag([1.2, 0.9, 1.1])
    const = sitk.GetArrayFromImage(_written_and_read(evaluate.jacobian_output(grid, a), tmp_path / "j.nii.gz"))
    assert const.shape == SIZE[::-1] and np.allclose(const, np.linalg.det(a), atol=1e-6)
    assert np.allclose(sitk.GetArrayFromImage(evaluate.jacobian_output(grid, a, include_linear=False)), 1.0)
    logged = sitk.GetArrayFromImage(evaluate.jacobian_output(grid, a, log=True))
    assert np.allclose(logged, np.log(np.linalg.det(a)), atol=1e-6)
    mirror = sitk.GetArrayFromImage(evaluate.jacobian_output(grid, np.diag([-1.0, 1.0, 1.0]), log=True))
    assert np.allclose(mirror, np.log(1e-3), atol=1e-6)


def test_log_map_of_a_folding_field_matches_ants_log_jacobian(tmp_path):
    """A field that folds: the plain map keeps det ≤ 0 (the QC folding figure counts them), the log map floors
    det at 0.001 as ``CreateJacobianDeterminantImage ... doLog=1`` does and equals ANTs' log map inside."""
    grid = _grid(OBLIQUE)
    warp = tmp_path / "warp.nii.gz"
    quadratic, exact = _quadratic_field(grid, strength=1.0)
    transforms.write_field(quadratic, warp)
    field = transforms.read_field(warp)
    plain = evaluate.jacobian_output(grid, np.eye(3), field)
    assert 0.01 < metrics.jacobian_stats(plain)["jacobian_nonpositive_fraction"] < 0.9
    assert np.array_equal(sitk.GetArrayFromImage(plain)[INNER] <= 0, exact[INNER] <= 0)
    ours = sitk.GetArrayFromImage(evaluate.jacobian_output(grid, np.eye(3), field, log=True))
    assert np.allclose(ours, np.log(np.maximum(sitk.GetArrayFromImage(plain), 1e-3)), atol=1e-5)
    assert np.abs(ours[INNER] - _ants_jacobian(warp, log=True)[INNER]).max() < 1e-4


def test_full_map_reuses_the_qc_map_and_rejects_a_field_off_the_fixed_grid():
    grid = _grid(OBLIQUE)
    field = _smooth_field(grid)
    a = np.diag([1.1, 1.0, 0.8])
    full = metrics.jacobian_map(grid, a, field)
    deformable = metrics.jacobian_map(grid, a, field, include_linear=False)
    assert np.allclose(sitk.GetArrayFromImage(full), np.linalg.det(a) * sitk.GetArrayFromImage(deformable))
    reused = evaluate.jacobian_output(grid, a, field, full=full)
    assert np.allclose(sitk.GetArrayFromImage(reused), sitk.GetArrayFromImage(full), atol=1e-6)
    moved = sitk.Image(grid)
    moved.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="different geometry"):
        metrics.jacobian_map(moved, a, field)


def test_composite_h5_applies_like_the_separate_files(tmp_path):
    """One .h5 holding affine and field: ITK reading it maps points and resamples images as the two files do."""
    grid = _grid(OBLIQUE)
    linear = transforms.LinearTransform(_rotation(0.05, 0.0, -0.1) * 1.05, [2.0, -1.0, 0.5], center=[1.0, 2.0, 3.0])
    transforms.write_linear(linear, tmp_path / "affine.mat")
    transforms.write_field(_smooth_field(grid), tmp_path / "warp.nii.gz")
    lin, field, chain = transforms.read_chain(tmp_path / "affine.mat", tmp_path / "warp.nii.gz")
    transforms.write_composite(lin, field, tmp_path / "composite.h5")
    single = sitk.ReadTransform(str(tmp_path / "composite.h5"))
    assert single.GetName() == "CompositeTransform"
    pts = _points(grid).reshape(-1, 3)[::37]
    a = np.array([single.TransformPoint(q.tolist()) for q in pts])
    b = np.array([chain.TransformPoint(q.tolist()) for q in pts])
    assert np.abs(a - b).max() < 1e-9
    moving = sitk.Cast(sitk.GetImageFromArray(np.random.default_rng(1).random(SIZE[::-1])), sitk.sitkFloat32)
    moving.SetSpacing((1.0, 1.1, 1.7))
    moving.SetOrigin((-6.0, 1.0, 5.0))
    one = sitk.GetArrayFromImage(sitk.Resample(moving, grid, single, sitk.sitkLinear, 0.0))
    two = sitk.GetArrayFromImage(sitk.Resample(moving, grid, chain, sitk.sitkLinear, 0.0))
    assert np.abs(one).max() > 0 and np.array_equal(one, two)
    with pytest.raises(ValueError, match=".h5"):
        transforms.write_composite(lin, field, tmp_path / "composite.mat")
