"""Masked similarity losses on torch tensors, all *dense weighted means* ``Σ w·loss / Σ w``.

Inputs: ``fixed`` and ``moving`` (the moving image already sampled at ``T(x)``) and the weight ``w(x) =
m_f(x) · m_m(T(x)) · inside_moving(T(x))``, all the same shape: ``[1, 1, (z,) y, x]`` for dense evaluation or
``[1, 1, N]`` for sampled points (``cc`` needs the dense layout). Intensities should be normalised to about
[0, 1] (see :func:`intensity_scale`). Every loss returns a scalar to *minimise*.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels
from maskreg.loss_names import canonical

EPS = 1e-6


def intensity_scale(
    image: torch.Tensor, weight: torch.Tensor, low: float = 0.5, high: float = 99.5
) -> tuple[float, float]:
    """Robust ``(offset, scale)`` so that ``(image - offset) / scale`` maps the ``low``..``high`` percentiles
    of the voxels with weight > 0 to 0..1."""
    vals = image[weight > 0]
    if vals.numel() == 0:
        vals = image.flatten()
    if vals.numel() > 40_000:  # a strided subset of 20-40 k values is plenty for these percentiles, and
        vals = vals[:: vals.numel() // 20_000]  # quantile() sorts, so its cost grows with the count
    q = torch.quantile(vals.float(), torch.tensor([low / 100, high / 100], device=vals.device))
    lo, hi = float(q[0]), float(q[1])
    return lo, max(hi - lo, 1e-6)


def mse(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, **_) -> torch.Tensor:
    """Weighted mean squared difference."""
    return (weight * (fixed - moving) ** 2).sum() / weight.sum().clamp_min(EPS)


def _centred_moments(fixed, moving, weight):
    """Weighted centred cross and auto moments ``(Σ w a b, Σ w a², Σ w b²)`` with ``a = f − f̄``, ``b = m − m̄``
    (means weighted by ``w``), and ``a``, ``b`` themselves."""
    total = weight.sum().clamp_min(EPS)
    a = fixed - (weight * fixed).sum() / total
    b = moving - (weight * moving).sum() / total
    return (weight * a * b).sum(), (weight * a * a).sum(), (weight * b * b).sum(), a, b


def global_cc(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, **_) -> torch.Tensor:
    """Global correlation, ANTs' ``GC``: ``−r²``, ``r`` the Pearson correlation of ``f`` and ``m`` weighted by
    ``w`` (in [−1, 0]; blind to a linear intensity map, an inverted contrast included)."""
    sab, saa, sbb, _, _ = _centred_moments(fixed, moving, weight)
    return -(sab * sab) / (saa * sbb).clamp_min(EPS * EPS)


# windows up to this size are summed by shifted in-place adds, larger ones by cumulative sums
SHIFT_SUM_MAX_WINDOW = 9


def _box_axis(t: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """Sum over a centred window of ``k`` (odd) voxels along spatial ``axis``, zero padding.

    Small windows: ``k - 1`` shifted in-place adds of the tensor's own slices (no padded copy; faster than
    cumulative sums on the CPU, and exact sums of ``k`` terms). Larger windows: cumulative sums, O(N) whatever
    the window."""
    ax = 2 + axis
    r = k // 2
    n = t.shape[ax]
    if k <= SHIFT_SUM_MAX_WINDOW:
        out = t.clone()
        for s in range(1, min(r, n - 1) + 1):
            out.narrow(ax, s, n - s).add_(t.narrow(ax, 0, n - s))
            out.narrow(ax, 0, n - s).add_(t.narrow(ax, s, n - s))
        return out
    pad = [0, 0] * (t.dim() - 2)
    pad[2 * (t.dim() - 3 - axis)] = r + 1  # F.pad lists the last axis first
    pad[2 * (t.dim() - 3 - axis) + 1] = r
    c = torch.cumsum(F.pad(t, pad), dim=ax)
    return c.narrow(ax, k, n) - c.narrow(ax, 0, n)


def window_sizes(shape: tuple[int, ...], window: int) -> list[int]:
    """The box's size per spatial axis of ``shape``: ``window`` (odd), shrunk to the largest odd size that fits
    on axes shorter than it (thin slabs)."""
    return [min(window, n if n % 2 else n - 1) for n in shape]


def _box(t: torch.Tensor, window: int) -> torch.Tensor:
    """Box mean with a ``window`` (odd) per axis, shrunk on axes shorter than the window (thin slabs).

    On CUDA average pooling per axis (zero padding counted, stride 1): the shifted adds' strided kernels are
    not vectorised there, and pooling is faster."""
    axes = [(axis, k) for axis, k in enumerate(window_sizes(tuple(t.shape[2:]), window)) if k > 1]
    if t.is_cuda and t.dim() in (4, 5):
        pool = F.avg_pool3d if t.dim() == 5 else F.avg_pool2d
        for axis, k in axes:
            size, pad = [1] * (t.dim() - 2), [0] * (t.dim() - 2)
            size[axis], pad[axis] = k, k // 2
            t = pool(t, tuple(size), stride=1, padding=tuple(pad), count_include_pad=True)
        return t
    for axis, k in axes:
        t = _box_axis(t, k, axis)
    return t / math.prod(k for _, k in axes)


def _local_stats(fixed, moving, w, window):
    wf, wm = w * fixed, w * moving
    # the six local sums in one pass of separable box filters
    sums = _box(torch.cat([w, wf, wm, wf * fixed, wm * moving, wf * moving], dim=1), window)
    sw = sums[:, 0:1].clamp_min(EPS)
    mf = sums[:, 1:2] / sw
    mm = sums[:, 2:3] / sw
    vf = (sums[:, 3:4] / sw - mf * mf).clamp_min(0)
    vm = (sums[:, 4:5] / sw - mm * mm).clamp_min(0)
    cov = sums[:, 5:6] / sw - mf * mm
    return sw, mf, mm, vf, vm, cov


CC_EPS = 1e-5


class _LocalCC(torch.autograd.Function):
    """Weighted local NCC² with its analytic gradient in ``moving`` (weights and fixed are constants).

    With window sums over ``W(x)``: ``cc(x) = cov² / (v_f v_m + ε)`` and ``L = -Σ w cc / Σ w``. For a voxel
    ``y``, ``∂L/∂m(y) = -(w(y)/Σw) [f(y)·B(w a) - B(w a μ_f) - m(y)·B(w b) + B(w b μ_m)]`` with
    ``a = 2 cov / (D S_w)``, ``b = 2 cov² v_f / (D² S_w)``, ``D = v_f v_m + ε`` and ``B`` the same
    (symmetric) box sum: four more box sums instead of autograd through the whole graph.
    """

    @staticmethod
    def forward(ctx, fixed, moving, w, window):
        ctx.compiled = None
        if fixed.dim() in (4, 5) and cpu_kernels.enabled(fixed.detach(), moving.detach(), w):
            # the same sums and formulas in streamed loops (maskreg.engine.cpu_kernels), backward terms kept
            ctx.compiled = cpu_kernels.LocalCC(
                fixed, moving, w, window_sizes(tuple(fixed.shape[2:]), window), EPS, CC_EPS
            )
            need_f, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            return fixed.new_tensor(ctx.compiled.loss(need_f, need_m))
        sw, mf, mm, vf, vm, cov = _local_stats(fixed, moving, w, window)
        d = vf * vm + CC_EPS
        cc = cov * cov / d
        wsum = w.sum().clamp_min(EPS)
        ctx.save_for_backward(fixed, moving, w, sw, mf, mm, vf, vm, cov, d, wsum)
        ctx.window = window
        return -(w * cc).sum() / wsum

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.compiled is not None:
            gf, gm = ctx.compiled.gradients(float(grad_out))
            return gf, gm, None, None
        fixed, moving, w, sw, mf, mm, vf, vm, cov, d, wsum = ctx.saved_tensors
        # sw is the window *mean* of w, so a and b carry 1/|W| and a box mean below makes the box sum
        wa = w * 2 * cov / (d * sw)
        wb2 = w * 2 * cov * cov / (d * d * sw)  # b without its v_other factor
        # the loss is symmetric in (fixed, moving): the same formula with the roles swapped; both sides'
        # box sums run in one call, sharing the ``wa`` channel
        chans, sides = [wa], []
        for i, (this, other, m_this, m_other, v_other) in enumerate(
            ((fixed, moving, mf, mm, vm), (moving, fixed, mm, mf, vf))
        ):
            if ctx.needs_input_grad[i]:
                wb = wb2 * v_other
                sides.append((i, this, other, len(chans)))
                chans += [wa * m_other, wb, wb * m_this]
        k = _box(torch.cat(chans, dim=1), ctx.window)
        grads = [None, None]
        for i, this, other, j in sides:
            g = other * k[:, 0:1] - k[:, j : j + 1] - this * k[:, j + 1 : j + 2] + k[:, j + 2 : j + 3]
            grads[i] = -grad_out * w * g / wsum
        return grads[0], grads[1], None, None


def local_cc(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, window: int = 5, **_) -> torch.Tensor:
    """Negative weighted mean of the *squared* local normalised cross-correlation (ANTs' and FireANTs' CC).

    Local statistics are weighted by ``weight`` inside a ``window``-voxel box (odd; shrunk on axes shorter
    than it), computed with separable box sums, so voxels outside the mask or the moving image do not enter
    any neighbourhood. The gradient (in ``moving`` only; weights are held constant) is analytic.
    """
    if window % 2 == 0:
        window += 1
    return _LocalCC.apply(fixed, moving, weight.detach(), window)


def local_cc_over_region(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, region: float, window: int = 5
) -> torch.Tensor:
    """Local NCC² summed over the overlap and divided by ``region``, the weight of the whole region the loss is
    meant for (the fixed mask at the level), with the gradient in ``weight`` too: ``-Σ w cc² / region``.

    :func:`local_cc` divides by ``Σ w`` and holds ``w`` constant, so a step that moves part of the fixed mask
    off the moving image or its mask is free, and its mean over what is left may be higher: a linear stage
    then slides the overlap away (a thin CT slab with liver ROIs loses most of its overlap while the mean cc
    rises). Here a voxel that leaves the overlap takes its cc² with it, and the
    moving mask's edge (through ``w``) pulls back; a caller whose moving mask is a ``valid`` one detaches ``w``,
    since a field of view's edge must not pull. Plain autograd: the linear stages' gradient is in a dozen
    parameters, and only ``cc`` runs there densely."""
    if window % 2 == 0:
        window += 1
    _, _, _, vf, vm, cov = _local_stats(fixed, moving, weight, window)
    cc = cov * cov / (vf * vm + CC_EPS)
    return -(weight * cc).sum() / max(float(region), EPS)


def local_cc_autograd(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, window: int = 5) -> torch.Tensor:
    """The same loss through plain autograd (reference for tests)."""
    _, _, _, vf, vm, cov = _local_stats(fixed, moving, weight, window)
    cc = cov * cov / (vf * vm + CC_EPS)
    return -(weight * cc).sum() / weight.sum().clamp_min(EPS)


def _bspline3(d: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel evaluated at offsets ``d`` (support |d| < 2)."""
    a = d.abs()
    return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def _parzen_weights(t: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline weights of the four bins ``floor(mv) - 1 .. floor(mv) + 2`` for the fractional parts
    ``t = mv - floor(mv)`` ``[N]`` → ``[N, 4]`` (they sum to 1): ``β₃(t + 1), β₃(t), β₃(t - 1), β₃(t - 2)``."""
    t2, s = t * t, 1 - t
    t3 = t2 * t
    return torch.stack([s * s * s, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], 1) / 6


def _parzen_derivatives(t: torch.Tensor) -> torch.Tensor:
    """``d/dmv`` of :func:`_parzen_weights` ``[N, 4]``."""
    t2, s = t * t, 1 - t
    return torch.stack([-0.5 * s * s, 1.5 * t2 - 2 * t, 0.5 + t - 1.5 * t2, 0.5 * t2], 1)


class _ParzenHistogram(torch.autograd.Function):
    """Unnormalised joint histogram ``H[fb, j] = Σ_x w(x) β₃(mv(x) − j)`` (flattened ``bins²``).

    Each voxel adds to the four moving bins its B-spline reaches, with weights in closed form from the
    fractional part of ``mv``: one scatter of ``4N`` values. The gradient in the moving bin coordinate is
    closed-form too, ``∂L/∂mv(x) = w(x) Σ_j β₃'(mv − j) ∂L/∂H[fb(x), j]``: one gather, instead of autograd
    through the B-spline of every voxel, and about half the operators that four passes over the bins would run.
    (The entropies on the small ``bins²`` histogram stay in autograd.)"""

    @staticmethod
    def forward(ctx, mv, fb, w, bins):
        hist, t, idx = _parzen_scatter(mv, fb, w, bins)
        ctx.save_for_backward(t, idx, w)
        return hist

    @staticmethod
    def backward(ctx, grad_hist):
        t, idx, w = ctx.saved_tensors
        grad = (_parzen_derivatives(t) * grad_hist[idx]).sum(1)
        return grad * w, None, None, None


def _bin_coordinates(fixed: torch.Tensor, moving: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fixed bins ``fb`` (nearest, long) and moving bin coordinates ``mv`` (continuous) of intensities in
    [0, 1] (clamped), mapped to bins 2..bins-3 so the B-spline window never leaves the histogram."""
    usable = bins - 5
    fb = (fixed.detach().reshape(-1).clamp(0, 1) * usable + 2).round().long()
    mv = moving.reshape(-1).clamp(0, 1) * usable + 2
    return fb, mv


def _parzen_scatter(
    mv: torch.Tensor, fb: torch.Tensor, w: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised flat histogram ``H`` (``bins²``), each point's fractional part ``t`` and its four cells
    ``idx`` ``[N, 4]`` (moving bins ``floor(mv) - 1 .. floor(mv) + 2`` in row ``fb``)."""
    base = mv.floor()
    t = mv - base
    idx = (fb * bins + base.long() - 1)[:, None] + torch.arange(4, device=mv.device)
    hist = torch.zeros(bins * bins, dtype=mv.dtype, device=mv.device)
    hist.index_add_(0, idx.reshape(-1), (w[:, None] * _parzen_weights(t)).reshape(-1))
    return hist, t, idx


def joint_histogram(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Mattes' Parzen joint histogram ``P[f_bin, m_bin]`` (sums to 1): zero-order window for the fixed
    intensities, cubic B-spline window for the moving ones (so it is differentiable in ``moving``).
    Intensities in [0, 1] are mapped to bins 2..bins-3 (values outside are clamped). Weights are constants."""
    fb, mv = _bin_coordinates(fixed, moving, bins)
    hist = _ParzenHistogram.apply(mv, fb, weight.detach().reshape(-1), bins).reshape(bins, bins)
    return hist / hist.sum().clamp_min(EPS)


def _joint_histogram_autograd(fixed, moving, weight, bins: int = 32) -> torch.Tensor:
    """Reference: the same histogram through plain autograd (for tests)."""
    f, m, w = fixed.reshape(-1), moving.reshape(-1), weight.reshape(-1)
    usable = bins - 5
    fb = (f.clamp(0, 1) * usable + 2).round().long()
    mv = m.clamp(0, 1) * usable + 2
    base = mv.detach().floor().long()
    hist = torch.zeros(bins * bins, dtype=f.dtype, device=f.device)
    for k in (-1, 0, 1, 2):
        j = base + k
        hist = hist.scatter_add(0, fb * bins + j, w * _bspline3(mv - j.to(mv.dtype)))
    hist = hist.reshape(bins, bins)
    return hist / hist.sum().clamp_min(EPS)


def _entropies(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pf = p.sum(1)
    pm = p.sum(0)
    h = lambda q: -(q * torch.log(q.clamp_min(1e-10))).sum()  # noqa: E731
    return h(pf), h(pm), h(p)


def mattes_mi(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32, **_) -> torch.Tensor:
    """Negative Mattes mutual information ``H(F) + H(M) - H(F, M)`` of the weighted joint histogram."""
    hf, hm, hfm = _entropies(joint_histogram(fixed, moving, weight, bins))
    return -(hf + hm - hfm)


def nmi(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32, **_) -> torch.Tensor:
    """Negative normalised mutual information ``(H(F) + H(M)) / H(F, M)`` (Studholme), in [-2, -1]."""
    hf, hm, hfm = _entropies(joint_histogram(fixed, moving, weight, bins))
    return -(hf + hm) / hfm.clamp_min(EPS)


def _histogram_terms(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """What the closed-form histogram gradients share: the unnormalised Parzen histogram ``H`` (flat ``bins²``),
    its sum ``S``, and ``gradient(cell, scale)``: ``scale · w · ∂mv/∂moving · Σ_j β₃'(mv − j) cell[f(x), j]`` per
    point, shaped as ``moving`` (``∂mv/∂moving`` is ``usable`` inside [0, 1], 0 where the clamp holds), with the
    binning of :func:`joint_histogram`. On the CPU two compiled passes over the points
    (:func:`maskreg.engine.cpu_kernels.parzen_histogram`, ``parzen_gradient``) instead of some twenty operators."""
    if cpu_kernels.enabled(fixed, moving, weight):
        hist = cpu_kernels.parzen_histogram(fixed, moving, weight, bins)
        return (
            hist,
            hist.sum().clamp_min(EPS),
            lambda cell, scale: cpu_kernels.parzen_gradient(fixed, moving, weight, cell, bins, float(scale)),
        )
    m, w = moving.reshape(-1), weight.reshape(-1)
    fb, mv = _bin_coordinates(fixed, m, bins)
    hist, t, idx = _parzen_scatter(mv, fb, w, bins)
    dmv = torch.where((m > 0) & (m < 1), torch.full_like(m, float(bins - 5)), torch.zeros_like(m))
    dbeta = _parzen_derivatives(t)

    def gradient(cell: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ((dbeta * cell.reshape(-1)[idx]).sum(1) * (w * dmv * scale)).reshape(moving.shape)

    return hist, hist.sum().clamp_min(EPS), gradient


def _log_clamped(q: torch.Tensor) -> torch.Tensor:
    return torch.log(q.clamp_min(1e-10))


def mattes_mi_value_and_grad(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mattes_mi` and its gradient in ``moving`` (same shape), in closed form, for points ``[1, 1, N]``.

    With ``P = H / S``, ``MI = Σ P log P − Σ p_f log p_f − Σ p_m log p_m`` has ``∂MI/∂P_ij = log(P_ij / (p_f,i
    p_m,j)) − 1``, and ``∂P_kl/∂H_ij = (δ − P_kl) / S``. A point moves only its own fixed row, through
    ``Σ_j β₃'(mv − j) = 0``, so every term constant in ``j`` drops out:
    ``∂L/∂mv(x) = −w(x)/S · Σ_j β₃'(mv(x) − j) (log P[f(x), j] − log p_m,j)``. The weights are constants, as in
    :func:`mattes_mi`. Some thirty operators, no autograd."""
    hist, total, gradient = _histogram_terms(fixed, moving, weight, bins)
    p = (hist / total).reshape(bins, bins)
    pf, pm = p.sum(1), p.sum(0)
    log_p, log_pf, log_pm = _log_clamped(p), _log_clamped(pf), _log_clamped(pm)
    mi = (p * log_p).sum() - (pf * log_pf).sum() - (pm * log_pm).sum()
    return -mi, gradient(log_p - log_pm[None, :], -1.0 / total)


def nmi_value_and_grad(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nmi` and its gradient in ``moving``, in closed form (see :func:`mattes_mi_value_and_grad`):
    ``L = −(H_f + H_m) / H_fm`` gives, after the terms constant in ``j`` drop out,
    ``∂L/∂mv(x) = w(x)/S · Σ_j β₃'(mv − j) (H_fm log p_m,j − (H_f + H_m) log P[f(x), j]) / H_fm²``."""
    hist, total, gradient = _histogram_terms(fixed, moving, weight, bins)
    p = (hist / total).reshape(bins, bins)
    pf, pm = p.sum(1), p.sum(0)
    log_p, log_pm = _log_clamped(p), _log_clamped(pm)
    hf, hm, hfm = -(pf * _log_clamped(pf)).sum(), -(pm * log_pm).sum(), -(p * log_p).sum()
    hfm = hfm.clamp_min(EPS)
    return -(hf + hm) / hfm, gradient((hfm * log_pm[None, :] - (hf + hm) * log_p) / (hfm * hfm), 1.0 / total)


def mse_value_and_grad(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mse` and its gradient in ``moving``: ``−2 w (f − m) / Σ w``."""
    total = weight.sum().clamp_min(EPS)
    diff = fixed - moving
    return (weight * diff * diff).sum() / total, (-2.0 / total) * weight * diff


def global_cc_value_and_grad(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`global_cc` and its gradient in ``moving``: ``−2 w Σab / (Σaa Σbb) · (a − b Σab / Σbb)`` (the
    means' own derivatives cancel: ``Σ w a = Σ w b = 0``)."""
    sab, saa, sbb, a, b = _centred_moments(fixed, moving, weight)
    den = (saa * sbb).clamp_min(EPS * EPS)
    return -(sab * sab) / den, (-2.0 * sab / den) * weight * (a - b * (sab / sbb.clamp_min(EPS)))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": mse,
    "cc": local_cc,
    "gc": global_cc,
    "mi": mattes_mi,
    "nmi": nmi,
}
# pointwise losses: value and gradient in the moving values, in closed form (used at sampled points)
VALUE_AND_GRAD: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "mse": mse_value_and_grad,
    "gc": global_cc_value_and_grad,
    "mi": mattes_mi_value_and_grad,
    "nmi": nmi_value_and_grad,
}


def get_loss(name: str) -> tuple[str, Callable[..., torch.Tensor]]:
    """Canonical name and function of a loss; accepts FireANTs' ``masked_*`` names."""
    key = canonical(name)
    return key, LOSSES[key]


def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``1 - mean_k 2 Σ w f_k m_k / (Σ w f_k + Σ w m_k)`` over the label channels, weighted by the mask."""
    dims = tuple(range(2, fixed_onehot.dim()))
    inter = (w * fixed_onehot * warped_onehot).sum(dims)
    total = (w * fixed_onehot).sum(dims) + (w * warped_onehot).sum(dims)
    return 1.0 - (2 * inter / total.clamp_min(1e-6)).mean()
