"""Deformable stages: ``greedy`` (compositive displacement updates) and ``syn`` (symmetric, diffeomorphic).

Fields live on a pyramid level's fixed grid as tensors ``[1, dim, *shape]`` holding physical displacements
in LPS mm, components in ``(x, y[, z])`` order. The full map from fixed to moving points is
``T(x) = L(x + u(x))``: the field first, then the linear transform ``L`` found by the earlier stages (ITK's
composite order, ANTs' ``[warp.nii.gz, affine.mat]``).

* ``greedy``: each iteration takes the masked loss's gradient with respect to ``u``, smooths it (the
  *fluid* sigma), scales it to a maximum step in voxels, composes it with the current map
  (``φ ← φ ∘ (id + d)``) and smooths the field (the *elastic* sigma). Its inverse is computed by
  fixed-point iteration.
* ``syn``: a stationary velocity field ``v``; both images move half-way, ``F(exp(-v/2)(x))`` against
  ``M(L(exp(v/2)(x)))``, so neither is privileged. The update uses the gradients with respect to the two
  half-way displacements, ``½(∂/∂u₊ − ∂/∂u₋)`` (the log-domain demons approximation), smoothed and scaled
  as for ``greedy``. Forward ``exp(v)`` and inverse ``exp(-v)`` come from scaling and squaring, so the map
  is a diffeomorphism up to the field's discretisation.

In both, the gradient with respect to a displacement is the loss's gradient in the sampled image times that
warped image's spatial gradient on the level grid (:meth:`FieldOps.spatial_gradient`; ANTs and greedy take
the same), not the backward pass of ``grid_sample``; the mask enters as a constant weight.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels
from maskreg.engine.grid import Grid
from maskreg.engine.pyramid import gaussian_blur, gaussian_kernels, gaussian_weights, resample
from maskreg.engine.sampling import grid_sample
from maskreg.stages import DEFORMABLE_DEFAULTS, DEFORMABLE_STAGES, TYPE_DEFAULTS  # noqa: F401 (defined there)

# scaling and squaring inside the SyN iterations runs on a grid of about half the resolution once a level has
# this many voxels (see FieldOps.exp_pair_in_iteration)
COARSE_EXP_MIN_VOXELS = 1 << 16


def _mix(components: list[torch.Tensor], m: np.ndarray) -> list[torch.Tensor]:
    """``out_i = Σ_j m[i, j] components_j`` for a host matrix ``m``: elementwise multiply-adds with its entries
    as scalars, zeros skipped (one multiply per output on axis-aligned grids). No cuBLAS call, so no per-stream
    cuBLAS workspace and nothing to sync in a CUDA graph, and as fast as a batched matrix product."""
    tol = 1e-12 * float(np.abs(m).max())
    out = []
    for i in range(m.shape[0]):
        acc = None
        for j, comp in enumerate(components):
            c = float(m[i, j])
            if abs(c) <= tol:
                continue
            acc = comp * c if acc is None else acc.add_(comp, alpha=c)
        out.append(torch.zeros_like(components[0]) if acc is None else acc)
    return out


class _AxisResampler:
    """Linear resampling of ``[N, C, *in_shape]`` tensors onto ``out_shape`` one spatial axis at a time:
    ``out[i] = t(i · ratio + offset)`` along each axis (tensor order), positions clamped to the ends (border). The
    compiled kernel on the CPU; elsewhere taps made once here, so a call is ``index_select`` and ``lerp`` only
    (no host → device copy: graph-safe, see :mod:`maskreg.engine.stepper`)."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        ratios: tuple[float, ...],
        offsets: tuple[float, ...],
        device: torch.device,
    ):
        self.out_shape = tuple(out_shape)
        self.ratios, self.offsets = tuple(ratios), tuple(offsets)
        self.taps = []
        for axis, (n_in, n_out, r, o) in enumerate(zip(in_shape, out_shape, ratios, offsets, strict=False)):
            if n_in == n_out and r == 1.0 and o == 0.0:
                continue
            pos = np.clip(np.arange(n_out) * r + o, 0.0, n_in - 1)
            i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
            i1 = np.minimum(i0 + 1, n_in - 1)
            view = [1] * (len(in_shape) + 2)
            view[2 + axis] = n_out
            self.taps.append(
                (
                    2 + axis,
                    torch.as_tensor(i0, device=device),
                    torch.as_tensor(i1, device=device),
                    torch.as_tensor(pos - i0, dtype=torch.float32, device=device).reshape(view),
                )
            )

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.enabled(t):
            return cpu_kernels.resize(t, self.out_shape, self.ratios, self.offsets)
        for ax, i0, i1, frac in self.taps:
            t = torch.lerp(t.index_select(ax, i0), t.index_select(ax, i1), frac)
        return t


class FieldOps:
    """Operations on displacement fields of one level grid (identity grid and mm → normalised map cached)."""

    def __init__(
        self,
        grid: Grid,
        device: torch.device,
        coarse_exp: bool = False,
        open_faces: tuple[tuple[bool, bool], ...] | None = None,
    ):
        """``open_faces``: per tensor axis, whether the field goes on past the low and the high face (``grid``
        is a box cut from a larger grid, whose field beyond the box repeats the face values): the elastic
        smoothing then pads those faces by repetition, not with zeros (see :meth:`smooth_field`)."""
        self.grid = grid
        dim = grid.dim
        self.dim = dim
        self.open_faces = tuple(open_faces or ((False, False),) * dim)
        self.to_norm = grid.physical_to_normalised()[:dim, :dim]  # numpy: mm -> normalised, per component
        self.device = device
        # mm -> voxels of this grid per component (for step sizes): |D^T u| / spacing
        self.spacing = torch.as_tensor(grid.spacing, dtype=torch.float32, device=device)
        self.to_index = grid.physical_to_index()[:dim, :dim]  # numpy: mm -> voxel index offsets (x first)
        # numpy: physical gradient component k from the derivative along index axis a, D[k, a] / spacing[a]
        self.index_to_physical_gradient = grid.direction_matrix / np.asarray(grid.spacing)[None, :]
        self.coarse: FieldOps | None = None
        if coarse_exp and grid.voxel_count() >= COARSE_EXP_MIN_VOXELS:
            fine = min(grid.spacing)
            halve = tuple(n >= 32 and s <= 2.0 * fine for n, s in zip(grid.size, grid.spacing, strict=False))  # x-first
            if any(halve):
                # every other voxel of the lattice anchored at the world origin (Grid.lattice_pads): coarse point j
                # is fine voxel 2j - p (p = 0 or 1), from at or before the first voxel to at or past the last, so
                # a box cut from a larger grid, or a crop of the image, gets the same coarse points
                pads = grid.lattice_pads(tuple(2 if h else 1 for h in halve))
                size = tuple(
                    math.ceil((n - 1 + p) / 2) + 1 if h else n for n, p, h in zip(grid.size, pads, halve, strict=False)
                )
                spacing = tuple(2.0 * s if h else s for s, h in zip(grid.spacing, halve, strict=False))
                origin = grid.index_to_physical()[:dim] @ np.append(-np.asarray(pads, dtype=np.float64), 1.0)
                self.coarse = FieldOps(Grid(size, spacing, tuple(float(v) for v in origin), grid.direction), device)
                p_t, h_t = tuple(reversed(pads)), tuple(reversed(halve))  # tensor order
                self._to_coarse = _AxisResampler(
                    grid.shape,
                    self.coarse.grid.shape,
                    tuple(2.0 if h else 1.0 for h in h_t),
                    tuple(-float(p) for p in p_t),
                    device,
                )
                self._to_fine = _AxisResampler(
                    self.coarse.grid.shape,
                    grid.shape,
                    tuple(0.5 if h else 1.0 for h in h_t),
                    tuple(p / 2.0 for p in p_t),
                    device,
                )

    @functools.cached_property
    def identity(self) -> torch.Tensor:
        """``[1, *shape, dim]`` normalised coordinates of this grid's voxels (``affine_grid`` of the identity),
        made on first use: the compiled CPU paths never need it, and it is a full-size tensor to build."""
        eye = torch.eye(self.dim, self.dim + 1, dtype=torch.float32, device=self.device)[None]
        return F.affine_grid(eye, [1, 1, *self.grid.shape], align_corners=True)

    def offsets(self, u: torch.Tensor, matrix: np.ndarray | None = None) -> torch.Tensor:
        """``[1, *shape, dim]`` normalised offsets of the mm displacement ``u`` through ``matrix`` (a host
        ``dim x dim`` array; default: this grid's mm → normalised map)."""
        m = self.to_norm if matrix is None else matrix
        return torch.stack(_mix([u[:, j] for j in range(self.dim)], m), dim=-1)

    def spatial_gradient(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, C, *shape]`` → ``[N, C·dim, *shape]``: each channel's gradient in physical (LPS) space, per
        mm, components ``(x, y[, z])`` per channel (central differences inside, one-sided at the edges;
        direction cosines and spacing included). Elementwise work only (graph-safe, no cuBLAS)."""
        dim = self.dim
        # derivative along index axis a (x first) in units per mm: tensor axis 2 + dim - 1 - a
        d = [torch.gradient(t, dim=2 + dim - 1 - a)[0] * (1.0 / self.grid.spacing[a]) for a in range(dim)]
        # physical component k = Σ_a D[k, a] ∂/∂index_a (column a of D: index axis a's direction)
        m = self.grid.direction_matrix
        return torch.stack([g for c in range(t.shape[1]) for g in _mix([da[:, c] for da in d], m)], dim=1)

    def sample(self, t: torch.Tensor, u: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
        """``t`` (on this grid) sampled at ``x + u(x)``."""
        return grid_sample(t, self.identity + self.offsets(u), padding_mode=padding_mode)

    def compose(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Displacement of ``(id + u) ∘ (id + v)``: ``v(x) + u(x + v(x))`` (3D CPU: one compiled pass, no sampling
        grid stored)."""
        if self.dim == 3 and cpu_kernels.enabled(u, v):
            return cpu_kernels.compose(u, v, self.to_index)
        return v + self.sample(u, v)

    def max_voxels(self, u: torch.Tensor) -> float:
        """An upper bound of ``max |u|`` in voxels of this grid: the largest length in mm over the finest
        spacing (exact for isotropic grids)."""
        return float(self.max_voxels_t(u.detach()))

    def max_voxels_t(self, u: torch.Tensor) -> torch.Tensor:
        """:meth:`max_voxels` as a 0-dim tensor on ``u``'s device (no read-back)."""
        return u.pow(2).sum(1).max().sqrt() / self.spacing.min()

    @staticmethod
    def squarings(vmax_vox: float, max_step_vox: float = 0.5) -> int:
        """Squarings for :meth:`exp` of a field whose largest vector is ``vmax_vox`` voxels long."""
        return max(0, math.ceil(math.log2(max(vmax_vox / max_step_vox, 1.0))))

    def exp(self, v: torch.Tensor, squarings: int | None = None, max_step_vox: float = 0.5) -> torch.Tensor:
        """Displacement of ``exp(v)`` by scaling and squaring: ``squarings`` of them, by default enough that
        the first step is at most ``max_step_vox`` voxels (``exp(v) ∘ exp(-v)`` is then the identity to a small
        fraction of a voxel, and each extra squaring would cost a full-grid resampling of the field per call).

        ``v`` may hold several fields (``[N, dim, *shape]``): they are exponentiated in the same calls, which
        is how :meth:`exp_pair` gets ``exp(±v)`` at once (on the CPU ``grid_sample`` runs one thread per
        batch item, so a batch of two uses two cores; on CUDA it halves the launches)."""
        n = self.squarings(self.max_voxels(v), max_step_vox) if squarings is None else squarings
        return self._square(v / (2**n), n)

    def _square(self, u: torch.Tensor, n: int) -> torch.Tensor:
        """``u`` composed with itself ``n`` times over (``exp``'s squarings of a first step ``u``)."""
        for _ in range(n):
            u = self.compose(u, u)
        return u

    def exp_pair(
        self, v: torch.Tensor, squarings: int | None = None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(-s v), exp(s v))`` (``s = scale``) of one field ``[1, dim, *shape]`` in one batched scaling and
        squaring. The scale, the sign and the first step's ``2⁻ⁿ`` are one multiplication (exact for powers of
        two, so ``exp_pair(v, n, 0.5)`` is ``exp_pair(0.5 * v, n)`` to the bit)."""
        n = self.squarings(abs(scale) * self.max_voxels(v)) if squarings is None else squarings
        both = self._exp_both(v, n, scale)
        return both[:1], both[1:]

    def _exp_both(self, v: torch.Tensor, n: int, scale: float) -> torch.Tensor:
        """``[exp(-s v), exp(s v)]`` as one ``[2, dim, *shape]`` tensor, ``n`` squarings."""
        first = torch.empty(2, *v.shape[1:], dtype=v.dtype, device=v.device)
        step = scale / 2**n
        torch.mul(v, -step, out=first[:1])
        torch.mul(v, step, out=first[1:])
        return self._square(first, n)

    def iteration_squarings(self, vmax_vox: float) -> int:
        """Squarings :meth:`exp_pair_in_iteration` needs for a field of ``vmax_vox`` voxels (this grid's)."""
        if self.coarse is None:
            return self.squarings(vmax_vox)
        ratio = min(c / f for c, f in zip(self.coarse.grid.spacing, self.grid.spacing, strict=False))
        return self.squarings(vmax_vox / ratio)

    def exp_pair_in_iteration(
        self, v: torch.Tensor, squarings: int, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`exp_pair` (``exp(∓scale · v)``) as the SyN iterations use it. On a large grid (``coarse_exp``)
        the scaling and squaring runs on every other voxel per axis (1/8 of the voxels in 3D), on the lattice
        anchored at the world origin rather than on the box's corners, and the results are interpolated back:
        the velocity is smooth at that scale (its updates are Gaussian-smoothed with the fluid sigma, whose
        response at the coarse grid's Nyquist frequency is ~6 % for 1.5 voxels), and each squaring is a full
        resampling of the field, the iteration's largest cost. The registration's returned fields are always
        exponentiated on the full grid."""
        if self.coarse is None:
            return self.exp_pair(v, squarings, scale)
        both = self._to_fine(self.coarse._exp_both(self._to_coarse(v), squarings, scale))
        return both[:1], both[1:]

    def invert(self, u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
        """Inverse displacement ``w`` with ``w(x) = -u(x + w(x))`` by fixed-point iteration."""
        w = -u
        for _ in range(iterations):
            w = -self.sample(u, w)
        return w

    def smooth(self, u: torch.Tensor, sigma_vox: float) -> torch.Tensor:
        """Gaussian blur of ``u`` (``sigma_vox`` voxels on every axis), zero padding."""
        if sigma_vox <= 0:
            return u
        return gaussian_blur(u, tuple([sigma_vox] * self.dim))

    def smooth_field(self, u: torch.Tensor, sigma_vox: float) -> torch.Tensor:
        """:meth:`smooth` for a field: zero padding at the grid's own faces (the field is held to 0 at the
        image border, as ITK's smoothing of displacement fields does), repetition at the open faces of a box,
        where the field goes on beyond (:func:`maskreg.engine.deformable_stage.extend_from_faces`). Zero
        padding there would pull the box's face towards 0 at every update while the inside moves on: a jump
        that folds the map at the face."""
        pads = self._face_pads(sigma_vox)
        if pads is None:
            return self.smooth(u, sigma_vox)
        flat, inner = pads
        return self.smooth(F.pad(u, flat, mode="replicate"), sigma_vox)[inner]

    def _face_pads(self, sigma_vox: float) -> tuple[list[int], tuple[slice, ...]] | None:
        """For a blur of ``sigma_vox`` voxels: ``F.pad``'s list (the kernel's reach at each open face) and the
        index that cuts the grid back out of the padded tensor; ``None`` without open faces."""
        if sigma_vox <= 0 or not any(lo or hi for lo, hi in self.open_faces):
            return None
        r = len(gaussian_weights(float(sigma_vox))) // 2
        pads = [(r if lo else 0, r if hi else 0) for lo, hi in self.open_faces]
        flat = [p for pair in reversed(pads) for p in pair]  # the last tensor axis first
        inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, self.grid.shape, strict=True))
        return flat, (slice(None), slice(None), *inner)

    def update(
        self,
        field: torch.Tensor,
        g: torch.Tensor,
        step: torch.Tensor,
        fluid: float,
        elastic: float,
        additive: bool,
        vmax: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> None:
        """One deformable update in place: ``d = G_fluid * (-g)`` scaled so its longest vector is ``step``
        voxels (a 1-element tensor; none where ``d`` is 0), times ``gate`` ``[1, 1, *shape]`` where given
        (:func:`fold_gate`), then ``field ← G_elastic * (field + d)`` (``additive``: SyN's velocity) or
        ``G_elastic * (field ∘ d)`` (greedy); ``vmax`` (0-dim) receives the new field's longest vector in voxels.
        Sigmas in voxels. 3D SyN on the CPU: two streamed compiled passes
        (:func:`maskreg.engine.cpu_kernels.smooth_step`) instead of two blurs and six elementwise passes;
        otherwise graph-safe torch."""
        if additive and self.dim == 3 and cpu_kernels.enabled(field, g):
            self._compiled_syn_update(field, g, float(step), fluid, elastic, vmax, gate)
            return
        d = self.smooth(-g, fluid)
        d = d * (step / self.max_voxels_t(d).clamp_min(1e-20))
        if gate is not None:
            d = d * gate
        field.copy_(self.smooth_field(field + d if additive else self.compose(field, d), elastic))
        if vmax is not None:
            vmax.copy_(self.max_voxels_t(field))

    def _compiled_syn_update(
        self,
        field: torch.Tensor,
        g: torch.Tensor,
        step: float,
        fluid: float,
        elastic: float,
        vmax: torch.Tensor | None,
        gate: torch.Tensor | None,
    ) -> None:
        """:meth:`update` of a 3D velocity on the CPU, fused (:func:`maskreg.engine.cpu_kernels.smooth_step`).
        A box's open faces are padded first, the velocity by repetition and the gradient with zeros (no force
        beyond the box), so the elastic blur sees the field going on there, as :meth:`smooth_field` does."""
        pads = self._face_pads(elastic)
        work, grad = (field, g) if pads is None else (F.pad(field, pads[0], mode="replicate"), F.pad(g, pads[0]))
        if gate is not None and pads is not None:  # the step's spill beyond the box, gated as at the face
            gate = F.pad(gate, pads[0], mode="replicate")
        kernels = [gaussian_kernels(tuple(work.shape[2:]), (s,) * 3) for s in (fluid, elastic)]
        v = cpu_kernels.smooth_step(work, grad, kernels[0], kernels[1], step, 1.0 / min(self.grid.spacing), gate)
        if pads is not None:
            field.copy_(work[pads[1]])
        if vmax is not None:
            vmax.fill_(v)

    def upsample(self, u: torch.Tensor, target: FieldOps) -> torch.Tensor:
        """A field of this grid resampled on ``target``'s grid (values stay in mm)."""
        if target.grid == self.grid:
            return u
        return resample(u, self.grid, target.grid, padding_mode="border")


def jacobian_determinant(u: torch.Tensor, ops: FieldOps) -> torch.Tensor:
    """Jacobian determinant of ``x → x + u(x)`` (``[1, 1, *shape]``), central differences in physical
    space (direction cosines and spacing included)."""
    dim = ops.dim
    if dim == 3 and cpu_kernels.enabled(u):  # one compiled pass, no gradient tensors stored
        return cpu_kernels.jacobian_determinant(u, ops.index_to_physical_gradient)
    jac = ops.spatial_gradient(u).reshape(u.shape[0], dim, dim, *u.shape[2:])  # [1, component, ∂x_k, *shape]
    eye = torch.eye(dim, device=u.device).reshape(1, dim, dim, *([1] * dim))
    m = jac + eye  # [1, row, col, *shape]
    if dim == 2:
        det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    else:  # cofactor expansion along the first row: elementwise, no batched LU of millions of 3x3 matrices
        det = (
            m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
            - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
            + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0])
        )
    return det[:, None]


def fold_gate(ratio: torch.Tensor, floor: float) -> torch.Tensor:
    """How much of a deformable update to take at each voxel (``[1, 1, *shape]``, 0 to 1), from ``ratio``, the
    smaller of a map's local volume ratio and its inverse's, as a square root (SyN: the smaller Jacobian
    determinant of its two half-way maps ``exp(±v/2)``, whose product is about the whole map's; greedy:
    ``√min(det J, 1/det J)``). The gate is 1 while ``ratio ≥ 2 √floor`` and falls linearly to 0 at ``√floor``:
    the step fades out before the map's volume ratio reaches ``floor`` (or ``1/floor``), so the update never
    drives the map to fold, however strongly the loss pulls (mse across contrasts collapsing a structure). The
    elastic smoothing still acts there. Without it, the SyN velocity of such a pull grows gradients of 5 mm/mm
    and its exponential folds, though each half stays positive."""
    root = math.sqrt(floor)
    return ((ratio - root) / root).clamp_(0.0, 1.0)


def volume_ratio(u: torch.Tensor, ops: FieldOps) -> torch.Tensor:
    """``√min(det J, 1/det J)`` of ``x → x + u(x)`` (``[1, 1, *shape]``; 0 where the map folds): the ratio
    :func:`fold_gate` takes for a displacement (greedy)."""
    det = jacobian_determinant(u, ops).clamp_min(0.0)
    return torch.minimum(det, 1.0 / det.clamp_min(1e-12)).sqrt_()


def half_map_ratio(u_minus: torch.Tensor, u_plus: torch.Tensor, ops: FieldOps) -> torch.Tensor:
    """The smaller Jacobian determinant of SyN's half-way maps ``exp(-v/2)`` and ``exp(v/2)`` (``[1, 1, *shape]``,
    clamped at 0): the ratio :func:`fold_gate` takes for a velocity."""
    return torch.minimum(jacobian_determinant(u_minus, ops), jacobian_determinant(u_plus, ops)).clamp_min_(0.0)


def bending_energy(u: torch.Tensor) -> torch.Tensor:
    """Mean squared second differences of ``u`` (voxel units of the grid; DeepReg's bending energy)."""
    dim = u.dim() - 2
    total = u.new_zeros(())
    for a in range(dim):
        d2 = torch.diff(u, n=2, dim=2 + a)
        total = total + d2.pow(2).mean()
    return total


def gradient_l2(u: torch.Tensor) -> torch.Tensor:
    """Mean squared first differences of ``u`` (DeepReg's L2 gradient norm)."""
    dim = u.dim() - 2
    return sum(torch.diff(u, dim=2 + a).pow(2).mean() for a in range(dim))
