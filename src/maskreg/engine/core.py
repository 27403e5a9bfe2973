"""The registration driver: stages (moments → translation/rigid/affine) over a mask-aware pyramid.

Coordinates: everything is computed on the fixed image's grid in LPS mm; the result maps fixed-space points
to moving-space points (``warped(x) = moving(T(x))``). The weight of a fixed voxel ``x`` is
``w(x) = m_f(x) · m_m(T(x)) · inside_moving(T(x))``: voxels mapping outside the moving image get weight 0, so
partial overlap never raises; the only failure is an overlap below ``min_overlap_voxels`` at some level.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels
from maskreg.engine import fields as dfm
from maskreg.engine import linear as lin
from maskreg.engine.grid import Grid
from maskreg.engine.losses import VALUE_AND_GRAD, get_loss, intensity_scale, local_cc_over_region
from maskreg.engine.moments import weighted_moments
from maskreg.engine.points import PointLoss
from maskreg.engine.pyramid import Level, downsample_mask, erode_voxels, make_level, valid_mask_radii
from maskreg.engine.sampling import grid_sample_inside
from maskreg.engine.stepper import Stepper, graphs_enabled
from maskreg.engine.support import WeightSupport
from maskreg.errors import InputError, MaskregError, OverlapError, where
from maskreg.loss_names import MOVING_GRADIENT_ONLY, NEEDS_DENSE
from maskreg.stages import DEFAULT_STAGES, LINEAR_DEFAULTS, check_stages, resolve_stage
from maskreg.transforms import LinearTransform, chain

log = logging.getLogger("maskreg")

# DEFAULT_STAGES (register's stages when none are given) and the linear stages' defaults live in maskreg.stages
STAGE_DEFAULTS: dict[str, Any] = LINEAR_DEFAULTS


@dataclass
class LevelReport:
    scale: int
    shape: list[int]
    iterations: int
    loss_first: float
    loss_last: float
    overlap_weight: float
    overlap_voxels: int
    overlap_fraction: float
    seconds: float
    converged: bool
    losses: list[float] = field(default_factory=list)


@dataclass
class StageReport:
    type: str
    loss: str | None
    seconds: float
    levels: list[LevelReport] = field(default_factory=list)


@dataclass
class RegistrationResult:
    """The transform chain (fixed → moving points) and a report of every stage and level."""

    linear: LinearTransform
    fixed_grid: Grid
    device: str
    seconds: float
    stages: list[StageReport]
    jacobian_min: float | None = None
    jacobian_nonpositive_fraction: float | None = None
    initial_nonlinear: bool = False
    phase_seconds: dict[str, float] = field(default_factory=dict)  # set-up, stages, fields, ... (wall s)
    # forward and inverse displacement ([1, dim, *shape] mm tensors on the fixed grid, on the engine's device)
    # until first read as SimpleITK images (see ``displacement``)
    _fields: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _images: tuple[sitk.Image, sitk.Image] | None = field(default=None, repr=False)

    def set_fields(self, forward: torch.Tensor, inverse: torch.Tensor) -> None:
        """Keep the forward and inverse displacements ``[1, dim, *shape]`` (mm, on ``fixed_grid``)."""
        self._fields, self._images = (forward.detach(), inverse.detach()), None

    def _field_images(self) -> tuple[sitk.Image, sitk.Image] | None:
        if self._images is None and self._fields is not None:
            self._images = (
                field_image(self._fields[0], self.fixed_grid),
                field_image(self._fields[1], self.fixed_grid),
            )
            self._fields = None  # the tensors (GPU memory on CUDA) are no longer needed
        return self._images

    @property
    def displacement(self) -> sitk.Image | None:
        """The forward displacement field (fixed → moving points before the linear part) as an ITK
        displacement-field image, ``None`` without a deformable stage. Made from the engine's tensor on first
        read (a device → host copy and a new image buffer: 0.29–0.39 s for both fields of the 1 mm brain pair on
        an H100 machine, mostly the new buffers' page faults), so a caller
        that only needs the report or the linear part never pays for it."""
        images = self._field_images()
        return None if images is None else images[0]

    @property
    def inverse_displacement(self) -> sitk.Image | None:
        """The inverse of :attr:`displacement` (moving → fixed points), made with it on first read."""
        images = self._field_images()
        return None if images is None else images[1]

    @property
    def has_fields(self) -> bool:
        """Whether a displacement field exists (without making its image)."""
        return self._fields is not None or self._images is not None

    def ensure_fields(self) -> None:
        """Zero forward/inverse fields on the fixed grid when no deformable part exists (the workflow writes
        ``warp.nii.gz`` for every subject of a cohort where some need one)."""
        if not self.has_fields:
            zero = torch.zeros(1, self.fixed_grid.dim, *self.fixed_grid.shape)
            self.set_fields(zero, zero)
            self.jacobian_min, self.jacobian_nonpositive_fraction = 1.0, 0.0

    def transform(self) -> sitk.Transform:
        """The whole chain as one SimpleITK transform, for ``sitk.Resample``."""
        return chain(self.linear, self.displacement)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready report (no loss traces longer than needed)."""
        last = self.stages[-1].levels[-1] if self.stages and self.stages[-1].levels else None
        return {
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "phase_seconds": self.phase_seconds,
            "overlap_voxels": last.overlap_voxels if last else None,
            "overlap_fraction": last.overlap_fraction if last else None,
            "deformable": self.has_fields,
            "initial_nonlinear": self.initial_nonlinear,
            "jacobian_min": self.jacobian_min,
            "jacobian_nonpositive_fraction": self.jacobian_nonpositive_fraction,
            "linear": {
                "matrix": self.linear.matrix.tolist(),
                "translation": self.linear.translation.tolist(),
                "center": self.linear.center.tolist(),
            },
            "stages": [asdict(s) for s in self.stages],
        }


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → a CUDA device when available else ``cpu``; ``cuda`` without CUDA is an error; ``cuda:N``
    is taken as given. Among several visible CUDA devices (``CUDA_VISIBLE_DEVICES`` is respected: torch sees
    only those), the one with the most free memory is taken, so concurrent local jobs
    (``--resources gpu=N``) spread over the GPUs instead of piling onto the first."""
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MaskregError(
            "device 'cuda' was requested but this machine has no usable CUDA device; set "
            "device: auto or cpu in the config."
        )
    if requested in ("auto", "cuda"):
        n = torch.cuda.device_count()
        if n <= 1:
            return torch.device("cuda:0")
        free = [torch.cuda.mem_get_info(i)[0] for i in range(n)]
        return torch.device(f"cuda:{max(range(n), key=lambda i: free[i])}")
    return torch.device(requested)


def _to_tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(arr)[None, None].to(device)


def _check_pair(fixed: sitk.Image, moving: sitk.Image, subject: str | None) -> None:
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(
            f"{where(subject)}the fixed image is {fixed.GetDimension()}D but the moving image is "
            f"{moving.GetDimension()}D; both must have the same dimension."
        )
    for role, img in (("fixed", fixed), ("moving", moving)):
        arr = sitk.GetArrayViewFromImage(img)
        if float(arr.max()) == float(arr.min()):
            raise InputError(
                f"{where(subject, role)}image is constant ({float(arr.min())}); there is nothing "
                f"to register. Check the file (an empty or all-background export?) or remove the "
                f"subject from the cohort."
            )


def _mask_tensor(
    mask: sitk.Image | None, image: sitk.Image, device: torch.device, subject: str | None, role: str
) -> torch.Tensor:
    if mask is None:
        return torch.ones((1, 1, *Grid.of(image).shape), device=device)
    if Grid.of(mask).size != Grid.of(image).size:
        raise InputError(
            f"{where(subject, role)}mask size {mask.GetSize()} differs from its image's "
            f"{image.GetSize()}; prepare masks on the image grid first (maskreg mask)."
        )
    t = (_to_tensor(mask, device) > 0).float()
    if float(t.sum()) == 0:
        raise InputError(f"{where(subject, role)}mask is empty (all zeros).")
    return t


def mask_use(stage: dict) -> tuple[bool, bool]:
    """Whether a stage's loss uses the (fixed, moving) mask: its ``masks`` setting (``both``, the default,
    ``fixed``, ``moving`` or ``none``; ``use_mask: false`` is ``none``), as ANTs sets masks per stage."""
    which = stage.get("masks") or "both"
    if stage.get("use_mask") is False:
        which = "none"
    return which in ("both", "fixed"), which in ("both", "moving")


class _Problem:
    """Full-resolution tensors of one pair and a cache of pyramid levels."""

    def __init__(self, fixed, moving, fixed_mask, moving_mask, device, subject, kinds=("roi", "roi")):
        self.device = device
        self.kinds = {"fixed": kinds[0], "moving": kinds[1]}
        self.subject = subject
        self.last_level: tuple[str, float] | None = None  # (name, overlap fraction) of the last level done
        self.fgrid = Grid.of(fixed)
        self.mgrid = Grid.of(moving)
        self.dim = self.fgrid.dim
        self.f = _to_tensor(fixed, device)
        self.m = _to_tensor(moving, device)
        self.fm = _mask_tensor(fixed_mask, fixed, device, subject, "fixed_mask")
        self.mm = _mask_tensor(moving_mask, moving, device, subject, "moving_mask")
        # which masks leave something out: none given and an all-ones mask (the workflow's ``missing: allones``)
        # are the same thing
        self.masked = (bool((self.fm <= 0).any()), bool((self.mm <= 0).any()))
        self.ones_f = torch.ones_like(self.f)
        self.ones_m = torch.ones_like(self.m)
        self._levels: dict[tuple, tuple[Level, Level]] = {}
        self._normalised: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._point_losses: dict[tuple, PointLoss] = {}
        self.labels: tuple[torch.Tensor, torch.Tensor] | None = None  # one-hot [1, K, ...], fixed and moving
        self._label_levels: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # centre of rotation: fixed mask centroid (physical); radius for parameter scaling
        _, com, cov = weighted_moments(self.fm, self.fgrid)
        self.center = com  # (dim,) float64, LPS mm
        self.radius = max(math.sqrt(max(float(np.trace(cov)), 0.0)), 1.0)  # RMS distance from the centre, mm

    def levels(self, scale: int, sigma: float | None, use: tuple[bool, bool] = (True, True)) -> tuple[Level, Level]:
        """The (fixed, moving) pyramid levels at shrink ``scale``; ``use`` says which side's mask the stage uses
        (a side whose mask is not used gets an all-ones one).

        How a level's image is smoothed depends on the mask's kind. Outside an ``roi`` mask lies real anatomy,
        which the other image's level (without a mask, or with a mask that does not end at the same place)
        has smoothed in: the image is smoothed whole, as ANTs and elastix do, and the mask only weighs the loss.
        Smoothing within the ROI instead (normalised convolution) made the fixed level's values at the mask's
        edge averages of the inside alone against the moving level's averages of both sides, and the linear
        stages followed that difference (a brain mask eroded through the cortex: rigid rotated 28°, Dice
        0.58 -> 0.42). Outside a ``valid`` mask lies nothing: the image is smoothed within it (normalised
        convolution) and the mask is eroded through the pyramid (elastix's rule)."""
        key = (scale, sigma, tuple(use))
        if key not in self._levels:
            masks = (self.fm if use[0] else self.ones_f, self.mm if use[1] else self.ones_m)
            within = tuple(
                m if self.kinds[role] == "valid" else None for m, role in zip(masks, ("fixed", "moving"), strict=False)
            )
            fl = make_level(self.f, masks[0], self.fgrid, scale, sigma, smooth_within=within[0])
            target = min(fl.grid.spacing) if scale > 1 else None
            ml = make_level(
                self.m, masks[1], self.mgrid, scale, sigma, target_min_spacing=target, smooth_within=within[1]
            )
            for role, lev, full, grid, used in (
                ("fixed", fl, masks[0], self.fgrid, use[0]),
                ("moving", ml, masks[1], self.mgrid, use[1]),
            ):
                if used and self.kinds[role] == "valid":
                    radii = tuple(reversed(valid_mask_radii(lev.factors, role)))
                    lev.mask = downsample_mask(erode_voxels(full, radii), grid, lev.grid, lev.factors)
            self._levels[key] = (fl, ml)
        return self._levels[key]

    def normalised(self, level_key: tuple, linear: LinearTransform) -> tuple[torch.Tensor, torch.Tensor]:
        """The level's images with normalised intensities (:func:`_normalised_intensities`; the moving side's
        scale from what ``linear``, the fixed → moving transform when the level is first used, brings into the
        fixed mask), cached: the stages of a registration share them."""
        if level_key not in self._normalised:
            self._normalised[level_key] = _normalised_intensities(*self.levels(*level_key), linear)
        return self._normalised[level_key]

    def point_loss(self, level_key: tuple, fraction: float, seed: int, linear: LinearTransform) -> PointLoss:
        """The level's :class:`PointLoss` (jittered points drawn from ``seed``), cached: the linear stages of a
        registration evaluate their pointwise losses at the same points, and build the gradient images once."""
        key = (level_key, fraction, seed)
        if key not in self._point_losses:
            fl, ml = self.levels(*level_key)
            f_n, m_n = self.normalised(level_key, linear)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._point_losses[key] = PointLoss(f_n, fl.mask, m_n, ml.mask, gen, fraction=fraction)
        return self._point_losses[key]

    def set_labels(self, fixed_labels: sitk.Image, moving_labels: sitk.Image) -> list[int]:
        """One-hot channels of the labels present in both maps (background excluded); returns them."""
        fa = sitk.GetArrayFromImage(fixed_labels)
        ma = sitk.GetArrayFromImage(moving_labels)
        if fa.shape != self.fgrid.shape or ma.shape != self.mgrid.shape:
            raise InputError(
                f"{where(self.subject)}label maps must lie on their images' grids (fixed labels "
                f"{fixed_labels.GetSize()}, moving labels {moving_labels.GetSize()})."
            )
        common = sorted(set(np.unique(fa).tolist()) & set(np.unique(ma).tolist()) - {0})
        if not common:
            raise InputError(
                f"{where(self.subject)}the label maps have no label in common, so the label term "
                f"has nothing to match (set label_weight: 0 or check the label maps)."
            )
        onehot = lambda a: torch.stack([torch.from_numpy((a == v).astype(np.float32)) for v in common])  # noqa
        self.labels = (onehot(fa)[None].to(self.device), onehot(ma)[None].to(self.device))
        return common

    def label_levels(self, fl: Level, ml: Level) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-hot labels at a level: each channel box-averaged like a mask (label fractions)."""
        key = (fl.grid, ml.grid)
        if key not in self._label_levels:
            assert self.labels is not None
            self._label_levels[key] = (
                downsample_mask(self.labels[0], self.fgrid, fl.grid, fl.factors),
                downsample_mask(self.labels[1], self.mgrid, ml.grid, ml.factors),
            )
        return self._label_levels[key]


def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``1 - mean_k 2 Σ w f_k m_k / (Σ w f_k + Σ w m_k)`` over the label channels, weighted by the mask."""
    dims = tuple(range(2, fixed_onehot.dim()))
    inter = (w * fixed_onehot * warped_onehot).sum(dims)
    total = (w * fixed_onehot).sum(dims) + (w * warped_onehot).sum(dims)
    return 1.0 - (2 * inter / total.clamp_min(1e-6)).mean()


def _level_maps(fixed_grid: Grid, moving_grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-side grid's normalised → physical and the moving level's physical → normalised matrices
    (homogeneous, float32), computed once per level (the fixed side: a level's grid or its ROI box)."""
    return (
        torch.as_tensor(fixed_grid.normalised_to_physical(), dtype=torch.float32, device=device),
        torch.as_tensor(moving_grid.physical_to_normalised(), dtype=torch.float32, device=device),
    )


def _theta(h: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], dim: int) -> torch.Tensor:
    """``(1, dim, dim+1)`` affine_grid matrix: fixed-level normalised → moving-level normalised."""
    n_f, p_m = maps
    return (p_m @ h @ n_f)[None, :dim]


def _normalised_intensities(fl: Level, ml: Level, linear: LinearTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Both level images mapped to about [0, 1] by robust percentiles (:func:`intensity_scale`) of the values the
    loss compares: the fixed image inside its mask, and the moving image where ``linear`` (fixed → moving
    points) takes the fixed mask, inside the moving mask and the moving image (:func:`_moving_sampled_values`).
    The moving mask alone would not do: without one (a fixed ROI only) or with a valid-pixel mask, it is the
    whole image, whose percentiles depend on how much background the scan holds: a 24 mm ROI in a 96 x 80 x 40
    image scaled the moving image by its 99.5th percentile, 1/6 of the ROI's intensities, and MI's bins clamped
    the ROI to one bin. ``mse`` too: it compares values, so both images need one scale, and scans of the same
    contrast from two scanners or a template (the demo's MNI brain spans 0–235 where the T1 spans 0–159) differ by
    a gain and an offset that the fixed image's scale alone left in: SyN with mse then moved the brain out of
    its mask to lower the error (overlap 49 %, Dice 0.311 from an affine's 0.595, 0.5 % folded voxels; each
    image's own scale: 0.619, none folded). The same for every loss, so the stages of a registration share it."""
    off, sc = intensity_scale(fl.image, fl.mask)
    f_n = (fl.image - off) / sc
    vals = _moving_sampled_values(fl, ml, linear)
    if vals is not None:
        off, sc = intensity_scale(vals, torch.ones_like(vals))
    else:  # (almost) no overlap: the overlap check will say so; the moving mask's own values meanwhile
        off, sc = intensity_scale(ml.image, ml.mask)
    return f_n, (ml.image - off) / sc


# fixed-mask voxels sampled for the moving side's intensity percentiles (strided, so deterministic): ample for
# 0.5 / 99.5 % quantiles, and intensity_scale subsamples to 20 k values anyway
SCALE_POINTS = 100_000


def _moving_sampled_values(fl: Level, ml: Level, linear: LinearTransform, min_points: int = 64) -> torch.Tensor | None:
    """The moving level image's values ``[N]`` at the fixed level's mask voxels mapped by ``linear`` (fixed →
    moving points, physical LPS mm; trilinear), where they land inside the moving image and its mask (> 0.5);
    at most :data:`SCALE_POINTS` voxels, evenly strided. ``None`` when fewer than ``min_points`` land there."""
    dim = fl.grid.dim
    idx = torch.nonzero(fl.mask[0, 0] > 0)  # tensor order (z, y, x)
    if idx.shape[0] > SCALE_POINTS:
        idx = idx[:: -(-idx.shape[0] // SCALE_POINTS)]
    a = torch.as_tensor(
        (ml.grid.physical_to_normalised() @ linear.homogeneous() @ fl.grid.index_to_physical())[:dim],
        dtype=torch.float32,
        device=idx.device,
    )
    pts = idx.flip(1).to(torch.float32) @ a[:, :dim].T + a[:, dim]  # moving normalised (x, y[, z])
    grid = pts.reshape(1, -1, *([1] * (dim - 1)), dim)
    sampled, ins = grid_sample_inside(torch.cat([ml.image, ml.mask], 1), grid)
    keep = (ins[0, 0] > 0) & (sampled[0, 1] > 0.5)
    vals = sampled[0, 0][keep]
    return vals if vals.numel() >= min_points else None


class _AffineGrid:
    """``F.affine_grid(theta, [1, 1, *shape], align_corners=True)`` by broadcasting one normalised coordinate
    vector per axis: ``grid = Σ_a c_a θ[:, a] + θ[:, dim]``, one full-size operation instead of a batched
    matrix product over every voxel (no cuBLAS: nothing per-stream to allocate inside a CUDA graph)."""

    def __init__(self, shape: Sequence[int], device: torch.device):
        dim = len(shape)
        self.dim = dim
        self.coords = []
        for a in range(dim):  # a: x, y[, z]; tensor axis dim - 1 - a
            n = shape[dim - 1 - a]
            c = torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            view = [1] * (dim + 2)
            view[1 + (dim - 1 - a)] = n
            self.coords.append(c.reshape(view))

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``[1, *shape, dim]`` normalised sampling grid of ``theta`` ``(1, dim, dim+1)``."""
        t = theta[0]
        g = self.coords[0] * t[:, 0] + t[:, self.dim]
        for a in range(1, self.dim):
            g = g + self.coords[a] * t[:, a]
        return g


class _Sampler:
    """Evaluates ``(fixed, warped moving, weight)`` on every voxel of the fixed level (dense: for losses with
    neighbourhoods, for overlap reports and for scoring candidate starts). Pointwise losses of the linear
    stages use :class:`maskreg.engine.points.PointLoss` instead."""

    def __init__(self, fl: Level, ml: Level, f_norm, m_norm):
        self.fl, self.ml = fl, ml
        self.f = f_norm
        self.maps = _level_maps(fl.grid, ml.grid, f_norm.device)
        self.affine_grid = _AffineGrid(fl.grid.shape, f_norm.device)
        # moving image and mask sampled in one call: zero padding is exact for the image too, since points
        # outside the moving grid ([-1, 1] with align_corners) get weight 0 through ``inside``
        self.moving_and_mask = torch.cat([m_norm, ml.mask], 1)

    def __call__(self, h: torch.Tensor):
        grid = self.affine_grid(_theta(h, self.maps, self.fl.grid.dim))
        both, ins = grid_sample_inside(self.moving_and_mask, grid)
        warped, mm = both[:, :1], both[:, 1:]
        w = self.fl.mask * mm * ins
        return self.f, warped, w


def _overlap(sampler_dense: _Sampler, h: torch.Tensor, fixed_mask_sum: float) -> tuple[float, int, float]:
    with torch.no_grad():
        _, _, w = sampler_dense(h)
    total = float(w.sum())
    return total, int((w > 0.5).sum()), total / max(fixed_mask_sum, 1e-9)


def _moments(
    prob: _Problem, start: LinearTransform, stage: dict | None = None, alternatives: list[LinearTransform] | None = None
) -> LinearTransform:
    """Translate so the mask-weighted intensity centres of mass correspond: ``T(com_f) = com_m``.

    When only one image has a mask (an all-ones mask is none), its masked centre and the other image's whole
    centre are not the same thing (a hippocampus against a head), so three translations are scored with the
    stage's loss (default ``mi``) at a coarse level and the best is kept: masked centre against whole centre,
    whole against whole, and the start's (no translation). Each candidate is scored with the moving image scaled
    by what it samples, as the next stage would scale it. Scores of unoptimised poses can be close (a liver ROI
    in a 13-slice CT: −0.194 against −0.185) and rank them wrongly, so the losers go to ``alternatives``: the next
    linear stage refines them too at its first level and keeps the best optimum (:func:`_refined_first_level`).

    With ``principal_axes: true`` the rotation that maps the fixed image's principal axes (eigenvectors of the
    mask- and intensity-weighted second moments, in LPS mm) onto the moving image's is added. Each axis is
    known only up to its sign, so every proper rotation ``R = V_m S V_fᵀ`` (``S`` = diag(±1), det R = +1) and
    the rotation-free translation are scored the same way, and the best is kept. When either image has two
    nearly equal moments (ratio > 0.95), their axes have no reliable direction and the rotation is skipped.
    """
    stage = stage or {}
    dim = prob.dim

    def moments(img, mask, grid):
        # intensity above the mask's minimum, times the mask weight (the mask alone if that is all zero)
        low = torch.where(mask > 0, img, torch.full_like(img, math.inf)).min()
        total, com, cov = weighted_moments((img - low) * mask, grid)
        if not total > 0:
            _, com, cov = weighted_moments(mask, grid)
        return com, cov

    def translated(com_f, com_m) -> LinearTransform:
        return LinearTransform(start.matrix, start.translation + com_m - start.apply(com_f[None])[0], start.center)

    use = mask_use(stage)
    fm, mm = (prob.fm if use[0] else prob.ones_f), (prob.mm if use[1] else prob.ones_m)
    pairs = [(moments(prob.f, fm, prob.fgrid), moments(prob.m, mm, prob.mgrid))]
    one_sided = (prob.masked[0] and use[0]) != (prob.masked[1] and use[1])
    if one_sided:  # the whole images' centres too ("ones" is what a missing mask is)
        pairs.append((moments(prob.f, prob.ones_f, prob.fgrid), moments(prob.m, prob.ones_m, prob.mgrid)))
    out = translated(pairs[0][0][0], pairs[0][1][0])
    if not one_sided and not stage.get("principal_axes"):
        return out

    loss_name, loss_fn = get_loss(stage.get("loss", "mi"))
    scale = int(stage.get("scales", [4])[0])
    fl, ml = prob.levels(scale, None, mask_use(stage))

    def best_of(candidates: list[LinearTransform]) -> tuple[int, list[float]]:
        scores = []
        with torch.no_grad():
            for cand in candidates:
                # one scale for all favoured the candidate it was taken under; not cached (the next stage
                # makes its own under the transform kept here)
                dense = _Sampler(fl, ml, *_normalised_intensities(fl, ml, cand))
                h = torch.as_tensor(cand.homogeneous(), dtype=torch.float32, device=prob.device)
                fv, wv, w = dense(h)
                ok = float(w.sum()) >= 0.25 * float(fl.mask.sum())  # a candidate must keep a fair overlap
                scores.append(
                    float(loss_fn(fv, wv, w, window=int(stage.get("window", 5)), bins=int(stage.get("bins", 32))))
                    if ok
                    else math.inf
                )
        return int(np.argmin(scores)), scores

    (com_f, cov_f), (com_m, cov_m) = pairs[0]
    if one_sided:
        names = ["masked centre against whole centre", "whole centres", "the start's"]
        translations = [translated(cf, cm) for (cf, _), (cm, _) in pairs] + [start]
        best, scores = best_of(translations)
        log.info(
            "%sstage moments: a mask on one side only; translations scored by %s: %s; kept %s",
            where(prob.subject),
            loss_name,
            ", ".join(f"{n} {v:.4g}" for n, v in zip(names, scores, strict=False)),
            names[best],
        )
        if alternatives is not None:  # the next linear stage refines these too and keeps the best optimum
            alternatives.extend(
                translations[i] for i in np.argsort(scores, kind="stable") if i != best and np.isfinite(scores[i])
            )
        if best == 2:  # the start's alignment: no centres to turn the axes about
            return start
        (com_f, cov_f), (com_m, cov_m) = pairs[best]
        out = translated(com_f, com_m)
    if not stage.get("principal_axes"):
        return out
    ev_f, v_f = np.linalg.eigh(cov_f)
    ev_m, v_m = np.linalg.eigh(cov_m)
    if (
        min(ev_f[1:] / np.maximum(ev_f[:-1], 1e-12)).item() < 1 / 0.95
        or min(ev_m[1:] / np.maximum(ev_m[:-1], 1e-12)).item() < 1 / 0.95
    ):
        log.info(
            "%sstage moments: principal axes not distinct (moments %s, %s); rotation skipped",
            where(prob.subject),
            np.array2string(ev_f, precision=1),
            np.array2string(ev_m, precision=1),
        )
        return out
    candidates = [out]
    for signs in np.array(np.meshgrid(*[[1.0, -1.0]] * dim)).reshape(dim, -1).T:
        r = v_m @ np.diag(signs) @ v_f.T
        if np.linalg.det(r) < 0:
            continue
        c = start.center  # T(x) = R (x - com_f) + com_m, written with the start's centre
        candidates.append(LinearTransform(r, r @ (c - com_f) + com_m - c, c))
    best, scores = best_of(candidates)
    rel = candidates[best].matrix @ np.linalg.inv(start.matrix)
    angle = math.degrees(math.acos(float(np.clip((np.trace(rel) - (dim - 2)) / 2, -1.0, 1.0))))
    log.info(
        "%sstage moments: principal axes, %d candidate rotations scored by %s (%s); kept %s (%.1f°)",
        where(prob.subject),
        len(candidates),
        loss_name,
        ", ".join(f"{v:.4g}" for v in scores),
        "the translation only" if best == 0 else f"candidate {best}",
        angle,
    )
    return candidates[best]


PLATEAU_WINDOW = 10


def _plateau(trace: torch.Tensor, it: int, tol: float, window: int = PLATEAU_WINDOW) -> bool:
    """True when the mean loss of the last ``window`` iterations improved on the ``window`` before by less
    than the fraction ``tol`` (checked every 5 iterations, so the host reads the device trace rarely)."""
    if tol <= 0 or it < 2 * window or it % 5:
        return False
    recent = trace[it - 2 * window : it].cpu()
    prev, last = float(recent[:window].mean()), float(recent[window:].mean())
    return (prev - last) / (abs(prev) + 1e-12) < tol


def level_min_overlap(min_overlap: int, fixed_mask_sum: float, per_voxel: float = 1.0) -> float:
    """The overlap a level needs, in the level's voxels: ``min_overlap_voxels`` full-resolution fixed voxels
    (``per_voxel`` of them in one voxel of the level, so the same volume at every level), or half the level's
    fixed mask (sum of weights) where that is smaller. A small ROI has few voxels at a coarse level (a 15 mm
    ball: ~30 at 8 mm), and failing it for "too little overlap" while 90 % of it overlaps would be wrong; losing
    half of the mask is still an error. Counted in coarse voxels, 100 voxels at shrink 4 in 3D were 6,400 at full
    resolution: masks of different extents (a brain mask eroded through open sulci on one side, 1/3 of the
    other's volume) failed the coarsest level with 82 while ANTs registered them."""
    return min(float(min_overlap) / per_voxel, 0.5 * fixed_mask_sum)


def voxels_per_level_voxel(prob: _Problem, grid: Grid) -> float:
    """How many full-resolution fixed voxels one voxel of ``grid`` (a level of the fixed image) holds."""
    return float(np.prod(grid.spacing) / np.prod(prob.fgrid.spacing))


def _needed_text(need: float, min_overlap: int, per_voxel: float = 1.0) -> str:
    if need >= min_overlap / per_voxel - 1e-9:
        if per_voxel <= 1:
            return f"{need:.4g} are needed (min_overlap_voxels)"
        return (
            f"{need:.4g} are needed (min_overlap_voxels = {min_overlap} full-resolution voxels, "
            f"{per_voxel:.3g} in each voxel of this level)"
        )
    return (
        f"{need:.4g} are needed (half the fixed mask at this level, which is smaller than "
        f"min_overlap_voxels = {min_overlap})"
    )


def _check_start_overlap(
    prob: _Problem, level_name: str, ow: float, fixed_mask_sum: float, min_overlap: int, per_voxel: float = 1.0
) -> None:
    """Raise :class:`OverlapError` when a level starts with too little overlap; the advice depends on whether
    an earlier level had enough (then the optimisation, not the input, lost it)."""
    need = level_min_overlap(min_overlap, fixed_mask_sum, per_voxel)
    if ow >= need:
        return
    head = (
        f"{where(prob.subject)}{level_name}: only {ow:.0f} effective voxels of the fixed mask map inside the "
        f"moving image and its mask ({100 * ow / max(fixed_mask_sum, 1e-9):.1f}% of the fixed mask); at least "
        f"{_needed_text(need, min_overlap, per_voxel)}. "
    )
    if prob.last_level is None:
        raise OverlapError(head + "Check the initial alignment, the masks and the fields of view.")
    name, fraction = prob.last_level
    raise OverlapError(
        head + f"The overlap was {100 * fraction:.1f}% of the fixed mask at the end of {name}, " + _LOST_OVERLAP
    )


_LOST_OVERLAP = (
    "so the optimisation moved the fixed mask off the moving image or its mask: the loss fell by "
    "shrinking the overlap (typical of mse between different subjects or contrasts, or of a too "
    "high learning_rate). Use cc or mi, a lower learning_rate, or masks that exclude what differs."
)


def _finish_level(
    prob: _Problem,
    report: StageReport,
    level_name: str,
    grid: Grid,
    scale,
    it: int,
    trace: torch.Tensor,
    overlap: tuple[float, int],
    fixed_mask_sum: float,
    t0: float,
    converged: bool,
    loss_name: str,
    start_overlap: float,
    min_overlap: int,
) -> None:
    """Record a level's report (loss trace, ``overlap`` at its end: sum of weights and voxels with weight > 0.5,
    time) and log its one line; raise :class:`OverlapError` when the level ends with less overlap than
    ``min_overlap`` (it started with more)."""
    losses = trace[:it].cpu().tolist()
    ow, ov = overlap
    per_voxel = voxels_per_level_voxel(prob, grid)
    need = level_min_overlap(min_overlap, fixed_mask_sum, per_voxel)
    if ow < need:
        raise OverlapError(
            f"{where(prob.subject)}{level_name}: the overlap fell from {start_overlap:.0f} effective "
            f"voxels at the start of the level to {ow:.0f} after {it} iterations; at least "
            f"{_needed_text(need, min_overlap, per_voxel)}. The loss went from "
            f"{losses[0] if losses else math.nan:.5g} to {losses[-1] if losses else math.nan:.5g}, " + _LOST_OVERLAP
        )
    prob.last_level = (level_name, ow / max(fixed_mask_sum, 1e-9))
    rep = LevelReport(
        int(scale),
        list(grid.shape),
        it,
        losses[0] if losses else math.nan,
        losses[-1] if losses else math.nan,
        round(ow, 1),
        ov,
        round(ow / max(fixed_mask_sum, 1e-9), 4),
        round(time.perf_counter() - t0, 3),
        converged,
        [round(v, 6) for v in losses],
    )
    report.levels.append(rep)
    log.info(
        "%s%s, grid %s: %d iterations%s, %s %.5f -> %.5f, overlap %.0f voxels (%.1f%% of the fixed mask), %.2f s",
        where(prob.subject),
        level_name,
        "x".join(map(str, grid.size)),
        it,
        " (converged)" if converged else "",
        loss_name,
        rep.loss_first,
        rep.loss_last,
        ow,
        100 * rep.overlap_fraction,
        rep.seconds,
    )


def _interactive() -> bool:
    return sys.stderr.isatty()


def _cosine(lr: float, it: int, n_it: int) -> float:
    """Step size of iteration ``it`` (1-based) of ``n_it``: cosine decay from ``lr`` to 5 % of it (torch's
    CosineAnnealingLR with eta_min = 0.05 lr), for the linear and the deformable stages alike."""
    return 0.05 * lr + 0.95 * lr * 0.5 * (1 + math.cos(math.pi * (it - 1) / max(n_it, 1)))


class _Adam:
    """Adam (Kingma & Ba 2015; torch.optim.Adam's update and defaults) for one parameter tensor, with the
    step sizes of every iteration given up front (``lrs``, one per iteration) and the step count kept on the
    parameter's device, so an iteration never reads a value back to the host (graph-safe, see
    :mod:`maskreg.engine.stepper`). Not ``torch.optim``: creating its first optimizer imports ``torch._dynamo`` and
    sympy, 1.6 s of every job."""

    def __init__(
        self, p: torch.Tensor, lrs: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        self.p, self.lrs, self.b1, self.b2, self.eps = p, lrs, betas[0], betas[1], eps
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.t = torch.zeros(1, dtype=torch.long, device=p.device)  # steps done

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        lr = self.lrs.index_select(0, self.t)
        self.t += 1
        t = self.t.to(self.m.dtype)
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        denom = (self.v / (1 - torch.pow(self.b2, t))).sqrt_().add_(self.eps)
        self.p.sub_(lr / (1 - torch.pow(self.b1, t)) * self.m / denom)

    def converged(self) -> bool:
        """Adam has no convergence test of its own (the plateau test and the schedule end its levels)."""
        return False


class _RegularStep:
    """Regular-step gradient descent (ITK's ``RegularStepGradientDescentOptimizer``): each iteration moves the
    parameters by the current step length along the negative gradient direction (Euclidean norm of the
    scaled parameters: mm at the fixed mask's radius, see :mod:`maskreg.engine.linear`); the step length starts at
    ``lrs[0]`` and is halved whenever the gradient turns by more than 90° (the last step overshot the
    optimum), so it converges to the optimum's precision in a few halvings. Adam, by contrast, keeps moving
    every parameter by about its step size until the schedule decays: on the known 2 mm brain pair of
    ``benchmarks/bench_linear.py`` it needed 100 full-resolution iterations for the accuracy this reaches in
    10. The schedule ``lrs`` caps the step length too. Graph-safe like :class:`_Adam`."""

    RELAXATION = 0.5
    # a level has converged once its step is below 2⁻⁵ of the first (five halvings; the cosine cap alone never
    # gets there, it ends at 5 %): the optimum is then known to 1/128 voxel at learning_rate 0.25 voxel. On the
    # 2 mm brain pairs of bench_linear.py 4, 5 and 6 halvings gave the same accuracy (known pair 0.015-0.018 mm,
    # Dice within 0.003) and 5 took 0.6-0.8 s where
    # the plateau test alone took 0.9-1.2 s
    MIN_STEP_HALVINGS = 5

    def __init__(self, p: torch.Tensor, lrs: torch.Tensor):
        self.p, self.lrs = p, lrs
        self.step_len = lrs[0].clone()
        self.min_step = float(lrs[0]) * self.RELAXATION**self.MIN_STEP_HALVINGS
        self.prev = torch.zeros_like(p)
        self.t = torch.zeros(1, dtype=torch.long, device=p.device)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        lr = self.lrs.index_select(0, self.t)[0]
        self.t += 1
        turned = (grad * self.prev).sum() < 0
        self.step_len.copy_(torch.minimum(torch.where(turned, self.step_len * self.RELAXATION, self.step_len), lr))
        self.prev.copy_(grad)
        self.p.sub_(self.step_len * grad / grad.norm().clamp_min(1e-20))

    def converged(self) -> bool:
        """Whether the step has shrunk below 2⁻⁵ of the first (reads the step length back: call it rarely)."""
        return float(self.step_len) < self.min_step


def _schedule(lr: float, n_it: int, device: torch.device) -> torch.Tensor:
    """:func:`_cosine` step sizes of iterations 1..n_it as a tensor on ``device`` (one copy per level)."""
    return torch.tensor(
        [_cosine(lr, it, n_it) for it in range(1, max(n_it, 1) + 1)], dtype=torch.float32, device=device
    )


@dataclass
class _LinearRun:
    """What the levels of one linear stage share: the stage, its loss, the sampling and the point generator."""

    stage: dict
    loss_name: str
    loss_fn: Any
    random_n: int | None
    fraction: float
    seed: int
    min_overlap: int
    gen: torch.Generator

    def level_key(self, li: int) -> tuple:
        sigmas = self.stage.get("smoothing_sigmas") or [None] * len(self.stage["scales"])
        return int(self.stage["scales"][li]), sigmas[li], mask_use(self.stage)


def _run_linear_stage(
    prob: _Problem,
    stage: dict,
    start: LinearTransform,
    sampling,
    min_overlap: int,
    seed: int,
    report: StageReport,
    alternatives: Sequence[LinearTransform] = (),
) -> LinearTransform:
    """A linear stage from ``start`` (fixed → moving points), level by level; its first level also refines
    ``alternatives`` and the poses of a ``search`` (:func:`_refined_first_level`)."""
    kind = stage["type"]
    loss_name, loss_fn = get_loss(stage["loss"])
    random_n = sampling.get("random") if isinstance(sampling, dict) else None
    fraction = float(sampling.get("fraction", 1.0)) if isinstance(sampling, dict) else 1.0
    if random_n and loss_name in NEEDS_DENSE:
        raise MaskregError(
            f"stage {kind}: loss '{loss_name}' needs dense sampling (it uses neighbourhoods); "
            f"use mse, mi or nmi with random sampling."
        )
    gen = torch.Generator(device=prob.device)
    gen.manual_seed(seed)
    run = _LinearRun(stage, loss_name, loss_fn, random_n, fraction, seed, min_overlap, gen)
    current = start
    for li in range(len(stage["scales"])):
        if li == 0 and (stage.get("search") or alternatives):
            current = _refined_first_level(prob, run, current, list(alternatives), report)
        else:
            current = _run_linear_level(prob, run, li, current, report)
    return current


def _search_candidates(
    prob: _Problem, search: dict, kind: str, start: LinearTransform, seed: int
) -> list[LinearTransform]:
    """``start`` and ``candidates - 1`` random rigid poses around it: ``T_k(x) = start(R_k (x − c) + c + t_k)``
    with ``c`` the fixed mask's centre (LPS mm), ``R_k`` a rotation by an angle uniform in ``±angle_deg`` (3D:
    about a uniformly random axis; none for a ``translation`` stage) and ``t_k`` uniform in the cube
    ``±translation_mm`` (fixed space, mm). Seeded, so a registration stays deterministic."""
    rng = np.random.default_rng(seed)
    dim, c = prob.dim, prob.center
    angle = 0.0 if kind == "translation" else math.radians(float(search["angle_deg"]))
    out = [start]
    for _ in range(int(search["candidates"]) - 1):
        a = rng.uniform(-angle, angle)
        if dim == 2:
            r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        else:
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            r = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k  # Rodrigues
        t = rng.uniform(-1.0, 1.0, dim) * float(search["translation_mm"])
        pose = LinearTransform(r, t, c)  # x -> R (x - c) + c + t
        out.append(_compose_linear(start, pose))
    return out


def _compose_linear(outer: LinearTransform, inner: LinearTransform) -> LinearTransform:
    """``outer(inner(x))`` as one :class:`LinearTransform` (centre: ``outer``'s)."""
    h = outer.homogeneous() @ inner.homogeneous()
    d = outer.dim
    return _recenter(LinearTransform(h[:d, :d], h[:d, d], np.zeros(d)), outer.center)


def _pose_score(prob: _Problem, run: _LinearRun, level_key: tuple, tx: LinearTransform, min_weight: float) -> float:
    """The stage's loss of ``tx`` on every fixed-mask voxel of the level (dense), with the moving image scaled
    by what ``tx`` samples (as :func:`_moments` scores its candidates); ``inf`` when the weight sum is below
    ``min_weight`` (a pose that keeps little of the fixed mask cannot win by what it leaves out)."""
    fl, ml = prob.levels(*level_key)
    with torch.no_grad():
        dense = _Sampler(fl, ml, *_normalised_intensities(fl, ml, tx))
        fv, wv, w = dense(torch.as_tensor(tx.homogeneous(), dtype=torch.float32, device=prob.device))
        if float(w.sum()) < min_weight:
            return math.inf
        if run.loss_name in NEEDS_DENSE:  # as the stage optimises it: over the whole fixed mask (overlap-aware)
            return float(local_cc_over_region(fv, wv, w, float(fl.mask.sum()), int(run.stage["window"])))
        return float(run.loss_fn(fv, wv, w, window=int(run.stage["window"]), bins=int(run.stage["bins"])))


def _refined_first_level(
    prob: _Problem, run: _LinearRun, start: LinearTransform, alternatives: list[LinearTransform], report: StageReport
) -> LinearTransform:
    """The stage's first (coarsest) level optimised from several starts, and the best optimum kept: ``start``,
    the ``alternatives`` (other starts the moments stage scored) and, with ``search``, the best ``keep`` of the
    :func:`_search_candidates` poses scored by the stage's masked loss on the level (:func:`_pose_score`): a
    global search for starts beyond gradient descent's reach (greedy's ``-search``, ANTs' ``antsAI``). The
    optima are compared by :func:`_pose_score`; the kept run's level report is the stage's first."""
    kind = run.stage["type"]
    search = run.stage.get("search") or {"candidates": 1, "keep": 1, "angle_deg": 0.0, "translation_mm": 0.0}
    level_key = run.level_key(0)
    fl, ml = prob.levels(*level_key)
    t0 = time.perf_counter()
    candidates = _search_candidates(prob, search, kind, start, run.seed)
    h_start = torch.as_tensor(start.homogeneous(), dtype=torch.float32, device=prob.device)
    fsum = float(fl.mask.sum())
    start_weight = _overlap(_Sampler(fl, ml, fl.image, ml.image), h_start, fsum)[0]
    min_weight = max(
        0.5 * start_weight, level_min_overlap(run.min_overlap, fsum, voxels_per_level_voxel(prob, fl.grid))
    )
    scores = np.array([_pose_score(prob, run, level_key, c, min_weight) for c in candidates])
    keep = int(search["keep"])
    order = [int(i) for i in np.argsort(scores, kind="stable")[:keep] if np.isfinite(scores[i])]
    if 0 not in order:  # the start itself is always refined: the search can only add to it
        order = order[: keep - 1] + [0]
    if run.stage.get("search"):
        log.info(
            "%sstage %s: search scored %d poses (±%g°, ±%g mm) by %s in %.2f s; start %.5g, best %.5g",
            where(prob.subject),
            kind,
            len(candidates),
            search["angle_deg"],
            search["translation_mm"],
            run.loss_name,
            time.perf_counter() - t0,
            scores[0],
            float(np.min(scores)),
        )
    candidates += alternatives
    order += list(range(len(candidates) - len(alternatives), len(candidates)))
    best: tuple[float, LinearTransform, StageReport, int] | None = None
    first_error: OverlapError | None = None
    for i in order:
        rep = StageReport(report.type, report.loss, 0.0)
        try:
            end = _run_linear_level(prob, run, 0, candidates[i], rep)
        except OverlapError as exc:
            first_error = first_error or exc
            continue
        score = _pose_score(prob, run, level_key, end, 0.0)
        if best is None or score < best[0]:
            best = (score, end, rep, i)
    if best is None:
        assert first_error is not None
        raise first_error
    log.info(
        "%sstage %s: level 1 optimised from %d starts; kept %s (%s %.5g)",
        where(prob.subject),
        kind,
        len(order),
        "the start" if best[3] == 0 else f"start {order.index(best[3]) + 1}",
        run.loss_name,
        best[0],
    )
    report.levels.extend(best[2].levels)
    return best[1]


def _run_linear_level(
    prob: _Problem, run: _LinearRun, li: int, current: LinearTransform, report: StageReport
) -> LinearTransform:
    """One pyramid level of a linear stage from ``current``; appends its :class:`LevelReport` to ``report`` and
    returns the level's transform (fixed → moving points)."""
    stage, loss_name, random_n = run.stage, run.loss_name, run.random_n
    fraction, seed, min_overlap, gen = run.fraction, run.seed, run.min_overlap, run.gen
    kind, scales = stage["type"], stage["scales"]
    scale, n_it = int(scales[li]), int(stage["iterations"][li])
    dev = prob.device
    t0 = time.perf_counter()
    level_key = run.level_key(li)
    valid_moving = prob.kinds["moving"] == "valid" and level_key[2][1]
    fl, ml = prob.levels(*level_key)
    f_n, m_n = prob.normalised(level_key, current)
    maps = _level_maps(fl.grid, ml.grid, dev)
    fsum = float(fl.mask.sum())
    p = torch.zeros(lin.n_params(kind, prob.dim), device=dev, requires_grad=True)
    h0 = lin.homogeneous(kind, p.detach(), current, prob.radius)
    # pointwise losses: jittered fixed-mask points, gradient through the moving gradient image (see
    # maskreg.engine.points: no interpolation bias, no grid_sample backward); cc: every voxel, through autograd
    if loss_name in NEEDS_DENSE:
        points, dense = None, _Sampler(fl, ml, f_n, m_n)
        ow = _overlap(dense, h0, fsum)[0]
    else:
        points = (
            PointLoss(f_n, fl.mask, m_n, ml.mask, gen, random_n)
            if random_n
            else prob.point_loss(level_key, fraction, seed, current)
        )
        ow = points.overlap(_theta(h0, maps, prob.dim)[0])[0]
    level_name = f"stage {kind}, level {li + 1}/{len(scales)} (scale {scale})"
    _check_start_overlap(prob, level_name, ow, fsum, min_overlap, voxels_per_level_voxel(prob, fl.grid))
    lr = stage["learning_rate"][li] * float(np.mean(fl.grid.spacing))
    opt = (_RegularStep if stage["optimizer"] == "regular_step" else _Adam)(p, _schedule(lr, n_it, dev))
    trace = torch.zeros(max(n_it, 1), device=dev)
    start_t = lin.start_tensors(current, dev)
    window, bins = int(stage["window"]), int(stage["bins"])

    def iteration(_key) -> None:  # graph-safe: see maskreg.engine.stepper
        h = lin.homogeneous(kind, p, start_t, prob.radius)
        if points is not None:
            theta = _theta(h, maps, prob.dim)[0]
            loss, dtheta = points(theta, VALUE_AND_GRAD[loss_name], bins=bins)
            # chain through θ as a scalar: autograd.grad with grad_outputs imports sympy (0.7 s, once)
            (grad,) = torch.autograd.grad((theta * dtheta).sum(), [p])
        else:
            fixed_v, warped_v, w = dense(h)  # cc, the one loss that runs densely here
            if valid_moving:  # a field of view's edge is an artefact: it must not pull (only an ROI's may)
                w = w.detach()
            loss = local_cc_over_region(fixed_v, warped_v, w, fsum, window)
            (grad,) = torch.autograd.grad(loss, [p])
        trace.index_copy_(0, opt.t, loss.detach().reshape(1))
        opt.step(grad)

    # random sampling draws new points at every iteration: not graph-safe, so eager
    stepper = Stepper(iteration, dev, graphs=not random_n)
    # a loss drawn from random samples is noisy by construction: its plateau test would stop at random,
    # so random sampling runs the level's whole (cosine-decayed) schedule
    tol = 0.0 if random_n else float(stage["tolerance"])
    converged, it = False, 0
    bar = None
    if _interactive():
        from tqdm import tqdm

        bar = tqdm(total=n_it, desc=f"{kind} s{scale}", leave=False)
    for it in range(1, n_it + 1):
        stepper()
        if bar is not None:
            bar.update(1)
        # tolerance 0 turns both early stops off (random sampling: a noisy gradient halves the step at random)
        if _plateau(trace, it, tol) or (tol > 0 and it % 5 == 0 and opt.converged()):
            converged = True
            break
    if bar is not None:
        bar.close()
    stepper.close()
    current = lin.to_linear(kind, p.detach(), current, prob.radius)
    h_end = lin.homogeneous(kind, torch.zeros_like(p), current, prob.radius)
    if points is None:
        end_overlap = _overlap(dense, h_end, fsum)[:2]
    else:
        end_overlap = points.overlap(_theta(h_end, maps, prob.dim)[0])
    _finish_level(
        prob,
        report,
        level_name,
        fl.grid,
        scale,
        it,
        trace,
        end_overlap,
        fsum,
        t0,
        converged,
        loss_name,
        ow,
        min_overlap,
    )
    return current


def _stage_config(stage: dict) -> dict:
    """A linear or deformable stage with every setting filled: :func:`maskreg.stages.resolve_stage`."""
    return resolve_stage(stage)


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    stages: Sequence[dict] | None = None,
    *,
    device: str = "auto",
    seed: int = 0,
    sampling: str | dict = "dense",
    min_overlap_voxels: int = 100,
    initial: LinearTransform | sitk.Transform | None = None,
    subject: str | None = None,
    threads: int | None = None,
    mask_kinds: tuple[str, str] = ("roi", "roi"),
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and return the fixed → moving transform with a report.

    Images are SimpleITK images of the same dimension (2D or 3D) with any grids; masks (optional) are binary
    images on their image's grid (see :mod:`maskreg.masks`). ``stages`` is a list of dicts such as
    ``{"type": "rigid", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]}``; types:
    ``moments``, ``translation``, ``rigid``, ``similarity``, ``affine``. ``sampling`` is ``"dense"`` or
    ``{"random": N}`` (N points drawn from the fixed mask's voxels at each iteration, seeded by ``seed``) or
    ``{"fraction": f}`` (a seeded subset of that fraction of the fixed-mask voxels per level); it applies to the
    pointwise losses of linear stages, whose points are jittered within their voxels (:mod:`maskreg.engine.points`).
    ``mask_kinds`` gives the (fixed, moving) mask kinds: ``roi`` masks weight the loss as they are; ``valid``
    masks are also eroded at every level by elastix's rule (``s+1`` voxels fixed, ``2s+1`` moving at shrink
    factor ``s``) so an artificial edge (field of view, ultrasound cone) cannot pull the registration.
    ``fixed_labels``/``moving_labels`` (integer maps on their images' grids) feed the optional label term of
    deformable stages: ``label_weight × (1 − soft Dice)`` over the labels present in both.

    ``initial`` (fixed → moving points) is where the stages start: a :class:`LinearTransform` (or a linear
    SimpleITK transform) is refined by the linear stages; a transform holding a displacement field (ANTs'
    ``[1Warp.nii.gz, 0GenericAffine.mat]``, :func:`maskreg.transforms.read_transform`) is kept fixed and the
    stages register the fixed image to the moving image resampled through it, as ANTs'
    ``--initial-moving-transform`` does; the result is the whole chain (see :func:`_after_nonlinear_initial`).

    A bad stage list raises :class:`~maskreg.errors.ConfigError` listing every problem before any work is done
    (:func:`maskreg.stages.stage_list_problems`, the checks of the CLI and the workflow's config validation).
    """
    check_stages(stages, sampling, where(subject))
    if initial is not None and not isinstance(initial, LinearTransform):
        try:
            initial = LinearTransform.from_sitk(initial)
        except ValueError:
            return _after_nonlinear_initial(
                fixed,
                moving,
                fixed_mask,
                moving_mask,
                initial,
                stages=stages,
                device=device,
                seed=seed,
                sampling=sampling,
                min_overlap_voxels=min_overlap_voxels,
                subject=subject,
                threads=threads,
                mask_kinds=mask_kinds,
                fixed_labels=fixed_labels,
                moving_labels=moving_labels,
            )
    for k in mask_kinds:
        if k not in ("roi", "valid"):
            raise MaskregError(f"unknown mask kind '{k}'; choose roi or valid")
    t_start = time.perf_counter()
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    _check_pair(fixed, moving, subject)
    prob = _Problem(fixed, moving, fixed_mask, moving_mask, dev, subject, tuple(mask_kinds))
    if (
        fixed_labels is not None
        and moving_labels is not None
        and any(float(s.get("label_weight", 0) or 0) > 0 for s in (stages or []))
    ):
        common = prob.set_labels(fixed_labels, moving_labels)
        log.info("%slabel term over %d label(s): %s", where(subject), len(common), common)
    center = prob.center.copy()
    t_setup = _synced_clock(dev)
    current = LinearTransform.identity(prob.dim, center) if initial is None else _recenter(initial, center)
    reports: list[StageReport] = []
    alternatives: list[LinearTransform] = []  # other starts for the next linear stage (from moments)
    state: FieldState | None = None
    for i, raw in enumerate(stages if stages is not None else DEFAULT_STAGES):
        kind = raw["type"]
        t0 = time.perf_counter()
        if kind in dfm.DEFORMABLE_STAGES:
            stage = _deformable_config(raw)
            rep = StageReport(kind, get_loss(stage["loss"])[0], 0.0)
            state = _run_deformable_stage(prob, stage, current, state, min_overlap_voxels, rep)
            rep.seconds = round(time.perf_counter() - t0, 3)
            reports.append(rep)
            continue
        if state is not None:
            raise MaskregError(f"stage {i + 1} ({kind}): linear stages must come before deformable ones.")
        if kind == "moments":
            alternatives = []
            current = _moments(prob, current, raw, alternatives)
            reports.append(StageReport("moments", None, round(time.perf_counter() - t0, 3)))
            log.info(
                "%sstage moments: translation %s mm", where(subject), np.array2string(current.translation, precision=2)
            )
            continue
        if kind not in lin.LINEAR_STAGES:
            raise MaskregError(
                f"stage {i + 1}: unknown type '{kind}' (this engine runs moments, "
                f"{', '.join(lin.LINEAR_STAGES + dfm.DEFORMABLE_STAGES)})"
            )
        stage = _stage_config(raw)
        rep = StageReport(kind, get_loss(stage["loss"])[0], 0.0)
        current = _run_linear_stage(prob, stage, current, sampling, min_overlap_voxels, seed + i, rep, alternatives)
        alternatives = []
        rep.seconds = round(time.perf_counter() - t0, 3)
        reports.append(rep)
    result = RegistrationResult(current, prob.fgrid, str(dev), 0.0, reports)
    t_stages = _synced_clock(dev)
    result.phase_seconds["set-up"] = round(t_setup - t_start, 3)
    result.phase_seconds["stages"] = round(t_stages - t_setup, 3)
    if state is not None:
        fwd, inv, ops = _full_resolution_fields(prob, state)
        det = dfm.jacobian_determinant(fwd, ops)
        result.jacobian_min = float(det.min())
        result.jacobian_nonpositive_fraction = float((det <= 0).float().mean())
        t_fields = _synced_clock(dev)
        result.phase_seconds["full-resolution fields"] = round(t_fields - t_stages, 3)
        result.set_fields(fwd, inv)  # SimpleITK images on first read of result.displacement
    result.seconds = time.perf_counter() - t_start
    return result


def _synced_clock(dev: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work (phase timings)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _after_nonlinear_initial(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    initial: sitk.Transform,
    *,
    moving_labels: sitk.Image | None = None,
    subject: str | None = None,
    **kwargs: Any,
) -> RegistrationResult:
    """Register with a fixed nonlinear initial transform ``T0``: the stages find ``S`` between the fixed image
    and ``moving ∘ T0`` (resampled once onto the fixed grid, with its mask, labels and the region where ``T0``
    stays inside the moving image), and the result is ``T = T0 ∘ S``.

    ``T`` is written in maskreg's form ``L'(x + u'(x))``: with ``T0 = A0 ∘ N0`` (``A0``: the linear
    transforms applied last, e.g. ANTs' ``0GenericAffine.mat``) and ``S = L ∘ (id + u)``, ``L' = A0 ∘ L`` and
    ``u'(x) = L⁻¹(N0(L(x + u(x)))) − x``, exact at the fixed grid's voxels; the inverse field is ``u'``'s
    numerical inverse. Moving content outside the fixed grid's field of view is not seen by the stages.
    """
    from maskreg import transforms as tfm
    from maskreg.warp import warp_image, warp_labels, warp_mask

    t0 = time.perf_counter()
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    in_view = warp_mask(ones, fixed, initial)
    if int(sitk.GetArrayViewFromImage(in_view).sum()) == 0:
        raise OverlapError(
            f"{where(subject, 'initial_transform')}maps no voxel of the fixed image inside the moving image."
        )
    moving0 = warp_image(moving, fixed, initial)
    mask0 = in_view if moving_mask is None else warp_mask(moving_mask, fixed, initial) * in_view
    labels0 = None if moving_labels is None else warp_labels(moving_labels, fixed, initial, subject=subject)
    log.info(
        "%snonlinear initial transform: moving image resampled onto the fixed grid (%.1f s)",
        where(subject),
        time.perf_counter() - t0,
    )
    res = register(fixed, moving0, fixed_mask, mask0, moving_labels=labels0, subject=subject, **kwargs)

    a0, rest = tfm.split_trailing_linear(initial)
    lin = res.linear
    parts = [
        s
        for s in [
            tfm.displacement_transform(res.displacement) if res.displacement is not None else None,
            lin.to_sitk(),
            *rest,
            lin.inverse().to_sitk(),
        ]
        if s is not None
    ]
    size, grid = fixed.GetSize(), res.fixed_grid
    disp = sitk.TransformToDisplacementField(
        tfm.compose_sitk(parts),
        sitk.sitkVectorFloat64,
        size,
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    dev = pick_device(kwargs.get("device", "auto"))
    ops = dfm.FieldOps(grid, dev)
    u = torch.as_tensor(np.moveaxis(sitk.GetArrayFromImage(disp), -1, 0)[None], dtype=torch.float32, device=dev)
    with torch.no_grad():
        inv = ops.invert(u)
        det = dfm.jacobian_determinant(u, ops)
    res.linear = tfm.compose(a0, lin)
    res.set_fields(u, inv)
    res.jacobian_min = float(det.min())
    res.jacobian_nonpositive_fraction = float((det <= 0).float().mean())
    res.initial_nonlinear = True
    res.seconds = time.perf_counter() - t0
    return res


def _recenter(tx: LinearTransform, center: np.ndarray) -> LinearTransform:
    """The same map expressed with another centre."""
    h = tx.homogeneous()
    a = h[: tx.dim, : tx.dim]
    return LinearTransform(a, h[: tx.dim, tx.dim] + a @ center - center, center)


# --------------------------------------------------------------------------------------------------------
# deformable stages (see maskreg.engine.fields for the maths and conventions)


@dataclass
class FieldState:
    """The deformable part so far: the field (``greedy``: displacement, ``syn``: velocity) on ``ops``'s grid."""

    kind: str
    ops: dfm.FieldOps
    field: torch.Tensor


def _deformable_config(stage: dict) -> dict:
    """A deformable stage with every setting filled: :func:`maskreg.stages.resolve_stage`."""
    return resolve_stage(stage)


def resolved_stage(stage: dict) -> dict:
    """A stage as :func:`register` runs it (:func:`maskreg.stages.resolve_stage`): every setting, the defaults
    filled in and ``learning_rate`` one value per scale (``moments`` comes back as given). For reports and
    benchmarks."""
    return resolve_stage(stage)


def _run_deformable_stage(
    prob: _Problem,
    stage: dict,
    linear: LinearTransform,
    state: FieldState | None,
    min_overlap: int,
    report: StageReport,
) -> FieldState:
    kind = stage["type"]
    loss_name, loss_fn = get_loss(stage["loss"])
    dev = prob.device
    dim = prob.dim
    sigmas = stage.get("smoothing_sigmas") or [None] * len(stage["scales"])
    if state is not None and state.kind != kind:
        raise MaskregError(f"stage {kind} cannot follow a {state.kind} stage; use one deformable type.")
    for li, (scale, n_it, sig) in enumerate(zip(stage["scales"], stage["iterations"], sigmas, strict=True)):
        t0 = time.perf_counter()
        level_key = (int(scale), sig, mask_use(stage))
        fl, ml = prob.levels(*level_key)
        f_n, m_n = prob.normalised(level_key, linear)  # shared with the linear stages at the same level
        # the field lives on the fixed mask's box plus a margin (the ROI box), not on the whole level grid
        wgrid, box = roi_box(fl.grid, fl.mask, roi_margin(stage))
        ops = dfm.FieldOps(wgrid, dev, coarse_exp=kind == "syn")
        field = torch.zeros(1, dim, *wgrid.shape, device=dev) if state is None else state.ops.upsample(state.field, ops)
        state = FieldState(kind, ops, field)
        # each side's map from a physical point of the box to its level's normalised coordinates (homogeneous,
        # numpy); the fixed image moves too (syn). Its linear part maps a displacement (mm) to normalised offsets.
        moving_map = ml.grid.physical_to_normalised() @ linear.homogeneous()
        fixed_map = fl.grid.physical_to_normalised()
        to_moving, to_fixed = moving_map[:dim, :dim], fixed_map[:dim, :dim]

        label_weight = float(stage.get("label_weight", 0.0)) if prob.labels is not None else 0.0
        f_lab, m_lab = prob.label_levels(fl, ml) if label_weight > 0 else (None, None)

        # each side's image, mask (and labels) sampled in one call, zero padding: points outside a grid get
        # weight 0 through ``inside``, so the padding value never reaches a loss
        moving_stack = torch.cat([m_n, ml.mask] + ([m_lab] if m_lab is not None else []), 1)
        fixed_stack = torch.cat([f_n, fl.mask] + ([f_lab] if f_lab is not None else []), 1)
        fixed_box = fixed_stack[(slice(None), slice(None)) + box]  # the fixed stack where it does not move
        # 3D on the CPU: sampling at "affine map of the voxel index + matrix @ field" in one compiled pass, no
        # sampling grid stored (maskreg.engine.cpu_kernels.sample_mapped); otherwise the two maps' affine grids
        fused = dim == 3 and cpu_kernels.enabled(moving_stack, fixed_stack)
        reach = [0.0]  # mm: a bound of the fixed side's displacement |exp(-v/2)| (0 for greedy)

        def squarings_for(vmax_vox: float) -> int:
            """exp(±v/2)'s squarings for a field whose longest vector is ``vmax_vox`` voxels; sets the sampled rows'
            reach, ``|exp(-v/2)| <= max|v| / 2`` (mm)."""
            reach[0] = 0.5 * vmax_vox * min(wgrid.spacing)
            return ops.iteration_squarings(0.5 * vmax_vox)

        if fused:
            index_to_moving, index_to_fixed = ((m @ wgrid.index_to_physical())[:dim] for m in (moving_map, fixed_map))
            # rows of the box where the weight can be nonzero for the current field (maskreg.engine.support)
            support = WeightSupport(fixed_box[0, 1].numpy(), wgrid.spacing)
        else:
            g0, f_ident = (
                F.affine_grid(
                    torch.as_tensor((m @ wgrid.normalised_to_physical())[None, :dim], dtype=torch.float32, device=dev),
                    [1, 1, *wgrid.shape],
                    align_corners=True,
                )
                for m in (moving_map, fixed_map)
            )

        def sample(u_fixed: torch.Tensor | None, u_moving: torch.Tensor):
            """Both sides' stacks (image, mask[, labels]) at their half-way points and the weight ``w``."""
            if fused:
                rows = support.rows(reach[0])
                ms, w = cpu_kernels.sample_mapped(moving_stack, index_to_moving, to_moving, u_moving, rows)
                if u_fixed is None:
                    return fixed_box, ms, w.mul_(fixed_box[:, 1:2])
                fs, w = cpu_kernels.sample_mapped(fixed_stack, index_to_fixed, to_fixed, u_fixed, rows, prior=w)
                return fs, ms, w
            grid = g0 + ops.offsets(u_moving, to_moving)
            ms, ins = grid_sample_inside(moving_stack, grid)
            w = ms[:, 1:2] * ins
            if u_fixed is None:
                fs = fixed_box
                w = w * fs[:, 1:2]
            else:
                fgrid = f_ident + ops.offsets(u_fixed, to_fixed)
                fs, ins = grid_sample_inside(fixed_stack, fgrid)
                w = w * fs[:, 1:2] * ins
            return fs, ms, w

        def objective(fs: torch.Tensor, ms: torch.Tensor, w: torch.Tensor):
            """(similarity loss, total with the label term) of sampled stacks; ``w`` is held constant."""
            loss = loss_fn(fs[:, :1], ms[:, :1], w, window=window, bins=bins)
            if m_lab is None:
                return loss, loss
            return loss, loss + label_weight * soft_dice_loss(fs[:, 2:], ms[:, 2:], w)

        def sampled(field: torch.Tensor):
            """:func:`sample` of ``field`` as an iteration samples it, through the iterations' own exponentials
            (coarse on large grids): the exact ones on the full grid cost ~0.4 s at 2 mm each."""
            if kind == "syn":
                return sample(*ops.exp_pair_in_iteration(field, squarings_for(ops.max_voxels(field)), 0.5))
            return sample(None, field)

        with torch.no_grad():
            # the weight at the level's start (overlap check); the first iteration uses these samples (eager
            # calls only: the field has not changed), so the check costs no sampling of its own
            first = [sampled(state.field)]
            w = first[0][2]
        ow, fsum = float(w.sum()), float(fl.mask.sum())  # the box holds the whole fixed mask
        level_name = f"stage {kind}, level {li + 1}/{len(stage['scales'])} (scale {scale})"
        _check_start_overlap(prob, level_name, ow, fsum, min_overlap, voxels_per_level_voxel(prob, wgrid))
        trace = torch.zeros(max(n_it, 1), device=dev)
        tol = float(stage["tolerance"])
        lrs = _schedule(stage["learning_rate"][li], n_it, dev)
        count = torch.zeros(1, dtype=torch.long, device=dev)  # iterations done
        vmax = ops.max_voxels_t(state.field)  # max |field| (voxels) after the last update
        fluid, elastic = float(stage["fluid_sigma"]), float(stage["elastic_sigma"])
        window, bins = int(stage["window"]), int(stage["bins"])
        buf = state.field  # updated in place: the iteration's state lives at fixed addresses (graph-safe)
        # channels whose loss gradient moves the field: the image and the labels, not the mask (a weight)
        moved = [0] + list(range(2, moving_stack.shape[1]))

        def displacement_gradient(terms) -> torch.Tensor:
            """∂loss/∂u (``[1, dim, *shape]``, per mm) of ``Σ alpha · (stack, dstack)`` terms by the chain rule: the
            loss's gradient in each sampled channel times that channel's spatial gradient on the level grid (the
            warped image's gradient, ANTs' and greedy's choice), instead of ``grid_sample``'s backward (a second,
            slower pass). 3D CPU: each term accumulated in one compiled pass."""
            if fused:
                g = torch.zeros(1, dim, *wgrid.shape)
                for stack, dstack, alpha in terms:
                    for c in moved:
                        cpu_kernels.add_gradient_product(
                            g, stack[:, c : c + 1], dstack[:, c : c + 1], ops.index_to_physical_gradient, alpha
                        )
                return g
            g = None
            for stack, dstack, alpha in terms:
                for c in moved:
                    term = (alpha * dstack[:, c : c + 1]) * ops.spatial_gradient(stack[:, c : c + 1])
                    g = term if g is None else g + term
            return g

        # the weight of the latest loss evaluation, for the level's closing overlap (as the loss trace's last
        # value: before the last update); a graphed iteration copies it into a buffer that outlives the replays
        last_w: list[torch.Tensor | None] = [None]
        w_buffer = torch.zeros_like(fixed_box[:, 1:2]) if graphs_enabled(dev) else None

        def iteration(squarings) -> None:  # graph-safe: see maskreg.engine.stepper
            reg = None
            with torch.no_grad():
                if first[0] is not None:  # the first call, eager on every device (maskreg.engine.stepper)
                    fs, ms, w = first[0]
                    first[0] = None
                elif kind == "syn":
                    uf, um = ops.exp_pair_in_iteration(buf, squarings, 0.5)  # exp(∓v/2)
                    fs, ms, w = sample(uf, um)
                else:
                    fs, ms, w = sample(None, buf)
                if w_buffer is not None:
                    w_buffer.copy_(w)
                    last_w[0] = w_buffer
                else:
                    last_w[0] = w
            fs_l = fs.detach().requires_grad_(kind == "syn")
            ms_l = ms.detach().requires_grad_(True)
            loss, total = objective(fs_l, ms_l, w)
            if kind == "syn" and loss_name in MOVING_GRADIENT_ONLY:
                # mi/nmi bin their first argument without a gradient (Mattes' zero-order window), so the fixed
                # side's gradient comes from the same (symmetric) loss with the roles swapped
                total = total + loss_fn(ms[:, :1], fs_l[:, :1], w, window=window, bins=bins)
            leaves = [ms_l] + ([fs_l] if kind == "syn" else [])
            if _has_reg(stage):
                field = buf.detach().requires_grad_(True)
                reg = _regulariser(stage, field)
                total = total + reg
                leaves.append(field)
            grads = torch.autograd.grad(total, leaves)
            with torch.no_grad():
                # syn: ½(∂/∂u₊ − ∂/∂u₋), u₋ = exp(-v/2) moves the fixed image
                g = displacement_gradient(
                    [(ms, grads[0], 0.5), (fs, grads[1], -0.5)] if kind == "syn" else [(ms, grads[0], 1.0)]
                )
                if reg is not None:
                    g = g + grads[-1]
                # a step of the scheduled size (voxels) along the smoothed gradient; vmax: only exp's squarings
                ops.update(
                    buf, g, lrs.index_select(0, count), fluid, elastic, kind == "syn", vmax if kind == "syn" else None
                )
                trace.index_copy_(0, count, loss.detach().reshape(1))
                count.add_(1)

        stepper = Stepper(iteration, dev)
        converged, it = False, 0
        for it in range(1, n_it + 1):
            # exp(±v/2) needs enough squarings for the current field: one read-back per iteration
            stepper(squarings_for(float(vmax)) if kind == "syn" else None)
            if _plateau(trace, it, tol):
                converged = True
                break
        stepper.close()
        w = last_w[0]
        if w is None:  # no iteration ran
            w = first[0][2]
        first[0] = None
        _finish_level(
            prob,
            report,
            level_name,
            wgrid,
            scale,
            it,
            trace,
            (float(w.sum()), int((w > 0.5).sum())),
            fsum,
            t0,
            converged,
            loss_name,
            ow,
            min_overlap,
        )
    assert state is not None
    return state


def roi_margin(stage: dict) -> int:
    """Voxels kept around the fixed mask's box: the fluid smoothing spreads each update over its 3-sigma kernel,
    and 3 more voxels let the field decay (elastic). The loss needs none: its weight is 0 outside the mask, so a
    CC window reaching past the mask's edge adds nothing from there (a ``window // 2`` term cost 12 % more voxels
    at full resolution on the 2 mm brain pair, with the same Dice and TRE). It is enough: with exact exponentials,
    the box's field inside a 12 mm ROI matches the whole grid's to 0.0013 mm, and 8 or 12 more voxels change
    nothing (tests/test_deformable.py). What still parts them, 0.037 mm, is that the whole grid is large enough
    for the SyN iterations' coarse exponential and the box is not."""
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


def _has_reg(stage: dict) -> bool:
    return float(stage.get("bending_weight", 0)) > 0 or float(stage.get("gradient_weight", 0)) > 0


def _regulariser(stage: dict, field: torch.Tensor) -> torch.Tensor | None:
    if not _has_reg(stage) or not field.requires_grad:
        return None
    out = field.new_zeros(())
    if float(stage.get("bending_weight", 0)) > 0:
        out = out + float(stage["bending_weight"]) * dfm.bending_energy(field)
    if float(stage.get("gradient_weight", 0)) > 0:
        out = out + float(stage["gradient_weight"]) * dfm.gradient_l2(field)
    return out


def _full_resolution_fields(prob: _Problem, state: FieldState) -> tuple[torch.Tensor, torch.Tensor, dfm.FieldOps]:
    """Forward and inverse displacements (mm) on the full-resolution fixed grid. They are computed on the last
    level's ROI box at full resolution (``exp(±v)``, or greedy's inverse) and extended beyond it from its faces,
    as the levels extend their fields (:func:`roi_box`): the velocity there is the box's edge value anyway, and
    the scaling and squaring costs in proportion to the grid (2 mm brain pair: 1.10 M voxels → 0.81 M)."""
    ops = dfm.FieldOps(prob.fgrid, prob.device)
    box = dfm.FieldOps(prob.fgrid.covering_crop(state.ops.grid), prob.device)
    with torch.no_grad():
        field = state.ops.upsample(state.field, box)
        if state.kind == "syn":
            inv, fwd = box.exp_pair(field)
        else:
            fwd, inv = field, box.invert(field)
        both = _extend_from_faces(torch.cat([fwd, inv], 0), box.grid, prob.fgrid)
    return both[:1], both[1:], ops


def _extend_from_faces(t: torch.Tensor, box: Grid, grid: Grid) -> torch.Tensor:
    """``t`` ``[N, C, *box.shape]`` on ``box``, a crop of ``grid``, placed on ``grid`` with each face's values
    repeated outward (border padding, exactly: no interpolation)."""
    start = np.rint((grid.physical_to_index() @ np.append(box.origin, 1.0))[: grid.dim]).astype(int)
    pad: list[int] = []
    for a in range(grid.dim):  # x first, as F.pad wants the last tensor axis first
        pad += [int(start[a]), int(grid.size[a] - start[a] - box.size[a])]
    if not any(pad):
        return t
    return F.pad(t, pad, mode="replicate")


def field_image(u: torch.Tensor, grid: Grid) -> sitk.Image:
    """A ``[1, dim, *shape]`` mm displacement tensor as an ITK displacement-field image (VectorFloat32, LPS
    mm components x, y[, z]) on ``grid``. Float32 as computed (and as written: ANTs' warps are float32 too);
    :func:`maskreg.transforms.displacement_transform` casts to the float64 that ITK's transform needs."""
    v = u[0].detach()
    perm = v.permute(*range(1, v.dim()), 0).to(torch.float32).contiguous()  # [*shape, dim], one copy
    if perm.is_cuda:  # through page-locked memory: ~10x the bandwidth of a pageable copy
        host = torch.empty(perm.shape, dtype=perm.dtype, pin_memory=True)
        host.copy_(perm, non_blocking=True)
        torch.cuda.current_stream(perm.device).synchronize()
    else:
        host = perm
    img = sitk.GetImageFromArray(host.numpy(), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img
