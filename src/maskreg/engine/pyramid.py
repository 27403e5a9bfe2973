"""Multi-resolution pyramid on torch tensors, mask-aware.

Tensors are ``[1, 1, (z,) y, x]`` float32 on the engine's device (see :mod:`maskreg.engine.grid` for the axis order).
Images are smoothed by *normalised convolution* ``G*(I·m) / G*m`` so intensities outside a mask never bleed
into it; masks are box-averaged (the fraction of fine voxels inside the mask), never smoothed into images.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels
from maskreg.engine.grid import Grid, resampling_theta, shrink_factors
from maskreg.engine.sampling import grid_sample


@functools.lru_cache(maxsize=256)
def gaussian_weights(sigma: float) -> tuple[float, ...]:
    """Normalised 1D Gaussian weights, ``sigma`` in voxels, truncated at 3 sigma (computed on the host)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    k = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = math.fsum(k)
    return tuple(v / total for v in k)


_CONV_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _conv_weight(kernel: tuple[float, ...], axis: int, channels: int, t: torch.Tensor) -> torch.Tensor | None:
    """The depthwise weight ``[C, 1, k, 1, 1]`` (``k`` on ``axis``) of a 1D kernel on ``t``'s device, cached;
    ``None`` when it would have to be made during a CUDA graph capture (a host → device copy is not allowed
    there: the caller falls back to shifted views for that one call)."""
    key = (t.device, t.dtype, kernel, axis, channels, t.dim())
    w = _CONV_WEIGHTS.get(key)
    if w is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        shape = [1] * t.dim()
        shape[2 + axis] = len(kernel)
        w = torch.tensor(kernel, dtype=t.dtype, device=t.device).reshape(shape)
        w = w.expand(channels, *shape[1:]).contiguous()
        _CONV_WEIGHTS[key] = w
    return w


def filter_axis(t: torch.Tensor, kernel: tuple[float, ...], axis: int) -> torch.Tensor:
    """Convolve every channel of ``t`` (``[B, C, *spatial]``) with the odd 1D ``kernel`` (host weights)
    along spatial ``axis`` (tensor order), zero padding, same size.

    On the CPU a weighted sum of shifted views: memory-bound, and much faster there than a 3D convolution
    with a 1D kernel; the weights stay on the host. On CUDA a depthwise cuDNN convolution: the shifted views'
    strided elementwise kernels are not vectorised there, and the convolution is faster. Both are graph-safe
    (see :mod:`maskreg.engine.stepper`)."""
    if t.is_cuda and t.dim() in (4, 5):
        w = _conv_weight(tuple(kernel), axis, t.shape[1], t)
        if w is not None:
            pad = [0] * (t.dim() - 2)
            pad[axis] = len(kernel) // 2
            conv = F.conv3d if t.dim() == 5 else F.conv2d
            return conv(t, w, padding=tuple(pad), groups=t.shape[1])
    if t.dim() in (4, 5) and cpu_kernels.enabled(t):  # one compiled pass over every channel
        return cpu_kernels.filter_axis(t, kernel, axis)
    ax = 2 + axis
    r = len(kernel) // 2
    n = t.shape[ax]
    # out[i] = Σ_s kernel[r + s] t[i + s]: the centre tap, then each shift's two overlapping slices added in
    # place; taps reaching past the ends add nothing (zero padding) and no padded copy is made (faster than
    # padding first: the work is memory-bound)
    out = t * kernel[r]
    for s in range(1, min(r, n - 1) + 1):
        out.narrow(ax, s, n - s).add_(t.narrow(ax, 0, n - s), alpha=kernel[r - s])
        out.narrow(ax, 0, n - s).add_(t.narrow(ax, s, n - s), alpha=kernel[r + s])
    return out


@functools.lru_cache(maxsize=256)
def gaussian_kernels(shape: tuple[int, ...], sigmas: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """:func:`gaussian_weights` per spatial axis of ``shape`` (tensor order; ``(1.0,)`` where sigma is 0), a
    kernel longer than its axis trimmed (the taps past both ends would add nothing)."""
    kernels = []
    for n, s in zip(shape, sigmas, strict=False):
        k = gaussian_weights(float(s)) if s > 0 else (1.0,)
        if len(k) > 2 * n - 1:
            c = len(k) // 2
            k = k[c - (n - 1) : c + n]
        kernels.append(k)
    return tuple(kernels)


def gaussian_blur(t: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
    """Separable Gaussian blur of ``t`` ``[1, C, *spatial]``; ``sigmas`` per spatial axis in tensor order
    (voxels; 0 = no blur on that axis). Zero padding: use :func:`normalised_blur` for images."""
    for axis, k in enumerate(gaussian_kernels(tuple(t.shape[2:]), tuple(float(s) for s in sigmas))):
        if len(k) > 1:
            t = filter_axis(t, k, axis)
    return t


def normalised_blur(
    image: torch.Tensor, mask: torch.Tensor, sigmas: tuple[float, ...], eps: float = 1e-6
) -> torch.Tensor:
    """``G*(I·m) / G*m``: smooth ``image`` using only voxels inside ``mask`` (weights in [0, 1]).
    Where no mask voxel is near, the result is 0; with no smoothing the image is returned unchanged."""
    if all(s <= 0 for s in sigmas):
        return image
    return _ratio(gaussian_blur(image * mask, sigmas), gaussian_blur(mask, sigmas), eps)


def _ratio(num: torch.Tensor, den: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``num / den`` where ``den > eps``, else 0: the last step of a normalised convolution."""
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def _box_kernel(f: int) -> tuple[float, ...]:
    """:func:`box_average`'s 1D kernel for factor ``f``."""
    k = [1.0] * (f if f % 2 else f + 1)
    if f % 2 == 0:
        k[0] = k[-1] = 0.5
    return tuple(v / f for v in k)


def box_average(t: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Mean over a ``factors`` box (tensor order) centred on each voxel, stride 1, same shape as ``t``, every
    channel. An odd factor f averages f voxels; an even one f+1 voxels with half weights at both ends, so
    the box stays centred."""
    for axis, f in enumerate(factors):
        if f > 1:
            t = filter_axis(t, _box_kernel(f), axis)
    return t


def resample(
    t: torch.Tensor,
    in_grid: Grid,
    out_grid: Grid,
    out_to_in: np.ndarray | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample tensor ``t`` (on ``in_grid``) at the voxel centres of ``out_grid`` through the physical map
    ``out_to_in`` (homogeneous; identity when None)."""
    dim = in_grid.dim
    m = np.eye(dim + 1) if out_to_in is None else out_to_in
    if dim == 3 and mode == "bilinear" and cpu_kernels.enabled(t):  # no sampling grid stored
        a = (in_grid.physical_to_normalised() @ m @ out_grid.index_to_physical())[:dim]
        return cpu_kernels.sample_affine(t, a, tuple(out_grid.shape), padding_mode)
    theta = torch.as_tensor(resampling_theta(out_grid, in_grid, m), dtype=torch.float32, device=t.device)
    n = t.shape[0]
    grid = F.affine_grid(theta[None].expand(n, -1, -1), [n, 1, *out_grid.shape], align_corners=True)
    return grid_sample(t, grid, mode=mode, padding_mode=padding_mode)


def _grow_axis(a, axis: int, r: int):
    """:func:`dilate_box` along one ``axis`` of ``a`` by ``r`` voxels: each voxel becomes the OR of the
    ``2 r + 1`` voxels centred on it, those past either end counting as False. The window's OR is built by
    doubling (runs of 1, 2, 4, ... voxels, each the OR of two runs of half its length), then covered by two
    overlapping runs: about log2(2 r + 1) whole-array ORs."""
    n, w = a.shape[axis], 2 * r + 1
    shape = list(a.shape)
    shape[axis] = n + 2 * r
    if isinstance(a, np.ndarray):
        runs = np.zeros(shape, dtype=bool)
    else:
        runs = torch.zeros(shape, dtype=torch.bool, device=a.device)
    at = [slice(None)] * a.ndim

    def part(start: int, length: int):
        at[axis] = slice(start, start + length)
        return runs[tuple(at)]

    part(r, n)[...] = a
    length = 1  # runs[j] = OR of the padded voxels j .. j + length - 1; len(runs) = n + 2 r - length + 1
    while 2 * length <= w:
        m = runs.shape[axis] - length
        runs = part(0, m) | part(length, m)
        length *= 2
    return part(0, n) | part(w - length, n)


def dilate_box(a, radii: tuple[int, ...]):
    """Binary dilation of the boolean ``a`` (a numpy array or a torch tensor, any device) by a box of
    ``radii`` voxels along its last ``len(radii)`` axes (0 = none on that axis); voxels past the ends count
    as False. Returns the same kind of array, same shape.

    A box is separable: one axis at a time, each by doubling (:func:`_grow_axis`), so the cost grows with
    log(radius), not with the box's volume. The same as scipy's ``maximum_filter1d`` or torch's ``max_pool1d``
    along each axis, several times faster than either on boolean masks (benchmarks/bench_valid_masks.py)."""
    lead = a.ndim - len(radii)
    for axis, r in enumerate(radii):
        if r > 0:
            a = _grow_axis(a, lead + axis, int(r))
    return a


def erode_voxels(mask: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """Binary erosion of ``mask`` (``[1, 1, *spatial]``, values in [0, 1], > 0.5 = inside) by a box of
    ``radii`` voxels per axis (tensor order; 0 = none on that axis). Outside the image counts as inside, so
    the image border is not eroded (voxels mapping outside an image get weight 0 anyway). Returns 0/1 in
    ``mask``'s dtype on its device: the complement of the outside dilated by the box (:func:`dilate_box`),
    the same values as one dense max-pool of the outside over the ``2 r + 1`` box.

    On the CPU the boolean work runs in numpy (its boolean ORs are vectorised, torch's CPU ones much slower);
    on other devices in torch."""
    if all(r <= 0 for r in radii):
        return (mask > 0.5).to(mask.dtype)
    if mask.device.type == "cpu":
        outside = dilate_box(mask.detach().numpy() <= 0.5, radii)
        return torch.from_numpy(~outside).to(mask.dtype)
    return (~dilate_box(mask <= 0.5, radii)).to(mask.dtype)


def valid_mask_radii(factors: tuple[int, ...], role: str) -> tuple[int, ...]:
    """elastix's erosion of a *valid* mask at shrink factor ``s`` (per axis, any order): ``s + 1`` voxels for
    the fixed mask, ``2 s + 1`` for the moving mask, so smoothing and interpolation at that level never reach
    beyond the valid region."""
    return tuple((f + 1) if role == "fixed" else (2 * f + 1) for f in factors)


def _decimate_gather(t: torch.Tensor, ax: int, factor: int, js: range, zero_padding: bool) -> torch.Tensor:
    """:func:`decimate_axis` for the coarse voxels ``js`` by gathering both taps (any position, padded)."""
    n = t.shape[ax]
    pos = factor * torch.arange(js.start, js.stop, dtype=torch.float64) + (factor - 1) / 2.0
    i0 = pos.floor().long()
    w1 = pos - i0.double()
    w0 = 1.0 - w1
    i1 = i0 + 1
    if zero_padding:
        w0 = torch.where(i0 <= n - 1, w0, torch.zeros_like(w0))
        w1 = torch.where(i1 <= n - 1, w1, torch.zeros_like(w1))
    shape = [1] * t.dim()
    shape[ax] = len(js)
    out = t.index_select(ax, i0.clamp(max=n - 1).to(t.device)) * w0.to(t.dtype).reshape(shape).to(t.device)
    return out + t.index_select(ax, i1.clamp(max=n - 1).to(t.device)) * w1.to(t.dtype).reshape(shape).to(t.device)


def decimate_axis(t: torch.Tensor, axis: int, factor: int, size: int, zero_padding: bool) -> torch.Tensor:
    """Linear interpolation of ``t`` along spatial ``axis`` (tensor order) at the centres of a shrunk grid's
    voxels (:meth:`Grid.shrink`: coarse voxel ``j`` at fine index ``f j + (f − 1)/2``, ``size`` of them).
    Trilinear resampling onto an axis-aligned shrunk grid factors into these 1D steps, so decimating axis by
    axis gives what ``grid_sample`` onto the coarse grid gives (padding by zeros, or by the border value).

    An odd factor lands on fine voxel ``f j + (f − 1)/2``, an even one halfway between ``f j + f/2 − 1`` and
    ``f j + f/2``: strided views of ``t``; only a last coarse voxel reaching past the end is gathered."""
    ax = 2 + axis
    n = t.shape[ax]
    if factor == 1 and size == n:
        return t
    lo, hi = (factor - 1) // 2, factor // 2  # the two taps of coarse voxel 0 (equal for an odd factor)
    inside = max(0, min(size, (n - 1 - hi) // factor + 1))  # coarse voxels whose taps are all inside

    def taps(start: int) -> torch.Tensor:
        idx = [slice(None)] * t.dim()
        idx[ax] = slice(start, start + factor * (inside - 1) + 1, factor)
        return t[tuple(idx)]

    parts = []
    if inside > 0:
        parts.append(taps(lo) if lo == hi else 0.5 * (taps(lo) + taps(hi)))
    if inside < size:
        parts.append(_decimate_gather(t, ax, factor, range(inside, size), zero_padding))
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, ax)


def filter_decimate(
    t: torch.Tensor,
    kernels: tuple[tuple[float, ...] | None, ...],
    factors: tuple[int, ...],
    sizes: tuple[int, ...],
    zero_padding: bool = True,
) -> torch.Tensor:
    """Filter every channel of ``t`` with a 1D kernel per spatial axis (tensor order; ``None`` = none, zero
    padding) and decimate it onto the shrunk grid (``factors``, ``sizes`` in tensor order), one axis at a
    time: each pass runs on the already decimated result of the one before (a factor 2 in 3D: 1 + ½ + ¼ of
    the full-size work of filtering all three axes first)."""
    for axis, (k, f, m) in enumerate(zip(kernels, factors, sizes, strict=False)):
        if k is not None and len(k) > 1:
            t = filter_axis(t, k, axis)
        t = decimate_axis(t, axis, f, m, zero_padding)
    return t


def _pad_low(t: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
    """``t`` ``[N, C, *spatial]`` with ``pads`` (x-first) zero voxels before the first on each spatial axis."""
    if not any(pads):
        return t
    return F.pad(t, [v for p in pads for v in (p, 0)])  # F.pad lists the last (x) axis first


def downsample_mask(mask: torch.Tensor, grid: Grid, level_grid: Grid, factors: tuple[int, ...]) -> torch.Tensor:
    """Fraction of each coarse voxel's fine voxels inside ``mask`` (``factors`` x-first): the box average of
    :func:`box_average`, sampled at the coarse voxel centres
    (``level_grid`` = ``grid.shrink(factors, grid.lattice_pads(factors))``, as :func:`make_level` makes it;
    outside the image counts as outside the mask)."""
    if level_grid == grid:
        return mask
    f_t = tuple(reversed(factors))
    kernels = tuple(_box_kernel(f) if f > 1 else None for f in f_t)
    padded = _pad_low(mask, grid.lattice_pads(factors))
    return filter_decimate(padded, kernels, f_t, level_grid.shape).clamp_(0.0, 1.0)


@dataclass
class Level:
    """One pyramid level of one image: its grid, smoothed image and mask weights (fraction in [0, 1])."""

    grid: Grid
    image: torch.Tensor
    mask: torch.Tensor
    factors: tuple[int, ...]  # shrink factors, x-first (SimpleITK order)


def make_level(
    image: torch.Tensor,
    mask: torch.Tensor,
    grid: Grid,
    scale: int,
    sigma_vox: float | None = None,
    target_min_spacing: float | None = None,
    smooth_within: torch.Tensor | None = None,
) -> Level:
    """Build the level at shrink ``scale`` (1 = full resolution): the image smoothed and decimated, ``mask``
    box-averaged onto the same grid.

    The image is smoothed by normalised convolution ``G*(I·s) / G*s`` within ``smooth_within`` (``s``; a
    ``valid`` mask, outside which the image holds nothing), or within the image's own extent when it is
    ``None`` (an ``roi`` mask: the anatomy outside it is real and is smoothed in, as in the other image).

    ``target_min_spacing`` lets the moving image follow the fixed image's level spacing (mm); by default the
    level spacing is ``scale * min(spacing)``. Smoothing sigma per axis is ``factor/2`` voxels of that axis
    (ITK's and ANTs' usual choice) unless ``sigma_vox`` is given (in full-resolution voxels of the finest
    axis; 0 disables smoothing).
    """
    min_sp = min(grid.spacing)
    eff_scale = scale if target_min_spacing is None else max(target_min_spacing / min_sp, 1.0)
    factors = (
        shrink_factors(grid.spacing, 1)
        if eff_scale <= 1
        else tuple(max(1, int(round(eff_scale * min_sp / s))) for s in grid.spacing)
    )
    if sigma_vox is None:
        sig = tuple(f / 2.0 if f > 1 else 0.0 for f in factors)
    else:
        sig = tuple(sigma_vox * min_sp / s for s in grid.spacing)
    sig_t = tuple(reversed(sig))
    within = torch.ones_like(image) if smooth_within is None else smooth_within
    if all(f == 1 for f in factors):
        smoothed = normalised_blur(image, within, sig_t)
        return Level(grid, smoothed, mask, factors)
    # normalised convolution G*(I·m) / G*m, its two sums blurred and decimated axis by axis as two channels of
    # one tensor: the ratio is taken on the coarse grid
    # the level's voxels on the lattice anchored at the world origin, so the levels do not depend on the field of
    # view; zeros before the first voxel where the lattice starts earlier (outside the image weighs 0 anyway)
    pads = grid.lattice_pads(factors)
    coarse = grid.shrink(factors, pads)
    f_t = tuple(reversed(factors))
    kernels = tuple(gaussian_weights(float(s)) if s > 0 else None for s in sig_t)
    num_den = filter_decimate(_pad_low(torch.cat([image * within, within], 1), pads), kernels, f_t, coarse.shape)
    img = _ratio(num_den[:, :1], num_den[:, 1:])
    return Level(coarse, img, downsample_mask(mask, grid, coarse, factors), factors)
