"""Masked similarity losses on torch tensors, all *dense weighted means* ``Σ w·loss / Σ w``.

Inputs: ``fixed`` and ``moving`` (the moving image already sampled at ``T(x)``) and the weight ``w(x) =
m_f(x) · m_m(T(x)) · inside_moving(T(x))``, all the same shape: ``[1, 1, (z,) y, x]`` for dense evaluation or
``[1, 1, N]`` for sampled points (``cc`` needs the dense layout). Intensities should be normalised to about
[0, 1] (see :func:`intensity_scale`). Every loss returns a scalar to *minimise*.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

EPS = 1e-6


def intensity_scale(image: torch.Tensor, weight: torch.Tensor, low: float = 0.5, high: float = 99.5
                    ) -> tuple[float, float]:
    """Robust ``(offset, scale)`` so that ``(image - offset) / scale`` maps the ``low``..``high`` percentiles
    of the voxels with weight > 0 to 0..1."""
    vals = image[weight > 0]
    if vals.numel() == 0:
        vals = image.flatten()
    if vals.numel() > 2_000_000:  # quantile() has a size limit; a strided subset is plenty
        vals = vals[:: vals.numel() // 1_000_000 + 1]
    q = torch.quantile(vals.float(), torch.tensor([low / 100, high / 100], device=vals.device))
    lo, hi = float(q[0]), float(q[1])
    return lo, max(hi - lo, 1e-6)


def mse(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, **_) -> torch.Tensor:
    """Weighted mean squared difference."""
    return (weight * (fixed - moving) ** 2).sum() / weight.sum().clamp_min(EPS)


def _box(t: torch.Tensor, window: int) -> torch.Tensor:
    dim = t.dim() - 2
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dim - 1]
    return pool(t, kernel_size=window, stride=1, padding=window // 2, count_include_pad=True)


def local_cc(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, window: int = 5,
             **_) -> torch.Tensor:
    """Negative weighted mean of the *squared* local normalised cross-correlation (ANTs' and FireANTs' CC).

    Local statistics are weighted by ``weight`` inside a ``window``-voxel box (odd), computed with box filters
    (average pooling), so voxels outside the mask or the moving image do not enter any neighbourhood.
    """
    if window % 2 == 0:
        window += 1
    w = weight
    sw = _box(w, window).clamp_min(EPS)
    mf = _box(w * fixed, window) / sw
    mm = _box(w * moving, window) / sw
    vf = (_box(w * fixed * fixed, window) / sw - mf * mf).clamp_min(0)
    vm = (_box(w * moving * moving, window) / sw - mm * mm).clamp_min(0)
    cov = _box(w * fixed * moving, window) / sw - mf * mm
    cc = cov * cov / (vf * vm + 1e-5)
    return -(w * cc).sum() / w.sum().clamp_min(EPS)


def _bspline3(d: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel evaluated at offsets ``d`` (support |d| < 2)."""
    a = d.abs()
    return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6,
                       torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def joint_histogram(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32
                    ) -> torch.Tensor:
    """Mattes' Parzen joint histogram ``P[f_bin, m_bin]`` (sums to 1): zero-order window for the fixed
    intensities, cubic B-spline window for the moving ones (so it is differentiable in ``moving``).
    Intensities in [0, 1] are mapped to bins 2..bins-3 (values outside are clamped)."""
    f = fixed.reshape(-1)
    m = moving.reshape(-1)
    w = weight.reshape(-1)
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


def mattes_mi(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32,
              **_) -> torch.Tensor:
    """Negative Mattes mutual information ``H(F) + H(M) - H(F, M)`` of the weighted joint histogram."""
    hf, hm, hfm = _entropies(joint_histogram(fixed, moving, weight, bins))
    return -(hf + hm - hfm)


def nmi(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int = 32, **_) -> torch.Tensor:
    """Negative normalised mutual information ``(H(F) + H(M)) / H(F, M)`` (Studholme), in [-2, -1]."""
    hf, hm, hfm = _entropies(joint_histogram(fixed, moving, weight, bins))
    return -(hf + hm) / hfm.clamp_min(EPS)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": mse, "cc": local_cc, "mi": mattes_mi, "nmi": nmi}
ALIASES = {"masked_mse": "mse", "masked_cc": "cc", "masked_mi": "mi", "masked_nmi": "nmi", "lncc": "cc",
           "ncc": "cc"}
NEEDS_DENSE = {"cc"}


def get_loss(name: str) -> tuple[str, Callable[..., torch.Tensor]]:
    """Canonical name and function of a loss; accepts FireANTs' ``masked_*`` names."""
    key = ALIASES.get(name, name)
    if key not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(sorted(LOSSES) + sorted(ALIASES))}")
    return key, LOSSES[key]
