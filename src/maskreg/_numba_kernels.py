"""Numba kernels behind :mod:`maskreg.cpu_kernels` (float32 numpy arrays, C order; see there for the contract).

Loops over voxels with the work split across threads by ``prange`` over the outer axis (or fixed chunks of
points), each output written by one thread in a fixed order, so results do not depend on the thread count.
Arrays are ``[C, Z, Y, X]`` (tensor order: x fastest); a 2D image is ``Z = 1``.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True)
# points are handed to threads in this many fixed runs (a multiple of any thread count we use)
POINT_CHUNKS = 256


@nb.njit(inline="always", fastmath=True)
def _interp(img, x, y, z, out, p):  # pragma: no cover
    """``out[:, p]`` = trilinear value of ``img`` ``[C, D, H, W]`` at the continuous index ``(x, y, z)``, zero
    padding (a corner outside the image adds 0)."""
    C, D, H, W = img.shape
    if not (x > -1.0 and x < W and y > -1.0 and y < H and z > -1.0 and z < D):
        for c in range(C):
            out[c, p] = 0.0
        return
    xf, yf, zf = math.floor(x), math.floor(y), math.floor(z)
    fx, fy, fz = x - xf, y - yf, z - zf
    x0, y0, z0 = int(xf), int(yf), int(zf)
    x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1
    # a corner outside the image gets weight 0 and a clamped (valid) index
    ax0 = (1.0 - fx) if x0 >= 0 else 0.0
    ax1 = fx if x1 < W else 0.0
    ay0 = (1.0 - fy) if y0 >= 0 else 0.0
    ay1 = fy if y1 < H else 0.0
    az0 = (1.0 - fz) if z0 >= 0 else 0.0
    az1 = fz if z1 < D else 0.0
    x0, y0, z0 = max(x0, 0), max(y0, 0), max(z0, 0)
    x1, y1, z1 = min(x1, W - 1), min(y1, H - 1), min(z1, D - 1)
    w000, w001, w010, w011 = az0 * ay0 * ax0, az0 * ay0 * ax1, az0 * ay1 * ax0, az0 * ay1 * ax1
    w100, w101, w110, w111 = az1 * ay0 * ax0, az1 * ay0 * ax1, az1 * ay1 * ax0, az1 * ay1 * ax1
    for c in range(C):
        out[c, p] = (w000 * img[c, z0, y0, x0] + w001 * img[c, z0, y0, x1]
                     + w010 * img[c, z0, y1, x0] + w011 * img[c, z0, y1, x1]
                     + w100 * img[c, z1, y0, x0] + w101 * img[c, z1, y0, x1]
                     + w110 * img[c, z1, y1, x0] + w111 * img[c, z1, y1, x1])


@nb.njit(**_JIT)
def sample_trilinear(img, grid, out, inside, border):  # pragma: no cover (compiled)
    """``out[c, p]`` = trilinear value of ``img[c]`` at normalised point ``grid[p] = (x, y, z)`` (align_corners:
    -1 and 1 are the centres of the first and last voxels). Zero padding: corners outside the image add 0;
    ``border``: the point is first clamped into the image. ``inside[p]`` (when it has ``P`` entries) is 1 where
    the point lies in ``[-1, 1]³`` (to 1e-6), else 0."""
    C, D, H, W = img.shape
    P = grid.shape[0]
    want_inside = inside.shape[0] == P
    sx, sy, sz = 0.5 * (W - 1), 0.5 * (H - 1), 0.5 * (D - 1)
    per = (P + POINT_CHUNKS - 1) // POINT_CHUNKS
    for chunk in prange(POINT_CHUNKS):
        for p in range(chunk * per, min(P, (chunk + 1) * per)):
            gx, gy, gz = grid[p, 0], grid[p, 1], grid[p, 2]
            if want_inside:
                ok = abs(gx) <= 1.000001 and abs(gy) <= 1.000001 and abs(gz) <= 1.000001
                inside[p] = 1.0 if ok else 0.0
            x, y, z = (gx + 1.0) * sx, (gy + 1.0) * sy, (gz + 1.0) * sz
            if border:
                x = min(max(x, 0.0), W - 1.0)
                y = min(max(y, 0.0), H - 1.0)
                z = min(max(z, 0.0), D - 1.0)
            _interp(img, x, y, z, out, p)


@nb.njit(**_JIT)
def box_sum(a, tmp, out, rz, ry, rx):  # pragma: no cover
    """``out`` = sums of ``a`` ``[C, Z, Y, X]`` over centred windows of ``2r + 1`` voxels per axis, zero padding
    (terms beyond the edges are absent). ``tmp`` is scratch of the same shape; ``a`` is left unchanged."""
    C, Z, Y, X = a.shape
    for cz in prange(C * Z):  # x: running sums along each row, a -> out
        c, z = cz // Z, cz % Z
        for y in range(Y):
            s = np.float32(0.0)
            for x in range(min(rx, X)):
                s += a[c, z, y, x]
            for x in range(X):
                if x + rx < X:
                    s += a[c, z, y, x + rx]
                if x - rx - 1 >= 0:
                    s -= a[c, z, y, x - rx - 1]
                out[c, z, y, x] = s
    for cz in prange(C * Z):  # y: whole rows added, out -> tmp
        c, z = cz // Z, cz % Z
        for y in range(Y):
            lo, hi = max(0, y - ry), min(Y - 1, y + ry)
            for x in range(X):
                tmp[c, z, y, x] = out[c, z, lo, x]
            for yy in range(lo + 1, hi + 1):
                for x in range(X):
                    tmp[c, z, y, x] += out[c, z, yy, x]
    for cz in prange(C * Z):  # z: whole planes' rows added, tmp -> out
        c, z = cz // Z, cz % Z
        lo, hi = max(0, z - rz), min(Z - 1, z + rz)
        for y in range(Y):
            for x in range(X):
                out[c, z, y, x] = tmp[c, lo, y, x]
            for zz in range(lo + 1, hi + 1):
                for x in range(X):
                    out[c, z, y, x] += tmp[c, zz, y, x]


@nb.njit(**_JIT)
def cc_products(f, m, w, a):  # pragma: no cover
    """The six channels whose window sums give the weighted local statistics: ``w, wf, wm, wf², wm², wfm``."""
    Z, Y, X = f.shape
    for z in prange(Z):
        for y in range(Y):
            for x in range(X):
                ww, ff, mm = w[z, y, x], f[z, y, x], m[z, y, x]
                wf, wm = ww * ff, ww * mm
                a[0, z, y, x] = ww
                a[1, z, y, x] = wf
                a[2, z, y, x] = wm
                a[3, z, y, x] = wf * ff
                a[4, z, y, x] = wm * mm
                a[5, z, y, x] = wf * mm


@nb.njit(**_JIT)
def cc_terms(s, w, inv_n, eps, cc_eps, b, per_slice, need_f, need_m):  # pragma: no cover
    """From the window sums ``s`` (6 channels, :func:`cc_products`), ``per_slice[z] = Σ_{y,x} w·cc`` and the
    channels of the backward box sums ``b`` (see ``maskreg.losses._LocalCC``): ``wa`` first, then for the fixed
    side (``need_f``) ``wa·m̄, wb·v_m, wb·v_m·f̄``, then for the moving side ``wa·f̄, wb·v_f, wb·v_f·m̄``."""
    Z, Y, X = w.shape
    for z in prange(Z):
        acc = 0.0
        for y in range(Y):
            for x in range(X):
                sw = max(s[0, z, y, x] * inv_n, eps)
                mf = s[1, z, y, x] * inv_n / sw
                mm = s[2, z, y, x] * inv_n / sw
                vf = max(s[3, z, y, x] * inv_n / sw - mf * mf, 0.0)
                vm = max(s[4, z, y, x] * inv_n / sw - mm * mm, 0.0)
                cov = s[5, z, y, x] * inv_n / sw - mf * mm
                d = vf * vm + cc_eps
                ww = w[z, y, x]
                acc += ww * (cov * cov / d)
                if need_f or need_m:
                    wa = ww * 2.0 * cov / (d * sw)
                    wb2 = ww * 2.0 * cov * cov / (d * d * sw)
                    b[0, z, y, x] = wa
                    j = 1
                    if need_f:
                        b[1, z, y, x] = wa * mm
                        b[2, z, y, x] = wb2 * vm
                        b[3, z, y, x] = wb2 * vm * mf
                        j = 4
                    if need_m:
                        b[j, z, y, x] = wa * mf
                        b[j + 1, z, y, x] = wb2 * vf
                        b[j + 2, z, y, x] = wb2 * vf * mm
        per_slice[z] = acc


@nb.njit(**_JIT)
def cc_gradient(k, this, other, w, j, inv_n, scale, g):  # pragma: no cover
    """``g = -scale · w · (other·B(wa) − B(wa·μ_o) − this·B(wb) + B(wb·μ_t))`` for one side, the box sums of
    :func:`cc_terms`'s channels ``0`` and ``j .. j + 2`` in ``k`` (sums; ``inv_n`` makes them means)."""
    Z, Y, X = w.shape
    for z in prange(Z):
        for y in range(Y):
            for x in range(X):
                t = (other[z, y, x] * k[0, z, y, x] - k[j, z, y, x] - this[z, y, x] * k[j + 1, z, y, x]
                     + k[j + 2, z, y, x])
                g[z, y, x] = -scale * w[z, y, x] * t * inv_n


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
                    dst, src = out[c, z, y, lo:hi], a[c, z, y, lo + s:hi + s]  # views: indices from 0 vectorise
                    for i in range(hi - lo):
                        dst[i] += k * src[i]
            else:
                for s in range(max(-r, -y), min(r, Y - 1 - y) + 1):
                    k = kernel[r + s]
                    for x in range(X):
                        out[c, z, y, x] += k * a[c, z, y + s, x]


@nb.njit(**_JIT)
def resize_axis(a, axis, out):  # pragma: no cover
    """Linear interpolation of ``a`` ``[C, Z, Y, X]`` along ``axis`` onto ``out``'s length there, the first and
    last samples of both aligned (``align_corners=True``): ``out[i] = a(i · (n_in - 1) / (n_out - 1))``."""
    C, Z, Y, X = out.shape
    n_in = a.shape[1 + axis]
    n_out = out.shape[1 + axis]
    ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for cz in prange(C * Z):
        c, z = cz // Z, cz % Z
        if axis == 2:
            for y in range(Y):
                for x in range(X):
                    pos = x * ratio
                    i0 = min(int(pos), n_in - 1)
                    i1 = min(i0 + 1, n_in - 1)
                    f = pos - i0
                    out[c, z, y, x] = (1.0 - f) * a[c, z, y, i0] + f * a[c, z, y, i1]
        elif axis == 1:
            for y in range(Y):
                pos = y * ratio
                i0 = min(int(pos), n_in - 1)
                i1 = min(i0 + 1, n_in - 1)
                f = pos - i0
                for x in range(X):
                    out[c, z, y, x] = (1.0 - f) * a[c, z, i0, x] + f * a[c, z, i1, x]
        else:
            pos = z * ratio
            i0 = min(int(pos), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            f = pos - i0
            for y in range(Y):
                for x in range(X):
                    out[c, z, y, x] = (1.0 - f) * a[c, i0, y, x] + f * a[c, i1, y, x]


@nb.njit(**_JIT)
def sample_mapped(img, a, m, u, out, inside):  # pragma: no cover
    """:func:`sample_trilinear` (zero padding, with ``inside``) at the points ``a @ (x, y, z, 1) + m @ u(x, y, z)``
    of every voxel ``(z, y, x)`` of the output grid: ``a`` ``(3, 4)`` maps an output voxel index (x first) to
    the image's normalised coordinates, ``m`` ``(3, 3)`` a displacement ``u`` ``[3, Z, Y, X]`` (mm, x first) to
    normalised offsets. ``out`` is ``[C, Z·Y·X]``; the sampling grid is never stored."""
    C, D, H, W = img.shape
    Z, Y, X = u.shape[1], u.shape[2], u.shape[3]
    sx, sy, sz = 0.5 * (W - 1), 0.5 * (H - 1), 0.5 * (D - 1)
    for z in prange(Z):
        for y in range(Y):
            bx = a[0, 1] * y + a[0, 2] * z + a[0, 3]
            by = a[1, 1] * y + a[1, 2] * z + a[1, 3]
            bz = a[2, 1] * y + a[2, 2] * z + a[2, 3]
            for x in range(X):
                u0, u1, u2 = u[0, z, y, x], u[1, z, y, x], u[2, z, y, x]
                gx = bx + a[0, 0] * x + m[0, 0] * u0 + m[0, 1] * u1 + m[0, 2] * u2
                gy = by + a[1, 0] * x + m[1, 0] * u0 + m[1, 1] * u1 + m[1, 2] * u2
                gz = bz + a[2, 0] * x + m[2, 0] * u0 + m[2, 1] * u1 + m[2, 2] * u2
                p = (z * Y + y) * X + x
                ok = abs(gx) <= 1.000001 and abs(gy) <= 1.000001 and abs(gz) <= 1.000001
                inside[p] = 1.0 if ok else 0.0
                _interp(img, (gx + 1.0) * sx, (gy + 1.0) * sy, (gz + 1.0) * sz, out, p)


@nb.njit(**_JIT)
def compose_fields(u, v, m, out):  # pragma: no cover
    """``out = v + u(x + v(x))`` per voxel, ``u`` interpolated trilinearly with border padding: the displacement
    of ``(id + u) ∘ (id + v)``. ``u, v, out`` ``[3, Z, Y, X]`` (mm, x first); ``m`` ``(3, 3)`` maps mm to voxel
    index offsets of this grid (x first)."""
    Z, Y, X = v.shape[1], v.shape[2], v.shape[3]
    flat = out.reshape(3, Z * Y * X)
    for z in prange(Z):
        for y in range(Y):
            for x in range(X):
                v0, v1, v2 = v[0, z, y, x], v[1, z, y, x], v[2, z, y, x]
                qx = min(max(x + m[0, 0] * v0 + m[0, 1] * v1 + m[0, 2] * v2, 0.0), X - 1.0)
                qy = min(max(y + m[1, 0] * v0 + m[1, 1] * v1 + m[1, 2] * v2, 0.0), Y - 1.0)
                qz = min(max(z + m[2, 0] * v0 + m[2, 1] * v1 + m[2, 2] * v2, 0.0), Z - 1.0)
                p = (z * Y + y) * X + x
                _interp(u, qx, qy, qz, flat, p)
                flat[0, p] += v0
                flat[1, p] += v1
                flat[2, p] += v2


@nb.njit(**_JIT)
def add_gradient_product(s, dl, r, alpha, out):  # pragma: no cover
    """``out[k] += alpha · dl · Σ_a r[k, a] ∂s/∂index_a`` for ``s, dl`` ``[Z, Y, X]``, ``out`` ``[3, Z, Y, X]``:
    the chain rule through a sampled channel's spatial gradient, with ``r[k, a] = D[k, a] / spacing[a]``
    (physical component ``k``, index axis ``a``, x first). Derivatives as ``torch.gradient``: central
    differences inside, one-sided at the edges, 0 along an axis of one voxel."""
    Z, Y, X = s.shape
    for z in prange(Z):
        z0, z1 = max(z - 1, 0), min(z + 1, Z - 1)
        hz = 1.0 / (z1 - z0) if z1 > z0 else 0.0
        for y in range(Y):
            y0, y1 = max(y - 1, 0), min(y + 1, Y - 1)
            hy = 1.0 / (y1 - y0) if y1 > y0 else 0.0
            for x in range(X):
                x0, x1 = max(x - 1, 0), min(x + 1, X - 1)
                hx = 1.0 / (x1 - x0) if x1 > x0 else 0.0
                dx = (s[z, y, x1] - s[z, y, x0]) * hx
                dy = (s[z, y1, x] - s[z, y0, x]) * hy
                dz = (s[z1, y, x] - s[z0, y, x]) * hz
                c = alpha * dl[z, y, x]
                out[0, z, y, x] += c * (r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz)
                out[1, z, y, x] += c * (r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz)
                out[2, z, y, x] += c * (r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz)
