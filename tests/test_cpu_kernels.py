"""The compiled CPU kernels (maskreg.engine.cpu_kernels) compute what the torch operators they replace compute: on
odd, anisotropic shapes, 2D and 3D, points outside the image, thin slabs, and whatever the thread count."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels, losses, pyramid
from maskreg.engine.fields import FieldOps
from maskreg.engine.grid import Grid
from maskreg.engine.sampling import inside

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(torch.zeros(1)), reason="numba kernels not available")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = max(float(b.abs().max()), 1e-12)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_sample_matches_grid_sample_with_points_outside(padding):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 14, 5)  # two batch items, three channels, an axis of 5
    g = torch.rand(2, 6, 7, 4, 3) * 2.6 - 1.3  # a third of the points outside on some axis
    out, ins = cpu_kernels.sample(x, g, padding, with_inside=True)
    _close(out, F.grid_sample(x, g, padding_mode=padding, align_corners=True))
    assert torch.equal(ins, inside(g))
    assert 0 < float(ins.mean()) < 1
    # one image sampled at two grids (the batch of the grid wins), and a point list layout
    _close(
        cpu_kernels.sample(x[:1], g, padding)[0],
        F.grid_sample(x[:1].expand(2, -1, -1, -1, -1), g, padding_mode=padding, align_corners=True),
    )
    pts = torch.rand(1, 1001, 1, 1, 3) * 2 - 1
    _close(
        cpu_kernels.sample(x[:1], pts, padding)[0], F.grid_sample(x[:1], pts, padding_mode=padding, align_corners=True)
    )


def test_sample_exact_at_voxel_centres_and_zero_beyond_one_voxel():
    x = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    ident = F.affine_grid(torch.eye(3, 4)[None], [1, 1, 4, 5, 6], align_corners=True)
    _close(cpu_kernels.sample(x, ident)[0], x, 1e-6)
    far = torch.full((1, 1, 1, 1, 3), 1.0 + 2.0 / 5 + 1e-3)  # more than one voxel past the last centre
    assert float(cpu_kernels.sample(x, far)[0]) == 0.0


@pytest.mark.parametrize("shape", [(1, 2, 11, 8, 13), (1, 3, 17, 9), (2, 1, 1, 6, 7)])
@pytest.mark.parametrize("sigma", [0.5, 1.5, 4.0])
def test_filter_axis_matches_shifted_sums(shape, sigma):
    torch.manual_seed(1)
    x = torch.randn(shape)
    k = pyramid.gaussian_weights(sigma)
    for axis in range(len(shape) - 2):
        kk = k
        if len(kk) > 2 * shape[2 + axis] - 1:  # as gaussian_blur trims it
            r, c = shape[2 + axis] - 1, len(kk) // 2
            kk = kk[c - r : c + r + 1]
        got = cpu_kernels.filter_axis(x, kk, axis)
        with cpu_kernels.switched(False):
            ref = pyramid.filter_axis(x, kk, axis)
        _close(got, ref)


@pytest.mark.parametrize(
    "shape,sigmas",
    [
        ((1, 3, 20, 17, 15), (1.5, 1.5, 1.5)),
        ((1, 2, 3, 17, 15), (0.5, 2.0, 1.0)),
        ((1, 1, 1, 9, 30), (0.0, 1.5, 0.0)),
        ((1, 3, 40, 6, 2), (4.0, 4.0, 4.0)),
        ((1, 2, 12, 11, 10), (0.0, 1.5, 0.0)),
    ],
    ids=["3 channels", "thin slab", "one plane", "kernels trimmed", "2 channels, one axis"],
)
def test_streamed_filter_matches_one_axis_at_a_time(shape, sigmas):
    """The streamed filter under the SyN step (all axes in one pass, channels together, with the longest
    vector), through cpu_kernels.smooth_step with an identity elastic kernel on a zero field, so the step is
    ``step · G * (-gradient) / max|G * (-gradient)|``: against pyramid.gaussian_blur's axis-by-axis filters, zero
    padding, kernels longer than an axis trimmed, a sigma of 0 leaving its axis alone, one plane; the longest
    vector it returns and scales by is right; whatever the thread count."""
    torch.manual_seed(5)
    x = torch.randn(shape)
    ref = pyramid.gaussian_blur(x, sigmas)
    longest = float(ref.pow(2).sum(1).max().sqrt())
    kernels = pyramid.gaussian_kernels(shape[2:], sigmas)
    identity = ((1.0,),) * 3
    step, inv_spacing = 1.7, 0.8
    before = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            field = torch.zeros(shape)
            vmax = cpu_kernels.smooth_step(field, -x, kernels, identity, step, inv_spacing)
            got.append(field)
            # the new field's longest vector: ``step`` voxels, in mm (the field's unit) over ``inv_spacing``
            assert vmax == pytest.approx(float(field.pow(2).sum(1).max().sqrt()) * inv_spacing, rel=1e-5)
    finally:
        torch.set_num_threads(before)
    _close(got[0] * (longest * inv_spacing / step), ref)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("fluid,elastic", [(1.5, 0.5), (0.0, 1.0), (2.0, 0.0)])
def test_smooth_step_is_the_syn_update(fluid, elastic):
    """FieldOps.update's compiled SyN path (cpu_kernels.smooth_step) against its torch path and the formula:
    d = G_fluid * (-g) scaled to a longest vector of ``step`` voxels, field = G_elastic * (field + d), and the new
    longest vector in voxels of the finest spacing; on an oblique, anisotropic grid, whatever the thread count."""
    torch.manual_seed(6)
    shape = (1, 3, 23, 18, 15)
    g, field = torch.randn(shape), 3 * torch.randn(shape)
    c, s_ = np.cos(0.3), np.sin(0.3)
    grid = Grid((15, 18, 23), (1.2, 0.8, 2.0), (4.0, -2.0, 9.0), (c, -s_, 0.0, s_, c, 0.0, 0.0, 0.0, 1.0))
    ops = FieldOps(grid, torch.device("cpu"))
    step = torch.tensor([1.5])
    with cpu_kernels.switched(False):
        d = pyramid.gaussian_blur(-g, (fluid,) * 3)
        d = d * (1.5 / float(d.pow(2).sum(1).max().sqrt() / 0.8))
        formula = pyramid.gaussian_blur(field + d, (elastic,) * 3)
        ref, ref_max = field.clone(), torch.zeros(())
        ops.update(ref, g, step, fluid, elastic, True, ref_max)
    _close(ref, formula)
    assert float(ref_max) == pytest.approx(float(formula.pow(2).sum(1).max().sqrt() / 0.8), rel=1e-5)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            buf, vmax = field.clone(), torch.zeros(())
            ops.update(buf, g, step, fluid, elastic, True, vmax)
            outs.append(buf)
            _close(buf, ref)
            assert float(vmax) == pytest.approx(float(ref_max), rel=1e-5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_gated_smooth_step_is_the_gated_syn_update():
    """With a fold gate (jacobian_floor), the compiled SyN update equals the torch one and the formula: the
    scaled step is multiplied by the gate before the elastic blur (the longest-vector scale is the ungated
    step's, so the gate only takes away); on an oblique, anisotropic grid. On a box with open faces, a gate of
    ones is no gate on either path."""
    torch.manual_seed(8)
    shape = (1, 3, 21, 17, 14)
    g, field = torch.randn(shape), 2 * torch.randn(shape)
    gate = torch.rand(1, 1, *shape[2:])
    gate[..., :7] = 0.0
    c, s_ = np.cos(0.4), np.sin(0.4)
    grid = Grid((14, 17, 21), (1.1, 0.9, 1.7), (1.0, 2.0, -3.0), (c, 0.0, -s_, 0.0, 1.0, 0.0, s_, 0.0, c))
    step = torch.tensor([1.2])

    def update(ops, kernels, gate):
        with cpu_kernels.switched(kernels):
            buf, vmax = field.clone(), torch.zeros(())
            ops.update(buf, g, step, 1.5, 0.5, True, vmax, gate)
        return buf, float(vmax)

    ops = FieldOps(grid, torch.device("cpu"))
    (ref, ref_max), (got, got_max) = update(ops, False, gate), update(ops, True, gate)
    with cpu_kernels.switched(False):
        d = ops.smooth(-g, 1.5)
        d = d * (1.2 / float(d.pow(2).sum(1).max().sqrt() / 0.9))
        formula = ops.smooth(field + d * gate, 0.5)
    _close(ref, formula)
    _close(got, formula)
    assert got_max == pytest.approx(ref_max, rel=1e-5)
    assert float((update(ops, True, None)[0] - got).abs().max()) > 0.1  # the gate does change the update
    box = FieldOps(grid, torch.device("cpu"), open_faces=((True, False), (False, True), (True, True)))
    for kernels in (False, True):
        assert torch.equal(update(box, kernels, torch.ones_like(gate))[0], update(box, kernels, None)[0])


@pytest.mark.parametrize("size", [(17, 23, 13), (5, 6, 4), (9, 30, 3), (1, 30, 3), (9, 12, 7)])
def test_resize_matches_trilinear_interpolate(size):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 9, 12, 7)
    x0 = x.clone()
    out = cpu_kernels.resize(x, size)
    _close(out, F.interpolate(x, size=size, mode="trilinear", align_corners=True))
    out.add_(1.0)  # a new tensor whatever the size, (9, 12, 7) = the input's included: the input is untouched
    assert torch.equal(x, x0)
    x2 = torch.randn(1, 2, 9, 12)
    _close(cpu_kernels.resize(x2, size[1:]), F.interpolate(x2, size=size[1:], mode="bilinear", align_corners=True))


@pytest.mark.parametrize(
    "shape,window", [((1, 1, 20, 17, 15), 5), ((1, 1, 3, 17, 15), 5), ((1, 1, 21, 19), 7), ((1, 1, 12, 11, 10), 3)]
)
def test_local_cc_value_and_both_gradients_match_autograd(shape, window):
    torch.manual_seed(3)
    f = torch.rand(shape)
    m = 0.6 * f + 0.4 * torch.rand(shape)
    w = (torch.rand(shape) > 0.3).float() * torch.rand(shape)  # soft weights with holes
    ff, mm = f.clone().requires_grad_(), m.clone().requires_grad_()
    loss = losses.local_cc(ff, mm, w, window)  # the compiled path (CPU, kernels on)
    gf, gm = torch.autograd.grad(loss, [ff, mm])
    fa, ma = f.clone().requires_grad_(), m.clone().requires_grad_()
    ref = losses.local_cc_autograd(fa, ma, w, window)
    rf, rm = torch.autograd.grad(ref, [fa, ma])
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5
    _close(gf, rf, 1e-4)
    _close(gm, rm, 1e-4)
    # only the moving side asked for: the same moving gradient
    mm2 = m.clone().requires_grad_()
    _close(torch.autograd.grad(losses.local_cc(f, mm2, w, window), mm2)[0], rm, 1e-4)


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(4)
    f, m = torch.rand(1, 1, 30, 25, 20), torch.rand(1, 1, 30, 25, 20)
    w = torch.ones_like(f)
    g = torch.rand(1, 30, 25, 20, 3) * 2 - 1
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            cc = cpu_kernels.LocalCC(f, m, w, [5, 5, 5], losses.EPS, losses.CC_EPS)
            value = cc.loss(True, True)
            hist = cpu_kernels.parzen_histogram(f, m, w, 32)
            outs.append(
                (
                    value,
                    *cc.gradients(),
                    cpu_kernels.sample(f, g)[0],
                    cpu_kernels.filter_axis(f, pyramid.gaussian_weights(1.5), 1),
                    hist,
                    cpu_kernels.parzen_gradient(f, m, w, torch.log(hist + 1.0), 32, 1.0),
                )
            )
    finally:
        torch.set_num_threads(before)
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1:], outs[1][1:], strict=False):
        assert torch.equal(a, b)


def _gomp_spin_count(code: str, **env: str) -> str | None:
    """GOMP_SPINCOUNT as torch's libgomp read it at start-up (its OMP_DISPLAY_ENV=VERBOSE report), after
    running ``code`` in a fresh interpreter; None where torch's OpenMP is not libgomp."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
    )
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    return found.group(1) if found else None


@pytest.mark.slow
def test_importing_maskreg_first_makes_openmp_threads_sleep_unless_the_user_chose():
    """Spinning OpenMP threads took the CPU a straggling thread needed when another process shared the cores
    (the 2 mm brain pair: 4.8 s spinning, 3.1 s sleeping, 1.7 s alone); maskreg asks libgomp to sleep."""
    default = _gomp_spin_count("import torch; torch.ones(1 << 20).sum()")
    if default is None:
        pytest.skip("torch's OpenMP runtime is not libgomp (nothing reports its spin count)")
    assert default != "0"  # libgomp's own default spins
    assert _gomp_spin_count("import maskreg, torch; torch.ones(1 << 20).sum()") == "0"
    assert _gomp_spin_count("import maskreg, torch", OMP_WAIT_POLICY="ACTIVE") not in ("0", default)


def test_a_newer_local_cc_invalidates_the_older_ones_statistics():
    f = torch.rand(1, 1, 8, 9, 10)
    first = cpu_kernels.LocalCC(f, f, torch.ones_like(f), [3, 3, 3], losses.EPS, losses.CC_EPS)
    first.loss(False, True)
    second = cpu_kernels.LocalCC(f, f.flip(-1), torch.ones_like(f), [3, 3, 3], losses.EPS, losses.CC_EPS)
    second.loss(False, True)
    with pytest.raises(RuntimeError, match="newer LocalCC"):
        first.gradients()
    assert second.gradients()[1] is not None


def test_kernels_off_by_environment_or_switch():
    """MASKREG_CPU_KERNELS=0 turns the kernels off for a process (read once, at first use); ``switched`` turns
    them off or on within a block, whatever the variable says, and restores the choice after."""
    code = "from maskreg.engine import cpu_kernels; print(cpu_kernels.available())"
    for value, expect in (("0", "False"), ("1", "True")):
        env = {**os.environ, "MASKREG_CPU_KERNELS": value}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == expect, (value, proc.stdout)
    with cpu_kernels.switched(False):
        assert not cpu_kernels.available() and not cpu_kernels.enabled(torch.zeros(1))
        with cpu_kernels.switched(True):
            assert cpu_kernels.enabled(torch.zeros(1))
        assert not cpu_kernels.enabled(torch.zeros(1))
    assert cpu_kernels.available() and cpu_kernels.enabled(torch.zeros(1))
    assert not cpu_kernels.enabled(torch.zeros(1, requires_grad=True))
    assert not cpu_kernels.enabled(torch.zeros(1, dtype=torch.float64))


def _oblique_grid():
    from maskreg.engine.grid import Grid

    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s * 0.9, c * 0.9, -0.43589], [s * 0.43589, c * 0.43589, 0.9]])
    q, _ = np.linalg.qr(direction)  # orthonormal, oblique on every axis
    return Grid((13, 11, 9), (1.2, 0.8, 2.5), (3.0, -7.0, 11.0), tuple(q.flatten()))


def _smooth_field(shape, amp, seed):
    torch.manual_seed(seed)
    return pyramid.gaussian_blur(torch.randn(1, 3, *shape) * amp, (2.0, 2.0, 2.0))


def test_sample_mapped_equals_grid_sample_on_affine_grid_plus_field():
    from maskreg.engine import fields as dfm

    grid = _oblique_grid()
    ops = dfm.FieldOps(grid, torch.device("cpu"))
    torch.manual_seed(5)
    img = torch.rand(1, 2, 10, 14, 12)
    a = np.array([[0.15, 0.02, -0.01, -0.9], [0.01, 0.17, 0.03, -0.8], [-0.02, 0.01, 0.24, -1.05]])
    m = np.array([[0.10, 0.01, 0.0], [0.0, 0.09, -0.02], [0.01, 0.0, 0.12]])
    u = _smooth_field(grid.shape, 20.0, 6)
    theta = torch.as_tensor(a @ np.linalg.inv(_index_to_normalised(grid)), dtype=torch.float32)[None, :3]
    g = F.affine_grid(theta, [1, 1, *grid.shape], align_corners=True) + ops.offsets(u, m)
    out, weight = cpu_kernels.sample_mapped(img, a, m, u)
    ref = F.grid_sample(img, g, align_corners=True)
    _close(out, ref, 1e-5)
    ins = inside(g)
    assert 0 < float(ins.mean()) < 1
    _close(weight, ref[:, 1:2] * ins, 1e-5)  # the mask channel where the point is inside
    assert torch.equal(weight == 0, (ins == 0) | (out[:, 1:2] == 0))
    prior = torch.rand(1, 1, *grid.shape)
    out2, weight2 = cpu_kernels.sample_mapped(img, a, m, u, prior=prior)
    assert torch.equal(out2, out)
    _close(weight2, ref[:, 1:2] * ins * prior, 1e-5)


def _index_to_normalised(grid) -> np.ndarray:
    n = np.asarray(grid.size, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(2.0 / (n - 1))
    m[:3, 3] = -1.0
    return m


def test_compose_matches_sampling_on_an_oblique_anisotropic_grid():
    from maskreg.engine import fields as dfm

    grid = _oblique_grid()
    ops = dfm.FieldOps(grid, torch.device("cpu"))
    u = torch.cat([_smooth_field(grid.shape, 15.0, 7), _smooth_field(grid.shape, 15.0, 8)])
    v = torch.cat([_smooth_field(grid.shape, 15.0, 9), _smooth_field(grid.shape, 15.0, 10)])
    ref = v + F.grid_sample(u, ops.identity + ops.offsets(v), padding_mode="border", align_corners=True)
    _close(cpu_kernels.compose(u, v, ops.to_index), ref, 1e-5)
    assert float((ref - v).abs().max()) > 0.1  # the fields moved things


def test_gradient_product_matches_torch_gradient_in_physical_space():
    from maskreg.engine import fields as dfm

    grid = _oblique_grid()
    ops = dfm.FieldOps(grid, torch.device("cpu"))
    torch.manual_seed(11)
    s, dl = torch.rand(1, 1, *grid.shape), torch.randn(1, 1, *grid.shape)
    out = torch.ones(1, 3, *grid.shape)
    cpu_kernels.add_gradient_product(out, s, dl, ops.index_to_physical_gradient, -0.5)
    _close(out, 1.0 - 0.5 * dl * ops.spatial_gradient(s), 1e-5)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_resample_between_oblique_grids_matches_the_affine_grid_path(padding):
    """pyramid.resample's compiled path (no sampling grid stored) against affine_grid + grid_sample, two fields
    at once, between an oblique anisotropic grid and an axis-aligned one through a rigid map."""
    from maskreg.engine.grid import Grid

    src = _oblique_grid()
    dst = Grid((15, 12, 8), (1.0, 1.1, 1.7), (-2.0, -9.0, 9.0), tuple(np.eye(3).flatten()))
    rot = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rot, (2.0, -3.0, 1.0)
    t = torch.cat([_smooth_field(src.shape, 9.0, 11), _smooth_field(src.shape, 9.0, 12)])
    got = pyramid.resample(t, src, dst, m, padding_mode=padding)
    with cpu_kernels.switched(False):
        ref = pyramid.resample(t, src, dst, m, padding_mode=padding)
    _close(got, ref, 1e-5)
    assert got.shape == (2, 3, *dst.shape) and not torch.equal(got[0], got[1])
    zeros = (got == 0).all(1).float().mean()  # part of dst lies outside src: zero padding leaves it 0
    assert (float(zeros) > 0.05) == (padding == "zeros")


def test_jacobian_determinant_kernel_matches_torch_on_an_oblique_grid(monkeypatch):
    from maskreg.engine import fields as dfm

    grid = _oblique_grid()
    ops = dfm.FieldOps(grid, torch.device("cpu"))
    u = _smooth_field(grid.shape, 25.0, 13)
    got = dfm.jacobian_determinant(u, ops)
    ref = dfm.jacobian_determinant(u.double(), ops)  # float64: the torch path
    _close(got, ref.float(), 1e-5)
    assert float(ref.min()) < 0.9 and float(ref.max()) > 1.1  # the field stretches and shrinks


@pytest.mark.parametrize("name", ["mi", "nmi"])
@pytest.mark.parametrize("bins", [16, 32])
def test_compiled_parzen_histogram_losses_match_the_torch_path(name, bins):
    """Float32 points take the compiled histogram and gradient passes; float64 the torch operators: the same loss
    and gradient (values outside [0, 1], partial weights, fixed values on bin boundaries)."""
    g = torch.Generator().manual_seed(bins)
    n = 20001
    fixed = torch.rand(1, 1, n, generator=g, dtype=torch.float64)
    fixed[0, 0, :50] = (torch.arange(50, dtype=torch.float64) % (bins - 4)) / (bins - 5)  # exact bin centres
    moving = torch.rand(1, 1, n, generator=g, dtype=torch.float64) * 1.2 - 0.1
    weight = torch.rand(1, 1, n, generator=g, dtype=torch.float64) * (torch.rand(1, 1, n, generator=g) > 0.2)
    fn = losses.VALUE_AND_GRAD[name]
    ref_v, ref_g = fn(fixed, moving, weight, bins=bins)
    got_v, got_g = fn(fixed.float(), moving.float(), weight.float(), bins=bins)
    # the value is a difference of entropies of ~3 nats: float32 resolves it to ~1e-6
    assert float(got_v) == pytest.approx(float(ref_v), abs=2e-6)
    _close(got_g, ref_g.float(), 1e-4)
    assert float((got_g == 0).float().mean()) > 0.1  # the clamped values have no gradient
    # the compiled histogram: unnormalised (each point adds its weight), otherwise the torch path's joint histogram
    h_got = cpu_kernels.parzen_histogram(fixed.float(), moving.float(), weight.float(), bins)
    assert float(h_got.sum()) == pytest.approx(float(weight.sum()), rel=1e-5)
    h_ref = losses.joint_histogram(fixed, moving, weight, bins)
    _close((h_got / h_got.sum()).reshape(bins, bins), h_ref.float(), 1e-5)
