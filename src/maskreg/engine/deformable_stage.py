"""Deformable stages (``greedy``: a displacement composed with each update; ``syn``: a stationary velocity ``v``
whose exponentials ``exp(∓v/2)`` move the fixed and the moving image half-way). The maths and conventions of the
fields are in :mod:`maskreg.engine.fields`.

Each level works on the fixed mask's box plus a margin (:func:`roi_box`): a field ``[1, dim, *box]`` of mm
displacements (LPS components x, y[, z]) at the box's voxels. An iteration samples both sides' stacks (image,
mask[, one-hot labels]) at their displaced points, evaluates the loss with the weight ``w`` held constant, turns
the loss's gradient in the sampled values into a displacement gradient by the chain rule (the sampled image's
spatial gradient, as ANTs and greedy do), and takes a smoothed step
(:meth:`maskreg.engine.fields.FieldOps.update`), faded out per voxel where the map nears the stage's
``jacobian_floor`` (:func:`maskreg.engine.fields.fold_gate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels
from maskreg.engine import fields as dfm
from maskreg.engine.grid import Grid
from maskreg.engine.levels import check_start_overlap, finish_level, iterate, voxels_per_level_voxel
from maskreg.engine.losses import get_loss, soft_dice_loss
from maskreg.engine.optimisers import schedule
from maskreg.engine.problem import Problem, mask_use
from maskreg.engine.result import StageReport
from maskreg.engine.sampling import grid_sample_inside
from maskreg.engine.stepper import graphs_enabled
from maskreg.engine.support import WeightSupport
from maskreg.errors import MaskregError
from maskreg.loss_names import MOVING_GRADIENT_ONLY
from maskreg.transforms import LinearTransform

# (stack, d loss / d stack, alpha): one term of a displacement gradient (:meth:`TorchSampler.force`)
Term = tuple[torch.Tensor, torch.Tensor, float]


@dataclass
class FieldState:
    """The deformable part so far: the field (``greedy``: displacement, ``syn``: velocity) on ``ops``'s grid."""

    kind: str
    ops: dfm.FieldOps
    field: torch.Tensor


@dataclass
class LevelStacks:
    """What a level samples: each side's stack ``[1, C, *level grid]`` (normalised image, mask[, labels]), the
    fixed stack cut to the box (where the fixed image does not move), each side's map from a physical point to
    its level's normalised coordinates (homogeneous, numpy; the moving side's through the linear transform), the
    box's grid and the channels whose loss gradient moves the field (image and labels; the mask is a weight)."""

    moving: torch.Tensor
    fixed: torch.Tensor
    fixed_box: torch.Tensor
    moving_map: np.ndarray
    fixed_map: np.ndarray
    grid: Grid
    moved: list[int]

    @property
    def to_moving(self) -> np.ndarray:
        """mm displacement → the moving level's normalised offsets (``dim x dim``)."""
        return self.moving_map[: self.grid.dim, : self.grid.dim]

    @property
    def to_fixed(self) -> np.ndarray:
        """mm displacement → the fixed level's normalised offsets (``dim x dim``)."""
        return self.fixed_map[: self.grid.dim, : self.grid.dim]


class TorchSampler:
    """Sampling and displacement gradients with torch's operators (every device): the sampling grids are the two
    maps' affine grids plus the field's normalised offsets."""

    def __init__(self, stacks: LevelStacks, ops: dfm.FieldOps):
        self.s, self.ops = stacks, ops
        dim, grid = stacks.grid.dim, stacks.grid
        self.g0, self.f_ident = (
            F.affine_grid(
                torch.as_tensor(
                    (m @ grid.normalised_to_physical())[None, :dim], dtype=torch.float32, device=stacks.moving.device
                ),
                [1, 1, *grid.shape],
                align_corners=True,
            )
            for m in (stacks.moving_map, stacks.fixed_map)
        )

    def set_reach(self, mm: float) -> None:
        """The fixed side's displacement bound (used by the compiled sampler only)."""

    def sample(self, u_fixed: torch.Tensor | None, u_moving: torch.Tensor):
        """Both sides' stacks at their displaced points and the weight ``w`` (zero padding: a point outside a
        grid weighs 0 through ``inside``, so the padding value never reaches a loss); ``u_fixed`` none: the
        fixed side does not move (greedy)."""
        s = self.s
        grid = self.g0 + self.ops.offsets(u_moving, s.to_moving)
        ms, ins = grid_sample_inside(s.moving, grid)
        w = ms[:, 1:2] * ins
        if u_fixed is None:
            fs = s.fixed_box
            w = w * fs[:, 1:2]
        else:
            fgrid = self.f_ident + self.ops.offsets(u_fixed, s.to_fixed)
            fs, ins = grid_sample_inside(s.fixed, fgrid)
            w = w * fs[:, 1:2] * ins
        return fs, ms, w

    def force(self, terms: list[Term]) -> torch.Tensor:
        """∂loss/∂u ``[1, dim, *box]`` (per mm) of ``Σ alpha · (stack, dstack)`` terms by the chain rule: the
        loss's gradient in each moved channel times that channel's spatial gradient on the box."""
        g = None
        for stack, dstack, alpha in terms:
            for c in self.s.moved:
                term = (alpha * dstack[:, c : c + 1]) * self.ops.spatial_gradient(stack[:, c : c + 1])
                g = term if g is None else g + term
        return g


class KernelSampler(TorchSampler):
    """:class:`TorchSampler`'s results from the compiled CPU kernels (3D, float32 on the CPU): each side sampled
    at "affine map of the voxel index + matrix @ field" in one pass, no sampling grid stored, only on the rows of
    the box where the weight can be nonzero (:class:`~maskreg.engine.support.WeightSupport`), and each gradient
    term accumulated in one pass."""

    def __init__(self, stacks: LevelStacks, ops: dfm.FieldOps):
        self.s, self.ops = stacks, ops
        dim, grid = stacks.grid.dim, stacks.grid
        self.index_to_moving, self.index_to_fixed = (
            (m @ grid.index_to_physical())[:dim] for m in (stacks.moving_map, stacks.fixed_map)
        )
        self.support = WeightSupport(stacks.fixed_box[0, 1].numpy(), grid.spacing)
        self.reach = 0.0  # mm: a bound of the fixed side's displacement |exp(-v/2)| (0 for greedy)

    def set_reach(self, mm: float) -> None:
        self.reach = mm

    def sample(self, u_fixed: torch.Tensor | None, u_moving: torch.Tensor):
        s = self.s
        rows = self.support.rows(self.reach)
        ms, w = cpu_kernels.sample_mapped(s.moving, self.index_to_moving, s.to_moving, u_moving, rows)
        if u_fixed is None:
            return s.fixed_box, ms, w.mul_(s.fixed_box[:, 1:2])
        fs, w = cpu_kernels.sample_mapped(s.fixed, self.index_to_fixed, s.to_fixed, u_fixed, rows, prior=w)
        return fs, ms, w

    def force(self, terms: list[Term]) -> torch.Tensor:
        g = torch.zeros(1, self.s.grid.dim, *self.s.grid.shape)
        for stack, dstack, alpha in terms:
            for c in self.s.moved:
                cpu_kernels.add_gradient_product(
                    g, stack[:, c : c + 1], dstack[:, c : c + 1], self.ops.index_to_physical_gradient, alpha
                )
        return g


def make_sampler(stacks: LevelStacks, ops: dfm.FieldOps) -> TorchSampler:
    """The compiled sampler for 3D stacks the CPU kernels serve, else torch's."""
    if stacks.grid.dim == 3 and cpu_kernels.enabled(stacks.moving, stacks.fixed):
        return KernelSampler(stacks, ops)
    return TorchSampler(stacks, ops)


class DeformableLevel:
    """One pyramid level of a deformable stage, from the previous level's field (or zero).

    The iteration (:meth:`iteration`) runs at fixed tensor addresses, so it can be captured as a CUDA graph
    (:mod:`maskreg.engine.stepper`); its one host value, the squarings of ``exp(±v/2)``, is its graph key."""

    def __init__(
        self, prob: Problem, stage: dict, linear: LinearTransform, state: FieldState | None, li: int, min_overlap: int
    ):
        self.prob, self.stage, self.li, self.min_overlap = prob, stage, li, min_overlap
        self.t0 = time.perf_counter()
        self.kind = stage["type"]
        self.syn = self.kind == "syn"
        self.loss_name, self.loss_fn = get_loss(stage["loss"])
        self.window, self.bins = int(stage["window"]), int(stage["bins"])
        self.scale, self.n_it = int(stage["scales"][li]), int(stage["iterations"][li])
        self.floor = float(stage["jacobian_floor"])
        sigmas = stage.get("smoothing_sigmas") or [None] * len(stage["scales"])
        self.level_key = (self.scale, sigmas[li], mask_use(stage))
        self.fl, self.ml = prob.levels(*self.level_key)
        # the field lives on the fixed mask's box plus a margin (the ROI box), not on the whole level grid
        self.grid, box = roi_box(self.fl.grid, self.fl.mask, roi_margin(stage))
        open_faces = tuple((b.start > 0, b.stop < n) for b, n in zip(box, self.fl.grid.shape, strict=True))
        self.ops = dfm.FieldOps(self.grid, prob.device, coarse_exp=self.syn, open_faces=open_faces)
        self.state = self._start_state(state)
        self.label_weight = float(stage.get("label_weight", 0.0)) if prob.labels is not None else 0.0
        self.stacks = self._stacks(linear, box)
        self.sampler = make_sampler(self.stacks, self.ops)
        self.name = f"stage {self.kind}, level {li + 1}/{len(stage['scales'])} (scale {self.scale})"

    def _start_state(self, state: FieldState | None) -> FieldState:
        """The previous level's (or stage's) field on this level's box, or a zero field."""
        if state is None:
            field = torch.zeros(1, self.prob.dim, *self.grid.shape, device=self.prob.device)
        else:
            field = state.ops.upsample(state.field, self.ops)
        return FieldState(self.kind, self.ops, field)

    def _stacks(self, linear: LinearTransform, box: tuple[slice, ...]) -> LevelStacks:
        """Each side's image (normalised as the linear stages at this level normalise it), mask and labels, with
        the maps from the box's physical points to each side's normalised coordinates."""
        fl, ml = self.fl, self.ml
        f_n, m_n = self.prob.normalised(self.level_key, linear)
        f_lab, m_lab = self.prob.label_levels(fl, ml) if self.label_weight > 0 else (None, None)
        moving = torch.cat([m_n, ml.mask] + ([m_lab] if m_lab is not None else []), 1)
        fixed = torch.cat([f_n, fl.mask] + ([f_lab] if f_lab is not None else []), 1)
        return LevelStacks(
            moving=moving,
            fixed=fixed,
            fixed_box=fixed[(slice(None), slice(None)) + box],
            moving_map=ml.grid.physical_to_normalised() @ linear.homogeneous(),
            fixed_map=fl.grid.physical_to_normalised(),
            grid=self.grid,
            moved=[0] + list(range(2, moving.shape[1])),
        )

    # ----------------------------------------------------------------------------------------- named steps

    def squarings_for(self, vmax_vox: float) -> int:
        """exp(±v/2)'s squarings for a field whose longest vector is ``vmax_vox`` voxels; sets the sampler's
        reach, ``|exp(-v/2)| <= max|v| / 2`` (mm)."""
        self.sampler.set_reach(0.5 * vmax_vox * min(self.grid.spacing))
        return self.ops.iteration_squarings(0.5 * vmax_vox)

    def sampled(self, field: torch.Tensor, squarings: int | None = None):
        """``(fs, ms, w, gate)`` of ``field`` as an iteration samples it: syn through the iterations' own
        exponentials (coarse on large grids), ``squarings`` of them (default: enough for ``field``); ``gate``:
        the update's :func:`~maskreg.engine.fields.fold_gate` from the maps sampled with (none without a
        ``jacobian_floor``)."""
        if self.syn:
            n = self.squarings_for(self.ops.max_voxels(field)) if squarings is None else squarings
            halves = self.ops.exp_pair_in_iteration(field, n, 0.5)
            return *self.sampler.sample(*halves), self._gate(lambda: dfm.half_map_ratio(*halves, self.ops))
        return *self.sampler.sample(None, field), self._gate(lambda: dfm.volume_ratio(field, self.ops))

    def _gate(self, ratio: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The update's fold gate from ``ratio()``, computed only when the stage sets a ``jacobian_floor``."""
        return dfm.fold_gate(ratio(), self.floor) if self.floor > 0 else None

    def objective(self, fs: torch.Tensor, ms: torch.Tensor, w: torch.Tensor):
        """(similarity loss, total with the label term) of sampled stacks; ``w`` is held constant."""
        loss = self.loss_fn(fs[:, :1], ms[:, :1], w, window=self.window, bins=self.bins)
        if self.label_weight <= 0:
            return loss, loss
        return loss, loss + self.label_weight * soft_dice_loss(fs[:, 2:], ms[:, 2:], w)

    def gradient(self, fs: torch.Tensor, ms: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, ∂total/∂field ``[1, dim, *box]``): autograd in the sampled values, the chain rule to the field
        (syn: ½(∂/∂u₊ − ∂/∂u₋), ``u₋ = exp(-v/2)`` moves the fixed image), plus the regulariser's gradient."""
        fs_l = fs.detach().requires_grad_(self.syn)
        ms_l = ms.detach().requires_grad_(True)
        loss, total = self.objective(fs_l, ms_l, w)
        if self.syn and self.loss_name in MOVING_GRADIENT_ONLY:
            # mi/nmi bin their first argument without a gradient (Mattes' zero-order window), so the fixed
            # side's gradient comes from the same (symmetric) loss with the roles swapped
            total = total + self.loss_fn(ms[:, :1], fs_l[:, :1], w, window=self.window, bins=self.bins)
        leaves = [ms_l] + ([fs_l] if self.syn else [])
        reg = None
        if has_regulariser(self.stage):
            field = self.state.field.detach().requires_grad_(True)
            reg = regulariser(self.stage, field)
            total = total + reg
            leaves.append(field)
        grads = torch.autograd.grad(total, leaves)
        with torch.no_grad():
            g = self.sampler.force([(ms, grads[0], 0.5), (fs, grads[1], -0.5)] if self.syn else [(ms, grads[0], 1.0)])
            if reg is not None:
                g = g + grads[-1]
        return loss, g

    def iteration(self, squarings: int | None) -> None:  # graph-safe: see maskreg.engine.stepper
        """Sample, evaluate, step: the field (in place), the loss trace and the iteration count move on."""
        with torch.no_grad():
            if self.first is not None:  # the first call, eager on every device (maskreg.engine.stepper)
                fs, ms, w, gate = self.first
                self.first = None
            else:
                fs, ms, w, gate = self.sampled(self.state.field, squarings if self.syn else None)
            if self.w_buffer is not None:  # a graphed iteration's weight, in a buffer that outlives the replays
                self.w_buffer.copy_(w)
                self.last_w = self.w_buffer
            else:
                self.last_w = w
        loss, g = self.gradient(fs, ms, w)
        with torch.no_grad():
            # a step of the scheduled size (voxels) along the smoothed gradient; vmax: only exp's squarings
            self.ops.update(
                self.state.field,
                g,
                self.lrs.index_select(0, self.count),
                float(self.stage["fluid_sigma"]),
                float(self.stage["elastic_sigma"]),
                self.syn,
                self.vmax if self.syn else None,
                gate,
            )
            self.trace.index_copy_(0, self.count, loss.detach().reshape(1))
            self.count.add_(1)

    def next_key(self) -> int | None:
        """The next iteration's graph key: exp(±v/2) needs enough squarings for the current field (one
        read-back per iteration); none for greedy."""
        return self.squarings_for(float(self.vmax)) if self.syn else None

    # ------------------------------------------------------------------------------------------------ run

    def run(self, report: StageReport) -> FieldState:
        """Check the overlap at the start, iterate, check it at the end and report; returns the level's field."""
        prob, dev = self.prob, self.prob.device
        with torch.no_grad():
            # the weight at the level's start (overlap check); the first iteration uses these samples (eager
            # calls only: the field has not changed), so the check costs no sampling of its own
            self.first = self.sampled(self.state.field)
        w0 = self.first[2]
        ow, fsum = float(w0.sum()), float(self.fl.mask.sum())  # the box holds the whole fixed mask
        check_start_overlap(prob, self.name, ow, fsum, self.min_overlap, voxels_per_level_voxel(prob, self.grid))
        self.trace = torch.zeros(max(self.n_it, 1), device=dev)
        self.lrs = schedule(self.stage["learning_rate"][self.li], self.n_it, dev)
        self.count = torch.zeros(1, dtype=torch.long, device=dev)  # iterations done
        self.vmax = self.ops.max_voxels_t(self.state.field)  # max |field| (voxels) after the last update
        self.last_w: torch.Tensor | None = None  # the weight of the latest loss evaluation
        self.w_buffer = torch.zeros_like(self.stacks.fixed_box[:, 1:2]) if graphs_enabled(dev) else None
        it, converged = iterate(
            self.iteration,
            self.n_it,
            self.trace,
            float(self.stage["tolerance"]),
            dev,
            key=self.next_key,
            desc=f"{self.kind} s{self.scale}",
        )
        w = self.last_w if self.last_w is not None else w0  # none: no iteration ran
        self.first = None
        finish_level(
            prob,
            report,
            self.name,
            self.grid,
            self.scale,
            it,
            self.trace,
            (float(w.sum()), int((w > 0.5).sum())),
            fsum,
            self.t0,
            converged,
            self.loss_name,
            ow,
            self.min_overlap,
        )
        return self.state


def run_deformable_stage(
    prob: Problem,
    stage: dict,
    linear: LinearTransform,
    state: FieldState | None,
    min_overlap: int,
    report: StageReport,
) -> FieldState:
    """A deformable stage (settings resolved: :func:`maskreg.stages.resolve_stage`) after the linear transform
    ``linear`` (fixed → moving points), level by level from ``state`` (an earlier deformable stage's field, of the
    same type) or zero; returns the last level's field."""
    if state is not None and state.kind == "syn" and stage["type"] == "greedy":
        # a velocity (a network's) continues as its displacement
        state = FieldState("greedy", state.ops, state.ops.exp(state.field))
    if state is not None and state.kind != stage["type"]:
        raise MaskregError(
            f"stage {stage['type']} cannot follow a {state.kind} stage (a displacement has no velocity to continue "
            f"from); use one deformable type, and a network trained with field: velocity before a syn stage."
        )
    for li in range(len(stage["scales"])):
        state = DeformableLevel(prob, stage, linear, state, li, min_overlap).run(report)
    assert state is not None
    return state


def roi_margin(stage: dict) -> int:
    """Voxels kept around the fixed mask's box: the fluid smoothing spreads each update over its 3-sigma kernel,
    and 3 more voxels let the field decay (elastic). The loss needs none: its weight is 0 outside the mask, so a
    CC window reaching past the mask's edge adds nothing from there (a ``window // 2`` term would only add
    voxels). It is enough: with exact exponentials, the box's field inside the ROI matches the whole grid's, and
    a wider margin changes nothing (tests/test_deformable.py). What still parts them is that the whole grid is
    large enough for the SyN iterations' coarse exponential and the box is not."""
    return math.ceil(3 * float(stage["fluid_sigma"])) + 3


def roi_box(grid: Grid, mask: torch.Tensor, margin: int) -> tuple[Grid, tuple[slice, ...]]:
    """The part of ``grid`` a deformable level works on: the box of ``mask > 0`` grown by ``margin`` voxels
    and clipped to the grid, as a sub-grid and the tensor slices (tensor order) that cut it out.

    The loss weighs nothing outside the fixed mask, so the field is driven there only by smoothing; computing
    it on the whole grid costs time in proportion to the grid, not to the region of interest (a small mask in a
    large image: a hippocampus in a head scan). Beyond the box, the field is extended from its faces (as the
    levels' fields are upsampled, border padding): constant along the outward direction, continuous, with no
    folding. Without a mask, or when the box is the whole grid, the grid is returned unchanged."""
    nz = torch.nonzero(mask[0, 0] > 0)
    shape = grid.shape
    if nz.numel() == 0:
        return grid, tuple(slice(0, n) for n in shape)
    lo = [max(0, int(v) - margin) for v in nz.min(0).values]
    hi = [min(n, int(v) + margin + 1) for v, n in zip(nz.max(0).values, shape, strict=False)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=False))
    if all(a == 0 and b == n for a, b, n in zip(lo, hi, shape, strict=False)):
        return grid, box
    start = tuple(reversed(lo))  # tensor order -> x-first
    size = tuple(reversed([b - a for a, b in zip(lo, hi, strict=False)]))
    return grid.crop(start, size), box


def has_regulariser(stage: dict) -> bool:
    return float(stage.get("bending_weight", 0)) > 0 or float(stage.get("gradient_weight", 0)) > 0


def regulariser(stage: dict, field: torch.Tensor) -> torch.Tensor | None:
    if not has_regulariser(stage) or not field.requires_grad:
        return None
    out = field.new_zeros(())
    if float(stage.get("bending_weight", 0)) > 0:
        out = out + float(stage["bending_weight"]) * dfm.bending_energy(field)
    if float(stage.get("gradient_weight", 0)) > 0:
        out = out + float(stage["gradient_weight"]) * dfm.gradient_l2(field)
    return out


def full_resolution_fields(prob: Problem, state: FieldState) -> tuple[torch.Tensor, torch.Tensor, dfm.FieldOps]:
    """Forward and inverse displacements (mm) on the full-resolution fixed grid. They are computed on the last
    level's ROI box at full resolution (``exp(±v)``, or greedy's inverse) and extended beyond it from its faces,
    as the levels extend their fields (:func:`roi_box`): the velocity there is the box's edge value anyway, and
    the scaling and squaring costs in proportion to the grid."""
    ops = dfm.FieldOps(prob.fgrid, prob.device)
    box = dfm.FieldOps(prob.fgrid.covering_crop(state.ops.grid), prob.device)
    with torch.no_grad():
        field = state.ops.upsample(state.field, box)
        if state.kind == "syn":
            inv, fwd = box.exp_pair(field)
        else:
            fwd, inv = field, box.invert(field)
        both = extend_from_faces(torch.cat([fwd, inv], 0), box.grid, prob.fgrid)
    return both[:1], both[1:], ops


def extend_from_faces(t: torch.Tensor, box: Grid, grid: Grid) -> torch.Tensor:
    """``t`` ``[N, C, *box.shape]`` on ``box``, a crop of ``grid``, placed on ``grid`` with each face's values
    repeated outward (border padding, exactly: no interpolation)."""
    start = np.rint((grid.physical_to_index() @ np.append(box.origin, 1.0))[: grid.dim]).astype(int)
    pad: list[int] = []
    for a in range(grid.dim):  # x first, as F.pad wants the last tensor axis first
        pad += [int(start[a]), int(grid.size[a] - start[a] - box.size[a])]
    if not any(pad):
        return t
    return F.pad(t, pad, mode="replicate")
