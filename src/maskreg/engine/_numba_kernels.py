"""Numba kernels behind :mod:`maskreg.engine.cpu_kernels` (float32 numpy arrays, C order; see there for the contract).

Loops over voxels with the work split across threads by ``prange`` over the outer axis (or fixed chunks of
points), each output written by one thread in a fixed order, so results do not depend on the thread count.
Arrays are ``[C, Z, Y, X]`` (tensor order: x fastest); a 2D image is ``Z = 1``.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

# the filters and local correlation live in their own module; cpu_kernels finds every kernel here
from maskreg.engine._numba_filters import blur_combine, cc_backward, cc_forward, filter_axis, resize_axis  # noqa: F401

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
        out[c, p] = (
            w000 * img[c, z0, y0, x0]
            + w001 * img[c, z0, y0, x1]
            + w010 * img[c, z0, y1, x0]
            + w011 * img[c, z0, y1, x1]
            + w100 * img[c, z1, y0, x0]
            + w101 * img[c, z1, y0, x1]
            + w110 * img[c, z1, y1, x0]
            + w111 * img[c, z1, y1, x1]
        )


@nb.njit(inline="always", fastmath=True)
def _interp_at(img, flat, x, y, z, out, p):  # pragma: no cover
    """:func:`_interp` with a branch-free path for points whose eight corners all lie in the image (nearly all
    of them, so the sampling passes run faster); ``flat`` is ``img`` as one ``[C · D · H · W]`` array."""
    C, D, H, W = img.shape
    if x >= 0.0 and y >= 0.0 and z >= 0.0 and x < W - 1 and y < H - 1 and z < D - 1:
        x0, y0, z0 = int(x), int(y), int(z)  # truncation is floor here
        fx, fy, fz = x - x0, y - y0, z - z0
        gx = 1.0 - fx
        w00, w01 = (1.0 - fz) * (1.0 - fy), (1.0 - fz) * fy
        w10, w11 = fz * (1.0 - fy), fz * fy
        hw = H * W
        i = (z0 * H + y0) * W + x0
        for c in range(C):
            out[c, p] = (
                w00 * (gx * flat[i] + fx * flat[i + 1])
                + w01 * (gx * flat[i + W] + fx * flat[i + W + 1])
                + w10 * (gx * flat[i + hw] + fx * flat[i + hw + 1])
                + w11 * (gx * flat[i + hw + W] + fx * flat[i + hw + W + 1])
            )
            i += D * hw
        return
    _interp(img, x, y, z, out, p)


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
    flat = img.ravel()
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
            _interp_at(img, flat, x, y, z, out, p)


@nb.njit(**_JIT)
def sample_mapped(img, a, m, u, out, weight, prior, lo, hi):  # pragma: no cover
    """:func:`sample_trilinear` (zero padding) at the points ``a @ (x, y, z, 1) + m @ u(x, y, z)`` of every voxel
    ``(z, y, x)`` of the output grid: ``a`` ``(3, 4)`` maps an output voxel index (x first) to the image's
    normalised coordinates, ``m`` ``(3, 3)`` a displacement ``u`` ``[3, Z, Y, X]`` (mm, x first) to normalised
    offsets. ``out`` is ``[C, Z·Y·X]``; the sampling grid is never stored. ``weight[p]`` = the sampled channel 1
    (the mask) where the point lies inside the image (else 0), times ``prior[p]`` when ``prior`` has an entry
    per point. Only the voxels ``lo[z, y] <= x < hi[z, y]`` of each row are sampled; the others get 0 in
    ``out`` and ``weight``."""
    C, D, H, W = img.shape
    Z, Y, X = u.shape[1], u.shape[2], u.shape[3]
    sx, sy, sz = 0.5 * (W - 1), 0.5 * (H - 1), 0.5 * (D - 1)
    flat = img.ravel()
    with_prior = prior.shape[0] == Z * Y * X
    for z in prange(Z):
        for y in range(Y):
            row = (z * Y + y) * X
            x0, x1 = max(lo[z, y], 0), min(hi[z, y], X)
            if x1 < x0:
                x1 = x0
            for p in range(row, row + x0):
                weight[p] = 0.0
                for c in range(C):
                    out[c, p] = 0.0
            for p in range(row + x1, row + X):
                weight[p] = 0.0
                for c in range(C):
                    out[c, p] = 0.0
            bx = a[0, 1] * y + a[0, 2] * z + a[0, 3]
            by = a[1, 1] * y + a[1, 2] * z + a[1, 3]
            bz = a[2, 1] * y + a[2, 2] * z + a[2, 3]
            for x in range(x0, x1):
                u0, u1, u2 = u[0, z, y, x], u[1, z, y, x], u[2, z, y, x]
                gx = bx + a[0, 0] * x + m[0, 0] * u0 + m[0, 1] * u1 + m[0, 2] * u2
                gy = by + a[1, 0] * x + m[1, 0] * u0 + m[1, 1] * u1 + m[1, 2] * u2
                gz = bz + a[2, 0] * x + m[2, 0] * u0 + m[2, 1] * u1 + m[2, 2] * u2
                p = row + x
                _interp_at(img, flat, (gx + 1.0) * sx, (gy + 1.0) * sy, (gz + 1.0) * sz, out, p)
                ok = abs(gx) <= 1.000001 and abs(gy) <= 1.000001 and abs(gz) <= 1.000001
                wp = out[1, p] if ok else 0.0
                weight[p] = wp * prior[p] if with_prior else wp


@nb.njit(**_JIT)
def sample_affine(img, a, out, border):  # pragma: no cover
    """:func:`sample_trilinear` at the points ``a @ (x, y, z, 1)`` of every voxel ``(z, y, x)`` of the output
    grid (``out`` ``[C, Z, Y, X]``): ``a`` ``(3, 4)`` maps an output voxel index (x first) to the image's
    normalised coordinates. Zero padding, or with ``border`` the point clamped into the image first."""
    C, D, H, W = img.shape
    Z, Y, X = out.shape[1], out.shape[2], out.shape[3]
    sx, sy, sz = 0.5 * (W - 1), 0.5 * (H - 1), 0.5 * (D - 1)
    flat = img.ravel()
    res = out.reshape(C, Z * Y * X)
    for z in prange(Z):
        for y in range(Y):
            bx = a[0, 1] * y + a[0, 2] * z + a[0, 3]
            by = a[1, 1] * y + a[1, 2] * z + a[1, 3]
            bz = a[2, 1] * y + a[2, 2] * z + a[2, 3]
            for x in range(X):
                px = ((bx + a[0, 0] * x) + 1.0) * sx
                py = ((by + a[1, 0] * x) + 1.0) * sy
                pz = ((bz + a[2, 0] * x) + 1.0) * sz
                if border:
                    px = min(max(px, 0.0), W - 1.0)
                    py = min(max(py, 0.0), H - 1.0)
                    pz = min(max(pz, 0.0), D - 1.0)
                _interp_at(img, flat, px, py, pz, res, (z * Y + y) * X + x)


@nb.njit(**_JIT)
def compose_fields(u, v, m, out):  # pragma: no cover
    """``out = v + u(x + v(x))`` per voxel, ``u`` interpolated trilinearly with border padding: the displacement
    of ``(id + u) ∘ (id + v)``. ``u, v, out`` ``[3, Z, Y, X]`` (mm, x first); ``m`` ``(3, 3)`` maps mm to voxel
    index offsets of this grid (x first)."""
    Z, Y, X = v.shape[1], v.shape[2], v.shape[3]
    flat = out.reshape(3, Z * Y * X)
    uflat = u.ravel()
    for z in prange(Z):
        for y in range(Y):
            for x in range(X):
                v0, v1, v2 = v[0, z, y, x], v[1, z, y, x], v[2, z, y, x]
                qx = min(max(x + m[0, 0] * v0 + m[0, 1] * v1 + m[0, 2] * v2, 0.0), X - 1.0)
                qy = min(max(y + m[1, 0] * v0 + m[1, 1] * v1 + m[1, 2] * v2, 0.0), Y - 1.0)
                qz = min(max(z + m[2, 0] * v0 + m[2, 1] * v1 + m[2, 2] * v2, 0.0), Z - 1.0)
                p = (z * Y + y) * X + x
                _interp_at(u, uflat, qx, qy, qz, flat, p)
                flat[0, p] += v0
                flat[1, p] += v1
                flat[2, p] += v2


@nb.njit(inline="always")
def _span(i, n):  # pragma: no cover
    """The neighbours ``(lo, hi)`` of index ``i`` on an axis of ``n`` for a difference as ``torch.gradient``
    takes it (central inside, one-sided at the edges) and ``1 / (hi - lo)`` (0 on an axis of one voxel)."""
    lo, hi = max(i - 1, 0), min(i + 1, n - 1)
    return lo, hi, (1.0 / (hi - lo) if hi > lo else 0.0)


@nb.njit(inline="always")
def _index_gradient(s, z, y, x, zs, ys, xs):  # pragma: no cover
    """``(∂s/∂x, ∂s/∂y, ∂s/∂z)`` per voxel index of ``s`` ``[Z, Y, X]`` at ``(z, y, x)``, spans from :func:`_span`."""
    return (
        (s[z, y, xs[1]] - s[z, y, xs[0]]) * xs[2],
        (s[z, ys[1], x] - s[z, ys[0], x]) * ys[2],
        (s[zs[1], y, x] - s[zs[0], y, x]) * zs[2],
    )


@nb.njit(**_JIT)
def add_gradient_product(s, dl, r, alpha, out):  # pragma: no cover
    """``out[k] += alpha · dl · Σ_a r[k, a] ∂s/∂index_a`` for ``s, dl`` ``[Z, Y, X]``, ``out`` ``[3, Z, Y, X]``:
    the chain rule through a sampled channel's spatial gradient, with ``r[k, a] = D[k, a] / spacing[a]``
    (physical component ``k``, index axis ``a``, x first). Derivatives as ``torch.gradient``: central
    differences inside, one-sided at the edges, 0 along an axis of one voxel."""
    Z, Y, X = s.shape
    for z in prange(Z):
        zs = _span(z, Z)
        for y in range(Y):
            ys = _span(y, Y)
            for x in range(X):
                dx, dy, dz = _index_gradient(s, z, y, x, zs, ys, _span(x, X))
                c = alpha * dl[z, y, x]
                out[0, z, y, x] += c * (r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz)
                out[1, z, y, x] += c * (r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz)
                out[2, z, y, x] += c * (r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz)


@nb.njit(**_JIT)
def jacobian_determinant(u, r, out):  # pragma: no cover
    """``out`` ``[Z, Y, X]`` = det(I + ∂u/∂x) of the displacement ``u`` ``[3, Z, Y, X]`` (mm, x first), with
    ``∂u_k/∂x_c = Σ_a r[c, a] ∂u_k/∂index_a``, ``r[c, a] = D[c, a] / spacing[a]``; derivatives as in
    :func:`add_gradient_product` (central inside, one-sided at the edges)."""
    Z, Y, X = u.shape[1], u.shape[2], u.shape[3]
    u0, u1, u2 = u[0], u[1], u[2]
    for z in prange(Z):
        zs = _span(z, Z)
        for y in range(Y):
            ys = _span(y, Y)
            for x in range(X):
                xs = _span(x, X)
                # row k of the Jacobian: the index gradient of u_k through r, plus the identity
                dx, dy, dz = _index_gradient(u0, z, y, x, zs, ys, xs)
                a00 = 1.0 + r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz
                a01 = r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz
                a02 = r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz
                dx, dy, dz = _index_gradient(u1, z, y, x, zs, ys, xs)
                a10 = r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz
                a11 = 1.0 + r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz
                a12 = r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz
                dx, dy, dz = _index_gradient(u2, z, y, x, zs, ys, xs)
                a20 = r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz
                a21 = r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz
                a22 = 1.0 + r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz
                out[z, y, x] = (
                    a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20) + a02 * (a10 * a21 - a11 * a20)
                )


@nb.njit(inline="always")
def _parzen_bins(f, m, usable):  # pragma: no cover
    """Mattes' binning of one point (``maskreg.engine.losses._bin_coordinates``): the fixed bin (nearest, half to even),
    the moving bin coordinate's floor and fractional part, and ``∂mv/∂m`` (0 where the clamp holds)."""
    fb = int(np.rint(min(max(f, 0.0), 1.0) * usable + 2.0))
    mv = min(max(m, 0.0), 1.0) * usable + 2.0
    base = math.floor(mv)
    return fb, int(base), mv - base, (usable if (m > 0.0 and m < 1.0) else 0.0)


@nb.njit(**_JIT)
def parzen_histogram(f, m, w, bins, usable, hists):  # pragma: no cover
    """Unnormalised Parzen joint histograms of the points ``f, m, w`` ``[N]``: ``hists[k]`` (``[K, bins²]``, set
    here) holds chunk ``k``'s sum of ``w · β₃(mv − j)`` over the moving bins ``j = floor(mv) − 1 .. + 2`` in row
    ``fb``; the caller adds the ``K`` rows in order (the same sum whatever the thread count)."""
    n = f.shape[0]
    chunks = hists.shape[0]
    per = (n + chunks - 1) // chunks
    for k in prange(chunks):
        h = hists[k]
        h[:] = 0.0
        for p in range(k * per, min(n, (k + 1) * per)):
            fb, base, t, _ = _parzen_bins(f[p], m[p], usable)
            t2 = t * t
            t3 = t2 * t
            s = 1.0 - t
            i = fb * bins + base - 1
            wp = w[p] / 6.0
            h[i] += wp * s * s * s
            h[i + 1] += wp * (3.0 * t3 - 6.0 * t2 + 4.0)
            h[i + 2] += wp * (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0)
            h[i + 3] += wp * t3


@nb.njit(**_JIT)
def parzen_gradient(f, m, w, cell, bins, usable, scale, out):  # pragma: no cover
    """``out[p] = scale · w · ∂mv/∂m · Σ_j β₃'(mv − j) cell[fb · bins + j]`` per point: the gradient of a loss
    of the Parzen histogram in each moving value, given the loss's per-cell factor ``cell`` ``[bins²]``."""
    n = f.shape[0]
    per = (n + POINT_CHUNKS - 1) // POINT_CHUNKS
    for k in prange(POINT_CHUNKS):
        for p in range(k * per, min(n, (k + 1) * per)):
            fb, base, t, dmv = _parzen_bins(f[p], m[p], usable)
            t2 = t * t
            s = 1.0 - t
            i = fb * bins + base - 1
            g = (
                -0.5 * s * s * cell[i]
                + (1.5 * t2 - 2.0 * t) * cell[i + 1]
                + (0.5 + t - 1.5 * t2) * cell[i + 2]
                + 0.5 * t2 * cell[i + 3]
            )
            out[p] = scale * w[p] * dmv * g
