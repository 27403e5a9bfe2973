"""The CUDA path gives the CPU path's answers. Skipped where torch sees no CUDA device (CI); run on a GPU
machine with ``pytest tests/test_cuda.py``.

Every pair is 3D, anisotropic and oblique, so a device-dependent slip in the geometry (an axis swapped in the
sampling grid, the direction cosines applied on one device only) would show as a disagreement in mm.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import maskreg
from maskreg.engine import pick_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SPACING = (1.5, 1.1, 2.0)  # x, y, z mm


def oblique_pair(make_image, seed: int = 0, shape=(40, 56, 48)):
    """Smooth random blobs on an oblique, anisotropic grid (z, y, x = ``shape``); the moving image is the fixed
    one resampled through a known affine. Mask: an ellipsoid inside the field of view."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    a = (a - a.min()) / (a.max() - a.min()) * 100
    zz, yy, xx = np.indices(shape, dtype=float)
    c = (np.array(shape) - 1) / 2
    roi = (
        ((zz - c[0]) / (0.4 * shape[0])) ** 2
        + ((yy - c[1]) / (0.4 * shape[1])) ** 2
        + ((xx - c[2]) / (0.4 * shape[2])) ** 2
    ) < 1
    rot = sitk.VersorTransform((0.2, -0.4, 1.0), 0.35)  # oblique direction cosines
    fixed = make_image(a * (0.3 + 0.7 * roi), SPACING, (-30.0, 12.0, 5.0), rot.GetMatrix(), dtype=np.float32)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
    truth = sitk.AffineTransform(3)
    truth.SetCenter(centre)
    truth.SetMatrix((1.04, 0.03, 0.0, -0.02, 0.97, 0.04, 0.01, 0.0, 1.02))
    truth.SetTranslation((2.5, -1.8, 1.2))
    moving = sitk.Resample(fixed, fixed, truth, sitk.sitkLinear, 0.0)  # moving(x) = fixed(truth(x))
    mask = make_image(roi, dtype=np.uint8, like=fixed)
    return fixed, moving, mask


LINEAR = [
    {"type": "moments"},
    {"type": "rigid", "loss": "mi", "scales": [2, 1], "iterations": [60, 30]},
    {"type": "affine", "loss": "mi", "scales": [2, 1], "iterations": [60, 30]},
]
SYN = LINEAR + [{"type": "syn", "loss": "cc", "window": 5, "scales": [2, 1], "iterations": [40, 20]}]


def mask_points(mask: sitk.Image, step: int = 3) -> np.ndarray:
    """Physical points (LPS mm) of every ``step``-th mask voxel, N x 3."""
    kji = np.argwhere(sitk.GetArrayViewFromImage(mask)[::step, ::step, ::step] > 0) * step
    return np.array([mask.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in kji])


def mapped(result, pts: np.ndarray) -> np.ndarray:
    tx = result.transform()
    return np.array([tx.TransformPoint(p.tolist()) for p in pts])


def test_auto_picks_cuda():
    assert pick_device("auto").type == "cuda"


def test_linear_cuda_matches_cpu(make_image):
    fixed, moving, mask = oblique_pair(make_image)
    cpu = maskreg.register(fixed, moving, mask, mask, stages=LINEAR, device="cpu")
    gpu = maskreg.register(fixed, moving, mask, mask, stages=LINEAR, device="cuda")
    assert gpu.device.startswith("cuda") and cpu.device == "cpu"
    pts = mask_points(mask)
    diff = np.linalg.norm(mapped(gpu, pts) - mapped(cpu, pts), axis=1)
    # same optimisation, different reduction order (float32 sums on the GPU): the maps agree to a small
    # fraction of a voxel (measured on an H100: see the closing note of the GPU session)
    assert diff.max() < 0.1, diff.max()


def test_syn_cuda_matches_cpu_and_stays_invertible(make_image):
    fixed, moving, mask = oblique_pair(make_image, seed=1)
    cpu = maskreg.register(fixed, moving, mask, mask, stages=SYN, device="cpu")
    gpu = maskreg.register(fixed, moving, mask, mask, stages=SYN, device="cuda")
    pts = mask_points(mask)
    diff = np.linalg.norm(mapped(gpu, pts) - mapped(cpu, pts), axis=1)
    # float32 sums in another order (and the GPU's atomic adds in grid_sample's backward) drift a few places
    # apart over ~100 iterations: measured on an H100, mean 0.008 mm, max 0.61 mm (voxels 1.1-2 mm)
    assert diff.mean() < 0.05 and np.percentile(diff, 99) < 0.3 and diff.max() < 1.0, (
        diff.mean(),
        np.percentile(diff, 99),
        diff.max(),
    )
    assert gpu.jacobian_nonpositive_fraction == 0.0
    # forward then inverse on the GPU's fields returns the fixed points (within the exp's accuracy)
    inv = sitk.DisplacementFieldTransform(sitk.Cast(gpu.inverse_displacement, sitk.sitkVectorFloat64))
    fwd = sitk.DisplacementFieldTransform(sitk.Cast(gpu.displacement, sitk.sitkVectorFloat64))
    back = np.array([inv.TransformPoint(fwd.TransformPoint(p.tolist())) for p in pts])
    assert np.linalg.norm(back - pts, axis=1).mean() < 0.1


def test_cuda_keeps_no_tensors_after_a_registration(make_image):
    """A cohort job registers subject after subject in one process (batched mode): nothing of one pair may
    stay on the GPU."""
    fixed, moving, mask = oblique_pair(make_image, seed=2)
    maskreg.register(fixed, moving, mask, mask, stages=SYN, device="cuda")  # warm-up: cuDNN/cuFFT handles
    gc.collect()
    before = torch.cuda.memory_allocated()
    res = maskreg.register(fixed, moving, mask, mask, stages=SYN, device="cuda")
    del res
    gc.collect()
    assert torch.cuda.memory_allocated() - before < 1 << 20, torch.cuda.memory_allocated() - before


@pytest.mark.parametrize("stages", [LINEAR, SYN], ids=["linear", "syn"])
def test_graph_replay_matches_eager_cuda(stages, monkeypatch, make_image):
    """Iterations replayed as CUDA graphs (the default on CUDA) compute what eager CUDA computes."""
    fixed, moving, mask = oblique_pair(make_image, seed=3)
    graphed = maskreg.register(fixed, moving, mask, mask, stages=stages, device="cuda")
    monkeypatch.setenv("MASKREG_CUDA_GRAPHS", "0")
    eager = maskreg.register(fixed, moving, mask, mask, stages=stages, device="cuda")
    assert [lv.iterations for s in graphed.stages for lv in s.levels] == [
        lv.iterations for s in eager.stages for lv in s.levels
    ]
    pts = mask_points(mask)
    diff = np.linalg.norm(mapped(graphed, pts) - mapped(eager, pts), axis=1)
    # the same kernels, but the atomic adds of grid_sample's backward sum in any order: run to run, eager or
    # graphed, the maps differ by this much (H100: mean 0.01 mm, max 0.09 mm for syn)
    assert diff.mean() < 0.02 and diff.max() < 0.3, (diff.mean(), diff.max())


@pytest.mark.parametrize("shape", [(1, 3, 17, 30, 23), (1, 2, 40, 9)], ids=["3d", "2d"])
def test_cuda_filters_match_cpu(shape):
    """On CUDA, Gaussian filters run as depthwise convolutions and local-CC box sums as average pooling; on
    the CPU both are sums of shifted views. They agree, also with a kernel longer than an axis (the 9-voxel
    axis) and a window shrunk on a thin axis (local CC's value and its gradient, which hold the box sums of every
    voxel; float64 on the CPU: the torch path, as on CUDA)."""
    from maskreg.engine.losses import local_cc
    from maskreg.engine.pyramid import gaussian_blur

    t = torch.randn(*shape)
    sig = (1.5,) * (len(shape) - 2)
    for cpu, gpu in (
        (gaussian_blur(t, sig), gaussian_blur(t.cuda(), sig)),
        (gaussian_blur(t, (4.0,) * len(sig)), gaussian_blur(t.cuda(), (4.0,) * len(sig))),
    ):
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-5), float((cpu - gpu.cpu()).abs().max())
    f, m = t[:, :1].double(), (0.6 * t[:, :1] + 0.4 * t[:, 1:2]).double()
    w = (torch.rand_like(f) > 0.3).double()
    for window in (5, 11):
        got = []
        for dev in ("cpu", "cuda"):
            mm = m.to(dev).requires_grad_(True)
            loss = local_cc(f.to(dev), mm, w.to(dev), window)
            got.append((float(loss.detach()), torch.autograd.grad(loss, [mm])[0].cpu()))
        (v_cpu, g_cpu), (v_gpu, g_gpu) = got
        assert v_cpu == pytest.approx(v_gpu, rel=1e-9), (window, v_cpu, v_gpu)
        assert g_cpu.abs().max() > 0
        assert torch.allclose(g_cpu, g_gpu, atol=1e-9 * float(g_cpu.abs().max())), window


def test_cuda_filter_weights_made_during_a_capture_fall_back():
    """A convolution weight cannot be copied to the GPU while a CUDA graph is captured: the filter then
    falls back to shifted views for that call, so the capture succeeds, and the replays give the eager result
    (a copy attempted during the capture would have failed it)."""
    from maskreg.engine.pyramid import gaussian_blur
    from maskreg.engine.stepper import Stepper

    t = torch.randn(1, 3, 20, 21, 22, device="cuda")
    out = torch.empty_like(t)
    sig = (0.9137, 0.9137, 0.9137)  # a kernel no other test uses: its weights are not made yet

    def step(_key):
        out.copy_(gaussian_blur(t, sig))

    stepper = Stepper(step, torch.device("cuda"), warmup=0)  # the first call is captured, then replayed
    stepper()
    torch.cuda.synchronize()
    assert len(stepper.graphs) == 1
    assert torch.allclose(out, gaussian_blur(t, sig), atol=1e-5)  # eager: makes the weights
    t.copy_(torch.randn_like(t))  # the replay reads the new values
    stepper()
    torch.cuda.synchronize()
    assert len(stepper.graphs) == 1
    assert torch.allclose(out, gaussian_blur(t, sig), atol=1e-5)
    stepper.close()
