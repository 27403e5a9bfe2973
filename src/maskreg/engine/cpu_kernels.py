"""Compiled CPU kernels for the engine's hot loops: trilinear sampling, the masked local CC with its gradient,
separable filtering and the SyN update (numba, in :mod:`maskreg.engine._numba_kernels` and
:mod:`maskreg.engine._numba_filters`).

Why: on the CPU, torch runs each elementwise operation as its own pass over memory, and its 3D
``grid_sample`` computes the corner weights in double work per channel. A SyN iteration in torch is some 30
such passes per loss evaluation; fused loops do each step in one or two (timings:
``benchmarks/profile_engine.py``).

Every function here takes and returns torch tensors and computes what the torch code it replaces computes
(tests compare them to float32 rounding), so CUDA keeps the torch path and the CPU can fall back to it:
:func:`enabled` is False for CUDA tensors, when numba is not installed, or with ``MASKREG_CPU_KERNELS=0``.

The kernels compile on first use and are cached on disk (numba's ``cache=True``: next to this file when it
is writable, else in the user's cache directory): compiling takes a while, once per installation
(``make setup`` does it); loading the cache is a small cost per process. They use as many threads as torch
(``torch.get_num_threads()``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections.abc import Iterator
from functools import lru_cache
from types import ModuleType

import numpy as np
import torch


@lru_cache(maxsize=1)
def _module() -> ModuleType | None:
    if os.environ.get("MASKREG_CPU_KERNELS", "1").lower() in ("0", "false", "no"):
        return None
    try:
        from maskreg.engine import _numba_kernels
    except ImportError:  # numba missing: the torch path
        return None
    return _numba_kernels


def available() -> bool:
    """Whether the compiled kernels are in use: numba importable and ``MASKREG_CPU_KERNELS`` not ``0``."""
    return _module() is not None


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """Within the block, the compiled kernels are on (where numba is importable) or off (torch's own operators,
    the path CUDA runs), whatever ``MASKREG_CPU_KERNELS`` says; the variable and the choice are restored after.
    The setting is read once and cached, so changing the variable alone has no effect mid-process."""
    old = os.environ.get("MASKREG_CPU_KERNELS")
    os.environ["MASKREG_CPU_KERNELS"] = "1" if on else "0"
    _module.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MASKREG_CPU_KERNELS", None)
        else:
            os.environ["MASKREG_CPU_KERNELS"] = old
        _module.cache_clear()


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels serve these tensors: all float32 on the CPU (float64 keeps torch's exact
    path, which the tests of analytic gradients use), none needing a gradient, numba importable and not
    switched off."""
    if any(t.device.type != "cpu" or t.requires_grad or t.dtype != torch.float32 for t in tensors):
        return False
    return _module() is not None


def _k() -> ModuleType:
    mod = _module()
    assert mod is not None
    import numba

    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return mod


_WORK = threading.local()
_TOKENS = itertools.count()


def _scratch(tag: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 work array kept per thread, tag and shape, reused by the next call: fresh arrays of tens of
    MB come from the system as untouched pages, and faulting them in costs as much as the loops."""
    store = getattr(_WORK, "arrays", None)
    if store is None:
        store = _WORK.arrays = {}
    key = (tag, shape)
    arr = store.get(key)
    if arr is None:
        if len(store) > 32:  # many shapes seen (a cohort of grids): start over
            store.clear()
        arr = store[key] = np.empty(shape, np.float32)
    return arr


def _np(t: torch.Tensor) -> np.ndarray:
    """A float32, C-ordered numpy view (a copy only when the tensor is not already one)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def sample(
    input: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros", with_inside: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trilinear ``F.grid_sample(input, grid, padding_mode=..., align_corners=True)`` of a 3D ``input``
    ``[N, C, D, H, W]`` at ``grid`` ``[N or 1, *out_shape, 3]`` (normalised ``x, y, z``) → ``[N, C, *out_shape]``,
    and with ``with_inside`` the ``[N, 1, *out_shape]`` indicator of points inside ``[-1, 1]³``
    (:func:`maskreg.engine.sampling.inside`) from the same pass."""
    mod = _k()
    n = max(input.shape[0], grid.shape[0])
    out_shape = grid.shape[1:-1]
    pts = int(np.prod(out_shape))
    out = torch.empty(n, input.shape[1], pts, dtype=torch.float32)
    ins = torch.empty(n, pts, dtype=torch.float32) if with_inside else None
    empty = np.empty(0, np.float32)
    for i in range(n):
        img = _np(input[min(i, input.shape[0] - 1)])
        g = _np(grid[min(i, grid.shape[0] - 1)]).reshape(pts, 3)
        mod.sample_trilinear(
            img, g, out[i].numpy(), ins[i].numpy() if ins is not None else empty, padding_mode == "border"
        )
    out = out.reshape(n, input.shape[1], *out_shape)
    return out, (ins.reshape(n, 1, *out_shape) if ins is not None else None)


_EMPTY = np.zeros(0, np.float32)


def sample_mapped(
    input: torch.Tensor,
    a: np.ndarray,
    m: np.ndarray,
    u: torch.Tensor,
    rows: tuple[np.ndarray, np.ndarray] | None = None,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input`` ``[1, C, D, H, W]`` sampled (trilinear, zero padding) at ``a @ (i, 1) + m @ u(i)`` for every voxel
    index ``i`` (x first) of ``u``'s grid: ``a`` ``(3, 4)`` index → input's normalised coordinates, ``m`` ``(3, 3)``
    mm → normalised, ``u`` ``[1, 3, Z, Y, X]`` mm. Returns ``([1, C, Z, Y, X], weight [1, 1, Z, Y, X])``: what
    ``grid_sample`` gives on the grid ``affine_grid(a) + offsets(u)``, without storing it, and the weight
    ``sampled[1] · inside · prior`` (channel 1: the mask, as the engine stacks image and mask; ``inside``:
    :func:`maskreg.engine.sampling.inside`; ``prior``
    ``[1, 1, Z, Y, X]`` or none). ``rows``: ``(lo, hi)`` int ``[Z, Y]``, the x range ``[lo, hi)`` of each row to
    sample; elsewhere both outputs are 0 (:class:`maskreg.engine.support.WeightSupport`)."""
    mod = _k()
    shape = tuple(u.shape[2:])
    pts = int(np.prod(shape))
    out = torch.empty(1, input.shape[1], pts, dtype=torch.float32)
    weight = torch.empty(1, 1, pts, dtype=torch.float32)
    if rows is None:
        rows = _all_rows(shape)
    mod.sample_mapped(
        _np(input[0]),
        np.ascontiguousarray(a, dtype=np.float64),
        np.ascontiguousarray(m, dtype=np.float64),
        _np(u[0]),
        out[0].numpy(),
        weight[0, 0].numpy(),
        _np(prior).reshape(-1) if prior is not None else _EMPTY,
        rows[0],
        rows[1],
    )
    return out.reshape(1, input.shape[1], *shape), weight.reshape(1, 1, *shape)


@lru_cache(maxsize=8)
def _all_rows(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges ``[0, X)`` for every row of a ``(Z, Y, X)`` grid (shared: never written to)."""
    return np.zeros(shape[:2], np.int64), np.full(shape[:2], shape[2], np.int64)


def sample_affine(
    input: torch.Tensor, a: np.ndarray, shape: tuple[int, ...], padding_mode: str = "zeros"
) -> torch.Tensor:
    """``input`` ``[N, C, D, H, W]`` sampled (trilinear) at ``a @ (i, 1)`` for every voxel index ``i`` (x first) of
    an output grid of ``shape`` ``(Z, Y, X)``: ``a`` ``(3, 4)`` maps an output index to the input's normalised
    coordinates. Returns ``[N, C, *shape]``: what ``grid_sample`` gives on that affine grid, without storing it."""
    mod = _k()
    out = torch.empty(input.shape[0], input.shape[1], *shape, dtype=torch.float32)
    am = np.ascontiguousarray(a, dtype=np.float64)
    for i in range(input.shape[0]):
        mod.sample_affine(_np(input[i]), am, out[i].numpy(), padding_mode == "border")
    return out


def compose(u: torch.Tensor, v: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    """Displacement of ``(id + u) ∘ (id + v)``, ``v + u(x + v(x))`` (border padding), for fields ``[N, 3, Z, Y, X]``
    in mm; ``m`` ``(3, 3)`` maps mm to voxel index offsets (x first)."""
    mod = _k()
    out = torch.empty(v.shape, dtype=torch.float32)
    mm = np.ascontiguousarray(m, dtype=np.float64)
    for i in range(v.shape[0]):
        mod.compose_fields(_np(u[min(i, u.shape[0] - 1)]), _np(v[i]), mm, out[i].numpy())
    return out


def jacobian_determinant(u: torch.Tensor, r: np.ndarray) -> torch.Tensor:
    """``det(I + ∂u/∂x)`` ``[N, 1, Z, Y, X]`` of mm displacements ``u`` ``[N, 3, Z, Y, X]`` in one pass;
    ``r[c, a] = D[c, a] / spacing[a]`` (physical component ``c``, index axis ``a``, x first)."""
    mod = _k()
    out = torch.empty(u.shape[0], 1, *u.shape[2:], dtype=torch.float32)
    rm = np.ascontiguousarray(r, dtype=np.float64)
    for i in range(u.shape[0]):
        mod.jacobian_determinant(_np(u[i]), rm, out[i, 0].numpy())
    return out


# point chunks of the Parzen histogram, each with a histogram of its own (summed in order afterwards)
PARZEN_CHUNKS = 16


def parzen_histogram(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, bins: int) -> torch.Tensor:
    """``maskreg.engine.losses``' unnormalised Parzen joint histogram (flat ``bins²``, float32) of points
    ``fixed, moving, weight`` (any shapes of ``N`` values, intensities in [0, 1]) in one pass."""
    mod = _k()
    f, m, w = (_np(t).reshape(-1) for t in (fixed, moving, weight))
    hists = _scratch("parzen", (PARZEN_CHUNKS, bins * bins))
    mod.parzen_histogram(f, m, w, bins, float(bins - 5), hists)
    return torch.from_numpy(hists.sum(0, dtype=np.float64).astype(np.float32))


def parzen_gradient(
    fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, cell: torch.Tensor, bins: int, scale: float
) -> torch.Tensor:
    """``scale · w · ∂mv/∂moving · Σ_j β₃'(mv − j) cell[fb, j]`` per point, shaped as ``moving``: a histogram
    loss's gradient in the moving values from its per-cell factor ``cell`` (``bins²``)."""
    mod = _k()
    f, m, w = (_np(t).reshape(-1) for t in (fixed, moving, weight))
    out = torch.empty(m.shape[0], dtype=torch.float32)
    mod.parzen_gradient(
        f,
        m,
        w,
        np.ascontiguousarray(cell.detach().reshape(-1).numpy(), dtype=np.float64),
        bins,
        float(bins - 5),
        float(scale),
        out.numpy(),
    )
    return out.reshape(moving.shape)


def add_gradient_product(
    out: torch.Tensor, s: torch.Tensor, dl: torch.Tensor, r: np.ndarray, alpha: float = 1.0
) -> None:
    """In place: ``out[:, k] += alpha · dl · Σ_a r[k, a] ∂s/∂index_a`` (``out`` ``[1, 3, Z, Y, X]`` contiguous
    float32; ``s``, ``dl`` one channel each); ``r[k, a] = D[k, a] / spacing[a]``, x first."""
    mod = _k()
    assert out.is_contiguous() and out.dtype == torch.float32
    mod.add_gradient_product(
        _as_czyx(s)[0], _as_czyx(dl)[0], np.ascontiguousarray(r, dtype=np.float64), float(alpha), out[0].numpy()
    )


def _as_czyx(t: torch.Tensor) -> np.ndarray:
    """``[B, C, *spatial]`` (2D or 3D) as a ``[B·C, Z, Y, X]`` array (``Z = 1`` in 2D)."""
    spatial = t.shape[2:]
    if len(spatial) == 2:
        spatial = (1, *spatial)
    return _np(t).reshape(-1, *spatial)


def filter_axis(t: torch.Tensor, kernel: tuple[float, ...], axis: int) -> torch.Tensor:
    """:func:`maskreg.engine.pyramid.filter_axis` (zero padding, same size) for ``[B, C, *spatial]`` on the CPU."""
    mod = _k()
    a = _as_czyx(t)
    ax = axis + (3 - (t.dim() - 2))  # 2D: spatial axes are (y, x) = array axes 1, 2
    out = np.empty_like(a)
    mod.filter_axis(a, np.asarray(kernel, dtype=np.float32), ax, out)
    return torch.from_numpy(out).reshape(t.shape)


def _slabs(planes: int, taps: int) -> int:
    """How many slabs of z planes a streamed kernel splits a volume into: one per thread, each at least as thick
    as its z kernel, so the planes a slab filters again beyond its ends (``taps - 1``) stay a small part."""
    import numba

    return max(1, min(numba.get_num_threads(), planes // taps))


def _blur_combine(
    a: np.ndarray, b: np.ndarray, alpha: float, beta: float, kernels: tuple[tuple[float, ...], ...], out: np.ndarray
) -> float:
    """``out = G * (alpha·a + beta·b)`` for ``[C, Z, Y, X]`` arrays, ``kernels`` per axis (z, y, x); returns the
    largest ``Σ_c out²`` (:func:`maskreg.engine._numba_filters.blur_combine`)."""
    mod = _k()  # first: it sets numba's thread count, which _slabs reads
    kz, ky, kx = (np.asarray(k, dtype=np.float32) for k in kernels)
    n = _slabs(a.shape[1], len(kz))
    maxsq = np.zeros(n, np.float64)
    mod.blur_combine(
        a,
        b,
        np.float32(alpha),
        np.float32(beta),
        kz,
        ky,
        kx,
        n,
        _scratch("blur_ring", (n, len(kz), a.shape[0], *a.shape[2:])),
        out,
        maxsq,
    )
    return float(maxsq.max())


def smooth_step(
    field: torch.Tensor,
    gradient: torch.Tensor,
    fluid: tuple[tuple[float, ...], ...],
    elastic: tuple[tuple[float, ...], ...],
    step: float,
    inv_spacing: float,
    gate: torch.Tensor | None = None,
) -> float:
    """One SyN velocity update in place, on fields ``[1, 3, Z, Y, X]`` (mm): ``d = G_fluid * (-gradient)``, scaled
    so its longest vector is ``step`` voxels (none where it is 0), times ``gate`` ``[1, 1, Z, Y, X]`` where given,
    then ``field = G_elastic * (field + d)``; the
    kernels per axis in tensor order (``pyramid.gaussian_kernels``). Returns the new field's longest vector in
    voxels (length in mm × ``inv_spacing``, the finest spacing's inverse). Two streamed passes
    (:func:`maskreg.engine._numba_filters.blur_combine`) instead of two blurs and six elementwise passes."""
    buf = field[0].numpy()
    g = _np(gradient[0])
    d = _scratch("step_d", buf.shape)
    out = _scratch("step_out", buf.shape)
    dmax = math.sqrt(_blur_combine(g, g, -1.0, 0.0, fluid, d)) * inv_spacing
    if gate is not None:
        d *= _np(gate[0])
    vmax = math.sqrt(_blur_combine(buf, d, 1.0, step / max(dmax, 1e-20), elastic, out)) * inv_spacing
    buf[...] = out
    return vmax


def resize(
    t: torch.Tensor,
    size: tuple[int, ...],
    ratios: tuple[float, ...] | None = None,
    offsets: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """``F.interpolate(t, size, mode="(bi|tri)linear", align_corners=True)`` for ``[B, C, *spatial]`` on the
    CPU, one axis at a time (the shrinking axes first, so later passes have less to do). With ``ratios`` and
    ``offsets`` (per spatial axis, tensor order): ``out[i] = t(i · ratio + offset)`` along each axis instead,
    positions clamped to the ends (border)."""
    mod = _k()
    a = _as_czyx(t)
    target = list(a.shape)
    pad = 3 - len(size)
    sizes = [1] * pad + list(size)
    if ratios is None:
        ratios = tuple((n - 1) / (m - 1) if m > 1 else 0.0 for n, m in zip(t.shape[2:], size, strict=False))
        offsets = (0.0,) * len(size)
    rs = [1.0] * pad + [float(r) for r in ratios]
    os_ = [0.0] * pad + [float(o) for o in offsets]
    order = sorted(range(3), key=lambda ax: sizes[ax] / a.shape[1 + ax])
    for ax in order:
        if sizes[ax] == a.shape[1 + ax] and rs[ax] == 1.0 and os_[ax] == 0.0:
            continue
        target[1 + ax] = sizes[ax]
        out = np.empty(target, np.float32)
        mod.resize_axis(a, ax, out, rs[ax], os_[ax])
        a = out
    if a.base is not None:  # no axis changed: a copy, as F.interpolate gives, never a view of ``t``
        a = a.copy()
    return torch.from_numpy(a).reshape(*t.shape[:2], *size)


class LocalCC:
    """The masked local squared CC of ``maskreg.engine.losses._LocalCC`` for one ``[1, 1, *spatial]`` pair: the
    loss now, both sides' gradients on request. ``sizes``: the (odd) window per spatial axis
    (``losses.window_sizes``); ``eps`` bounds the window weight, ``cc_eps`` the variance product, as in the torch
    code. Two streamed passes (:func:`maskreg.engine._numba_filters.cc_forward`, ``cc_backward``): no volume of
    products or window sums is stored, only the backward channels between the two, which is faster than
    products, box sums, terms and gradients as separate passes."""

    def __init__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        weight: torch.Tensor,
        sizes: list[int],
        eps: float,
        cc_eps: float,
    ):
        self.mod = _k()
        self.f, self.m, self.w = (_as_czyx(t)[0] for t in (fixed, moving, weight))
        sizes = [1] * (3 - len(sizes)) + list(sizes)  # 2D: a z axis of one voxel
        # window sums as filters with kernels of ones (the plane helpers of the streamed blur)
        self.ones = tuple(np.ones(k, np.float32) for k in sizes)
        self.inv_n = 1.0 / math.prod(sizes)
        self.eps, self.cc_eps = eps, cc_eps
        self.wsum = max(float(self.w.sum(dtype=np.float64)), eps)
        self.shape = fixed.shape
        self.nslabs = _slabs(self.f.shape[0], sizes[0])
        self.token = None

    def _ring(self, tag: str, channels: int) -> np.ndarray:
        return _scratch(tag, (self.nslabs, len(self.ones[0]), channels, *self.f.shape[1:]))

    def _check_owner(self) -> None:
        if getattr(_WORK, "cc_owner", None) != self.token:
            raise RuntimeError(
                "a newer LocalCC on this thread reused this one's work arrays: evaluate the "
                "loss and its gradients before the next local CC"
            )

    def loss(self, need_f: bool = False, need_m: bool = False) -> float:
        """``-Σ w·cc / Σ w``; with ``need_*`` also prepares that side's gradient terms (kept in this thread's
        scratch, which the newest LocalCC owns, until :meth:`gradients`)."""
        nb_ch = 1 + 3 * (need_f + need_m)
        self.token = _WORK.cc_owner = next(_TOKENS)
        self.terms = _scratch("cc_terms", (self.f.shape[0], nb_ch, *self.f.shape[1:]))  # plane-major
        per_slice = np.zeros(self.f.shape[0], np.float64)
        self.mod.cc_forward(
            self.f,
            self.m,
            self.w,
            *self.ones,
            self.inv_n,
            self.eps,
            self.cc_eps,
            self.nslabs,
            self._ring("cc_ring", 6),
            self.terms,
            per_slice,
            need_f,
            need_m,
        )
        self.need = (need_f, need_m)
        return -float(per_slice.sum()) / self.wsum

    def gradients(self, scale: float = 1.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(∂L/∂fixed, ∂L/∂moving)`` (``None`` for a side not prepared by :meth:`loss`), times ``scale``."""
        self._check_owner()
        need_f, need_m = self.need
        gf = np.empty_like(self.f) if need_f else np.empty((1, 1, 1), np.float32)
        gm = np.empty_like(self.m) if need_m else np.empty((1, 1, 1), np.float32)
        if need_f or need_m:
            self.mod.cc_backward(
                self.terms,
                self.f,
                self.m,
                self.w,
                *self.ones,
                self.inv_n,
                scale / self.wsum,
                self.nslabs,
                self._ring("cc_ring_b", self.terms.shape[1]),
                gf,
                gm,
                need_f,
                need_m,
            )
        return (
            torch.from_numpy(gf).reshape(self.shape) if need_f else None,
            torch.from_numpy(gm).reshape(self.shape) if need_m else None,
        )


def warm_up() -> bool:
    """Compile (or load from the cache) every kernel on tiny inputs; False when the kernels are off."""
    if _module() is None:
        return False
    x = torch.rand(1, 1, 4, 5, 6)
    sample(x, torch.rand(1, 2, 3, 4, 3) * 2 - 1, "zeros", with_inside=True)
    filter_axis(x, (0.25, 0.5, 0.25), 0)
    resize(x, (3, 7, 4))
    field = torch.zeros(1, 3, 4, 5, 6)
    sample_mapped(torch.rand(1, 2, 4, 5, 6), np.eye(3, 4), np.eye(3), field)
    compose(field, field, np.eye(3))
    sample_affine(x, np.eye(3, 4), (2, 3, 4), "border")
    jacobian_determinant(field, np.eye(3))
    pts = torch.rand(1, 1, 40)
    parzen_gradient(pts, pts, pts, parzen_histogram(pts, pts, pts, 16), 16, 1.0)
    add_gradient_product(field, x, x, np.eye(3))
    smooth_step(field, field, ((0.25, 0.5, 0.25),) * 3, ((1.0,),) * 3, 1.0, 1.0)
    cc = LocalCC(x, x.flip(-1), torch.ones_like(x), [3, 3, 3], 1e-6, 1e-5)
    cc.loss(True, True)
    cc.gradients()
    return True
