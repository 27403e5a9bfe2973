"""Numba kernels for filtering (separable Gaussian passes, the SyN update's blur, resizing) and local
correlation, behind :mod:`maskreg.engine.cpu_kernels`; conventions as in :mod:`maskreg.engine._numba_kernels`
(float32 ``[C, Z, Y, X]`` arrays, C order, results independent of the thread count)."""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True)


@nb.njit(fastmath=True, nogil=True, cache=True)
def _weighted_shifted_sum(src, dst, k, stride):  # pragma: no cover
    """``dst[p] = Σ_j k[j] src[p + (j - r)·stride]`` for ``r·stride <= p < n - r·stride`` of flat arrays of
    ``n`` (``r = len(k) // 2``): whole shifted views, four taps per sweep (the loops vectorise; one tap per
    sweep is bound by the stores)."""
    n = src.shape[0]
    r = k.shape[0] // 2
    m = n - 2 * r * stride
    if m <= 0:
        return
    out = dst[r * stride : r * stride + m]
    for i in range(m):
        out[i] = 0.0
    j = 0
    while j + 4 <= 2 * r + 1:
        v0, v1 = src[j * stride : j * stride + m], src[(j + 1) * stride : (j + 1) * stride + m]
        v2, v3 = src[(j + 2) * stride : (j + 2) * stride + m], src[(j + 3) * stride : (j + 3) * stride + m]
        w0, w1, w2, w3 = k[j], k[j + 1], k[j + 2], k[j + 3]
        for i in range(m):
            out[i] += w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i]
        j += 4
    while j < 2 * r + 1:
        v0 = src[j * stride : j * stride + m]
        w0 = k[j]
        for i in range(m):
            out[i] += w0 * v0[i]
        j += 1


@nb.njit(fastmath=True, nogil=True, cache=True)
def _filter_plane_xy(src, tmp, dst, ky, kx):  # pragma: no cover
    """``dst`` = the plane ``src`` ``[Y, X]`` filtered along x with ``kx`` then along y with ``ky`` (odd kernels,
    zero padding: taps past the edges add nothing); ``tmp`` is scratch. Each axis: whole-plane shifted sums,
    then the ``r`` columns or rows at each edge, which those mix with their neighbours, summed again."""
    Y, X = src.shape
    rx, ry = kx.shape[0] // 2, ky.shape[0] // 2
    _weighted_shifted_sum(src.ravel(), tmp.ravel(), kx, 1)
    for y in range(Y):
        for x in range(min(rx, X)):
            acc = np.float32(0.0)
            for sh in range(-x, min(rx, X - 1 - x) + 1):
                acc += kx[rx + sh] * src[y, x + sh]
            tmp[y, x] = acc
        for x in range(max(X - rx, rx), X):
            acc = np.float32(0.0)
            for sh in range(max(-rx, -x), X - x):
                acc += kx[rx + sh] * src[y, x + sh]
            tmp[y, x] = acc
    _weighted_shifted_sum(tmp.ravel(), dst.ravel(), ky, X)
    for y in range(Y):
        if y >= ry and y < Y - ry:
            continue
        for x in range(X):
            dst[y, x] = 0.0
        for sh in range(max(-ry, -y), min(ry, Y - 1 - y) + 1):
            w = ky[ry + sh]
            for x in range(X):
                dst[y, x] += w * tmp[y + sh, x]


@nb.njit(fastmath=True, nogil=True, cache=True)
def _ring_sum(ring, z, Z, kz, acc):  # pragma: no cover
    """``acc = Σ_s kz[r + s] · ring[(z + s) % K]`` over ``-r <= s <= r`` with ``0 <= z + s < Z`` (zero padding
    along z): one output plane of a filter along z, from a ring of ``K = len(kz)`` planes (each C-contiguous,
    like ``acc``) already filtered in y and x."""
    r = kz.shape[0] // 2
    k = ring.shape[0]
    a = acc.ravel()
    lo, hi = max(-r, -z), min(r, Z - 1 - z)
    v = ring[(z + lo) % k].ravel()
    w = kz[r + lo]
    for i in range(a.shape[0]):
        a[i] = w * v[i]
    for sh in range(lo + 1, hi + 1):
        v = ring[(z + sh) % k].ravel()
        w = kz[r + sh]
        for i in range(a.shape[0]):
            a[i] += w * v[i]


@nb.njit(**_JIT)
def cc_forward(
    f, m, w, ones_z, ones_y, ones_x, inv_n, eps, cc_eps, nslabs, ring, b, per_slice, need_f, need_m
):  # pragma: no cover
    """Masked local CC from ``f, m, w`` ``[Z, Y, X]`` in one streamed pass: each z plane's six products
    ``w, wf, wm, wf², wm², wfm`` are window-summed over y and x (the ``ones_*`` kernels, one per axis, as long
    as the window) into a ring of planes (``ring`` ``[nslabs, len(ones_z), 6, Y, X]``, scratch), each output
    plane's window sums are added from the ring, and the statistics go straight into ``per_slice[z] =
    Σ_{y,x} w·cc`` and the channels of the backward window sums ``b`` (``[Z, C, Y, X]``): ``wa`` first, then for
    the fixed side (``need_f``) ``wa·m̄, wb·v_m, wb·v_m·f̄``, then for the moving side ``wa·f̄, wb·v_f, wb·v_f·m̄``
    (see ``maskreg.engine.losses._LocalCC``). Slabs of planes run in parallel; every output is computed the same way
    whatever their number. No volume of products or sums is stored."""
    Z, Y, X = f.shape
    rz = ones_z.shape[0] // 2
    kz = 2 * rz + 1
    for t in prange(nslabs):
        z_lo, z_hi = t * Z // nslabs, (t + 1) * Z // nslabs
        rg = ring[t]
        prod = np.empty((6, Y, X), np.float32)
        tmp = np.empty((Y, X), np.float32)
        s = np.empty((6, Y, X), np.float32)
        nxt = max(0, z_lo - rz)  # the next plane to enter the ring
        for z in range(z_lo, z_hi):
            while nxt <= min(Z - 1, z + rz):
                for y in range(Y):
                    for x in range(X):
                        ww, ff, mm = w[nxt, y, x], f[nxt, y, x], m[nxt, y, x]
                        wf, wm = ww * ff, ww * mm
                        prod[0, y, x] = ww
                        prod[1, y, x] = wf
                        prod[2, y, x] = wm
                        prod[3, y, x] = wf * ff
                        prod[4, y, x] = wm * mm
                        prod[5, y, x] = wf * mm
                for c in range(6):
                    _filter_plane_xy(prod[c], tmp, rg[nxt % kz, c], ones_y, ones_x)
                nxt += 1
            _ring_sum(rg, z, Z, ones_z, s)
            acc = 0.0
            for y in range(Y):
                for x in range(X):
                    sw = max(s[0, y, x] * inv_n, eps)
                    q = inv_n / sw  # window sums -> weighted means
                    mf = s[1, y, x] * q
                    mm = s[2, y, x] * q
                    vf = max(s[3, y, x] * q - mf * mf, 0.0)
                    vm = max(s[4, y, x] * q - mm * mm, 0.0)
                    cov = s[5, y, x] * q - mf * mm
                    inv_d = 1.0 / (vf * vm + cc_eps)
                    ww = w[z, y, x]
                    cc = cov * cov * inv_d
                    acc += ww * cc
                    if need_f or need_m:
                        wa = ww * 2.0 * cov * inv_d / sw
                        wb2 = wa * cov * inv_d
                        b[z, 0, y, x] = wa
                        j = 1
                        if need_f:
                            b[z, 1, y, x] = wa * mm
                            b[z, 2, y, x] = wb2 * vm
                            b[z, 3, y, x] = wb2 * vm * mf
                            j = 4
                        if need_m:
                            b[z, j, y, x] = wa * mf
                            b[z, j + 1, y, x] = wb2 * vf
                            b[z, j + 2, y, x] = wb2 * vf * mm
            per_slice[z] = acc


@nb.njit(**_JIT)
def cc_backward(
    b, f, m, w, ones_z, ones_y, ones_x, inv_n, scale, nslabs, ring, gf, gm, need_f, need_m
):  # pragma: no cover
    """Both sides' CC gradients from :func:`cc_forward`'s channels ``b``, streamed as there (``ring``
    ``[nslabs, len(ones_z), C, Y, X]``, scratch): with ``K`` the window sums of ``b``, for a side with values
    ``this``, the other side's ``other`` and channels ``j .. j + 2``: ``g = -scale · w · (other·K₀ − K_j −
    this·K_{j+1} + K_{j+2}) / n``, into ``gf`` (``need_f``, ``j = 1``) and ``gm`` (``need_m``)."""
    Z, C, Y, X = b.shape
    rz = ones_z.shape[0] // 2
    kz = 2 * rz + 1
    jm = 4 if need_f else 1
    for t in prange(nslabs):
        z_lo, z_hi = t * Z // nslabs, (t + 1) * Z // nslabs
        rg = ring[t]
        tmp = np.empty((Y, X), np.float32)
        k = np.empty((C, Y, X), np.float32)
        nxt = max(0, z_lo - rz)
        for z in range(z_lo, z_hi):
            while nxt <= min(Z - 1, z + rz):
                for c in range(C):
                    _filter_plane_xy(b[nxt, c], tmp, rg[nxt % kz, c], ones_y, ones_x)
                nxt += 1
            _ring_sum(rg, z, Z, ones_z, k)
            for y in range(Y):
                for x in range(X):
                    c = -scale * w[z, y, x] * inv_n
                    ff, mm = f[z, y, x], m[z, y, x]
                    if need_f:
                        gf[z, y, x] = c * (mm * k[0, y, x] - k[1, y, x] - ff * k[2, y, x] + k[3, y, x])
                    if need_m:
                        gm[z, y, x] = c * (ff * k[0, y, x] - k[jm, y, x] - mm * k[jm + 1, y, x] + k[jm + 2, y, x])


@nb.njit(**_JIT)
def filter_axis(a, kernel, axis, out):  # pragma: no cover
    """``out[i] = Σ_s kernel[r + s] a[i + s]`` along ``axis`` (0: z, 1: y, 2: x) of ``a`` ``[C, Z, Y, X]``, zero
    padding (taps past the ends add nothing), ``r = len(kernel) // 2``."""
    C, Z, Y, X = a.shape
    r = kernel.shape[0] // 2
    for cz in prange(C * Z):
        c, z = cz // Z, cz % Z
        if axis == 0:  # whole planes streamed per tap
            out[c, z, :, :] = 0.0
            for s in range(max(-r, -z), min(r, Z - 1 - z) + 1):
                k = kernel[r + s]  # a local: the output's stores could alias ``kernel``, so a load would repeat
                for y in range(Y):
                    for x in range(X):
                        out[c, z, y, x] += k * a[c, z + s, y, x]
            continue
        for y in range(Y):  # rows zeroed and accumulated while in cache
            out[c, z, y, :] = 0.0
            if axis == 2:
                for s in range(-min(r, X - 1), min(r, X - 1) + 1):
                    k = kernel[r + s]
                    lo, hi = max(0, -s), min(X, X - s)
                    dst, src = out[c, z, y, lo:hi], a[c, z, y, lo + s : hi + s]  # views: indices from 0 vectorise
                    for i in range(hi - lo):
                        dst[i] += k * src[i]
            else:
                for s in range(max(-r, -y), min(r, Y - 1 - y) + 1):
                    k = kernel[r + s]
                    for x in range(X):
                        out[c, z, y, x] += k * a[c, z, y + s, x]


@nb.njit(**_JIT)
def blur_combine(a, b, alpha, beta, kz, ky, kx, nslabs, ring, out, maxsq):  # pragma: no cover
    """``out`` = ``alpha·a + beta·b`` (``[C, Z, Y, X]``) filtered along x, y and z with the odd kernels ``kx, ky,
    kz`` (zero padding), streamed: each z plane's channels filtered in x and y into a ring of ``len(kz)`` planes
    (``ring`` ``[nslabs, len(kz), C, Y, X]``, scratch), each output plane the ``kz``-weighted sum of the ring's
    planes: one read of the inputs and one write of ``out`` per voxel. ``maxsq[t]`` is the largest ``Σ_c out²``
    over slab ``t``'s voxels (a field's longest vector). Slabs of planes run in parallel."""
    C, Z, Y, X = a.shape
    rz = kz.shape[0] // 2
    kk = 2 * rz + 1
    n = Y * X
    for t in prange(nslabs):
        z_lo, z_hi = t * Z // nslabs, (t + 1) * Z // nslabs
        rg = ring[t]
        plane = np.empty((Y, X), np.float32)
        pf = plane.ravel()
        tmp = np.empty((Y, X), np.float32)
        acc = np.empty((C, Y, X), np.float32)
        af = acc.reshape(C, n)
        m = 0.0
        nxt = max(0, z_lo - rz)
        for z in range(z_lo, z_hi):
            while nxt <= min(Z - 1, z + rz):
                for c in range(C):
                    pa, pb = a[c, nxt].ravel(), b[c, nxt].ravel()
                    for i in range(n):
                        pf[i] = alpha * pa[i] + beta * pb[i]
                    _filter_plane_xy(plane, tmp, rg[nxt % kk, c], ky, kx)
                nxt += 1
            _ring_sum(rg, z, Z, kz, acc)
            for c in range(C):
                o = out[c, z].ravel()
                for i in range(n):
                    o[i] = af[c, i]
            for i in range(n):
                s = 0.0
                for c in range(C):
                    s += af[c, i] * af[c, i]
                m = max(m, s)
        maxsq[t] = m


@nb.njit(**_JIT)
def resize_axis(a, axis, out, ratio, offset):  # pragma: no cover
    """Linear interpolation of ``a`` ``[C, Z, Y, X]`` along ``axis`` onto ``out``'s length there:
    ``out[i] = a(i · ratio + offset)``, positions clamped to the ends (border). ``F.interpolate``'s
    ``align_corners=True`` is ``ratio = (n_in - 1) / (n_out - 1)``, ``offset = 0``."""
    C, Z, Y, X = out.shape
    n_in = a.shape[1 + axis]
    last = n_in - 1
    for cz in prange(C * Z):
        c, z = cz // Z, cz % Z
        if axis == 2:
            for y in range(Y):
                for x in range(X):
                    pos = min(max(x * ratio + offset, 0.0), last)
                    i0 = min(int(pos), last)
                    i1 = min(i0 + 1, last)
                    f = pos - i0
                    out[c, z, y, x] = (1.0 - f) * a[c, z, y, i0] + f * a[c, z, y, i1]
        elif axis == 1:
            for y in range(Y):
                pos = min(max(y * ratio + offset, 0.0), last)
                i0 = min(int(pos), last)
                i1 = min(i0 + 1, last)
                f = pos - i0
                for x in range(X):
                    out[c, z, y, x] = (1.0 - f) * a[c, z, i0, x] + f * a[c, z, i1, x]
        else:
            pos = min(max(z * ratio + offset, 0.0), last)
            i0 = min(int(pos), last)
            i1 = min(i0 + 1, last)
            f = pos - i0
            for y in range(Y):
                for x in range(X):
                    out[c, z, y, x] = (1.0 - f) * a[c, i0, y, x] + f * a[c, i1, y, x]
