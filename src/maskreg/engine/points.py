"""Pointwise losses of a linear stage evaluated at jittered fixed-side points, with the gradient taken through
the moving image's gradient image instead of autograd through ``grid_sample``.

**Why jittered points.** Sampling the fixed image on its own voxel centres compares exact fixed values with
interpolated moving ones. Linear interpolation blurs the moving image (and its noise) by an amount that
depends on where each point falls between voxels, and the loss rewards transforms that change that blur:
masked Mattes MI started at a known true affine drifts away from it while its loss falls. With every point
moved by a uniform random offset inside its voxel (both images interpolated, as ITK's REGULAR sampling does)
the loss's minimum lies at the truth (``tests/test_points.py`` starts an affine at the truth of a known pair
and checks that it stays there). The offsets are drawn once per level (seeded), so the loss is a smooth,
deterministic function of the transform within a level, and an iteration reads no random numbers
(graph-safe, see :mod:`maskreg.engine.stepper`).

**Why gradient images.** A pointwise loss ``L(f, m, w)`` over points ``x_n`` with ``m_n = M(q_n)``,
``q_n = θ x̃_n`` (normalised moving coordinates, ``x̃ = (x, 1)``) has ``∂L/∂θ = Σ_n (∂L/∂m_n) ∇M(q_n) x̃_nᵀ``.
``∇M`` is sampled from central-difference gradient images (ITK's default for its v4 metrics) in the same
``grid_sample`` call as ``M`` and the moving mask, so an iteration is one forward sampling, the loss and
its gradient in the sampled values (closed form, :data:`maskreg.engine.losses.VALUE_AND_GRAD`: no autograd),
one ``(dim, N) @ (N, dim + 1)`` product, and the chain to the stage's parameters through ``θ`` (a graph of a
few matrix operations). No ``grid_sample`` backward runs, a sizeable part of an iteration's time on the CPU.

Conventions: fixed-side points are in the fixed level's normalised coordinates (``grid_sample``,
``align_corners=True``, ``(x, y[, z])``), ``θ`` ``(dim, dim + 1)`` maps them to the moving level's. The
weight of a point is ``m_f(x) · m_m(T(x)) · inside_moving(T(x))`` (constant in the gradient, as ANTs does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskreg.engine.sampling import grid_sample, grid_sample_inside


def _as_points(t: torch.Tensor) -> torch.Tensor:
    """``[1, C, N]`` values of a ``grid_sample`` on points laid out as ``[1, N, 1(, 1), dim]``."""
    return t.reshape(1, t.shape[1], -1)


def _point_grid(pts: torch.Tensor) -> torch.Tensor:
    """``(N, dim)`` normalised points as a ``grid_sample`` grid ``[1, N, 1(, 1), dim]``."""
    dim = pts.shape[1]
    return pts.reshape(1, -1, *([1] * (dim - 1)), dim)


def gradient_images(image: torch.Tensor) -> torch.Tensor:
    """``[1, dim, *spatial]``: ``∂I/∂q_a`` for ``a`` = x, y[, z] of ``image`` ``[1, 1, *spatial]``, in units of
    the normalised coordinate ``q_a = 2 i_a / (n_a − 1) − 1`` (central differences inside, one-sided at the
    ends; 0 along an axis of one voxel)."""
    spatial = image.shape[2:]
    dim = len(spatial)
    out = []
    for a in range(dim):  # x first: tensor axis dim - 1 - a
        axis = dim - 1 - a
        n = spatial[axis]
        if n < 2:
            out.append(torch.zeros_like(image[0, 0]))
            continue
        (g,) = torch.gradient(image[0, 0], dim=axis)  # per voxel index
        out.append(g * (0.5 * (n - 1)))
    return torch.stack(out)[None]


def voxel_points(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``(N,)`` of the voxels of ``mask`` ``[1, 1, *spatial]`` with weight > 0 and their normalised
    centres ``(N, dim)`` (x first)."""
    shape = mask.shape[2:]
    idx = torch.nonzero(mask.reshape(-1) > 0).reshape(-1)
    coords = []
    rem = idx
    for n in reversed(shape):  # x first
        coords.append(rem % n)
        rem = torch.div(rem, n, rounding_mode="floor")
    ijk = torch.stack(coords, 1).to(mask.dtype)
    sizes = torch.tensor(list(reversed(shape)), dtype=mask.dtype, device=mask.device)
    return idx, 2 * ijk / (sizes - 1).clamp_min(1) - 1


def jitter(points: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``points`` ``(N, dim)`` (normalised) each moved by a uniform offset within ±½ voxel per axis of a grid of
    tensor ``shape``; an axis of one voxel is not moved."""
    sizes = torch.tensor(list(reversed(shape)), dtype=points.dtype, device=points.device)
    half_voxel = torch.where(sizes > 1, 1.0 / (sizes - 1).clamp_min(1), torch.zeros_like(sizes))
    u = torch.rand(points.shape, generator=generator, device=points.device, dtype=points.dtype)
    return points + (2 * u - 1) * half_voxel


class PointLoss:
    """A pointwise loss (``mse``, ``mi``, ``nmi``) of one pyramid level at jittered points of the fixed mask.

    ``fixed``, ``fixed_mask``: the fixed level ``[1, 1, *spatial]`` (intensities normalised); ``moving``,
    ``moving_mask``: the moving level. ``random_n``: ``None`` to use every fixed-mask voxel (one jittered point
    each, drawn once), or ``n`` points drawn from the fixed mask's voxels (with replacement) and jittered anew
    at every call (not graph-safe: a random sampling iteration runs eagerly)."""

    def __init__(
        self,
        fixed: torch.Tensor,
        fixed_mask: torch.Tensor,
        moving: torch.Tensor,
        moving_mask: torch.Tensor,
        generator: torch.Generator,
        random_n: int | None = None,
        fraction: float = 1.0,
    ):
        self.shape = tuple(fixed.shape[2:])
        self.gen = generator
        self.random_n = random_n
        self.fixed_stack = torch.cat([fixed, fixed_mask], 1)
        # one sampling call gives the moving value, its mask and its gradient at every point
        self.moving_stack = torch.cat([moving, moving_mask, gradient_images(moving)], 1)
        _, self.centres = voxel_points(fixed_mask)
        self.mask_sum = float(fixed_mask.sum())
        self.mask_voxels = int(self.centres.shape[0])
        if not random_n and fraction < 1:
            n = self.centres.shape[0]
            keep = torch.randperm(n, generator=generator, device=self.centres.device)[: max(1, round(fraction * n))]
            self.centres = self.centres[keep.sort().values]  # kept in memory order: the sampling stays cache-friendly
        if not random_n:
            self.points, self.fixed_values, self.fixed_weight = self._fixed_side(self.centres)

    def _fixed_side(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Jittered points ``(N, dim + 1)`` (homogeneous), fixed values ``[1, 1, N]`` and fixed-mask weights."""
        pts = jitter(centres, self.shape, self.gen)
        fv = _as_points(grid_sample(self.fixed_stack, _point_grid(pts)))
        ones = torch.ones(pts.shape[0], 1, dtype=pts.dtype, device=pts.device)
        return torch.cat([pts, ones], 1), fv[:, :1], fv[:, 1:]

    @property
    def count(self) -> int:
        """Points per evaluation."""
        return int(self.random_n or self.centres.shape[0])

    def __call__(
        self, theta: torch.Tensor, value_and_grad: Callable[..., tuple[torch.Tensor, torch.Tensor]], **loss_kw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, ∂loss/∂θ)`` at ``theta`` ``(dim, dim + 1)`` (its graph is not used: detach it or not).
        ``value_and_grad(fixed, moving, weight, **loss_kw) -> (loss, ∂loss/∂moving)`` is the loss in closed
        form (:data:`maskreg.engine.losses.VALUE_AND_GRAD`)."""
        if self.random_n:
            sel = torch.randint(
                0, self.centres.shape[0], (self.random_n,), generator=self.gen, device=self.centres.device
            )
            pts, fixed_v, fixed_w = self._fixed_side(self.centres[sel])
        else:
            pts, fixed_v, fixed_w = self.points, self.fixed_values, self.fixed_weight
        theta = theta.detach()
        q = pts @ theta.T  # (N, dim): moving normalised coordinates
        s, ins = (_as_points(t) for t in grid_sample_inside(self.moving_stack, _point_grid(q)))  # [1, 2 + dim, N]
        w = fixed_w * s[:, 1:2] * ins
        loss, g = value_and_grad(fixed_v, s[:, :1], w, **loss_kw)
        # ∂L/∂θ[a, b] = Σ_n g_n ∂M/∂q_a(q_n) x̃_n[b]
        dtheta = (s[0, 2:] * g[0]) @ pts
        return loss, dtheta

    def overlap(self, theta: torch.Tensor) -> tuple[float, int]:
        """Effective overlap at ``theta`` in voxels of the level: the sum of the points' weights and the number
        of points with weight > 0.5, both scaled from the points to the whole fixed mask (exact with every voxel
        as a point, up to the jitter; an estimate for a fraction). Reads values back: not for iterations."""
        with torch.no_grad():
            pts, _, fixed_w = (
                (self.points, None, self.fixed_weight) if not self.random_n else self._fixed_side(self.centres)
            )
            q = pts @ theta.detach().T
            s, ins = (_as_points(t) for t in grid_sample_inside(self.moving_stack[:, 1:2], _point_grid(q)))
            w = fixed_w * s * ins
            to_mask = self.mask_sum / max(float(fixed_w.sum()), 1e-9)
            per_point = self.mask_voxels / pts.shape[0]
            return float(w.sum()) * to_mask, int(round(float((w > 0.5).sum()) * per_point))
