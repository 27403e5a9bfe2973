"""One registration problem: the pair's full-resolution tensors and masks, their pyramid levels (cached) and the
intensity normalisation every loss shares.

Coordinates: everything is computed on the fixed image's grid in LPS mm; a transform maps fixed-space points to
moving-space points (``warped(x) = moving(T(x))``). The weight of a fixed voxel ``x`` is
``w(x) = m_f(x) · m_m(T(x)) · inside_moving(T(x))``: voxels mapping outside the moving image get weight 0, so
partial overlap never raises; the only failure is an overlap below ``min_overlap_voxels`` at some level.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from maskreg.engine.grid import Grid
from maskreg.engine.losses import intensity_scale
from maskreg.engine.moments import weighted_moments
from maskreg.engine.points import PointLoss
from maskreg.engine.pyramid import Level, downsample_mask, erode_voxels, make_level, valid_mask_radii
from maskreg.engine.sampling import grid_sample_inside
from maskreg.errors import InputError, where
from maskreg.transforms import LinearTransform


def to_tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(arr)[None, None].to(device)


def check_pair(fixed: sitk.Image, moving: sitk.Image, subject: str | None) -> None:
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


def mask_tensor(
    mask: sitk.Image | None, image: sitk.Image, device: torch.device, subject: str | None, role: str
) -> torch.Tensor:
    if mask is None:
        return torch.ones((1, 1, *Grid.of(image).shape), device=device)
    if Grid.of(mask).size != Grid.of(image).size:
        raise InputError(
            f"{where(subject, role)}mask size {mask.GetSize()} differs from its image's "
            f"{image.GetSize()}; prepare masks on the image grid first (maskreg mask)."
        )
    t = (to_tensor(mask, device) > 0).float()
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


class Problem:
    """Full-resolution tensors of one pair and a cache of pyramid levels."""

    def __init__(self, fixed, moving, fixed_mask, moving_mask, device, subject, kinds=("roi", "roi")):
        self.device = device
        self.kinds = {"fixed": kinds[0], "moving": kinds[1]}
        self.subject = subject
        self.last_level: tuple[str, float] | None = None  # (name, overlap fraction) of the last level done
        self.fgrid = Grid.of(fixed)
        self.mgrid = Grid.of(moving)
        self.dim = self.fgrid.dim
        self.f = to_tensor(fixed, device)
        self.m = to_tensor(moving, device)
        self.fm = mask_tensor(fixed_mask, fixed, device, subject, "fixed_mask")
        self.mm = mask_tensor(moving_mask, moving, device, subject, "moving_mask")
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
        Smoothing within the ROI instead (normalised convolution) would make the fixed level's values at the
        mask's edge averages of the inside alone against the moving level's averages of both sides, and the
        linear stages would follow that difference (with a brain mask eroded through the cortex they rotate the
        brain). Outside a ``valid`` mask lies nothing: the image is smoothed within it (normalised convolution)
        and the mask is eroded through the pyramid (elastix's rule)."""
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
        """The level's images with normalised intensities (:func:`normalised_intensities`; the moving side's
        scale from what ``linear``, the fixed → moving transform when the level is first used, brings into the
        fixed mask), cached: the stages of a registration share them."""
        if level_key not in self._normalised:
            self._normalised[level_key] = normalised_intensities(*self.levels(*level_key), linear)
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


def normalised_intensities(fl: Level, ml: Level, linear: LinearTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Both level images mapped to about [0, 1] by robust percentiles (:func:`intensity_scale`) of the values the
    loss compares: the fixed image inside its mask, and the moving image where ``linear`` (fixed → moving
    points) takes the fixed mask, inside the moving mask and the moving image (:func:`moving_sampled_values`).
    The moving mask alone would not do: without one (a fixed ROI only) or with a valid-pixel mask, it is the
    whole image, whose percentiles depend on how much background the scan holds: for a small ROI in a large
    image, the 99.5th percentile can lie far below the ROI's intensities, and MI's bins then clamp the ROI to one
    bin. Each image gets its own scale, for ``mse`` too: it compares values, and scans of the same contrast from
    two scanners or a template differ by a gain and an offset that the fixed image's scale alone would leave in,
    which mse can lower by moving the image out of its mask. The same for every loss, so the stages of a
    registration share it."""
    off, sc = intensity_scale(fl.image, fl.mask)
    f_n = (fl.image - off) / sc
    vals = moving_sampled_values(fl, ml, linear)
    if vals is not None:
        off, sc = intensity_scale(vals, torch.ones_like(vals))
    else:  # (almost) no overlap: the overlap check will say so; the moving mask's own values meanwhile
        off, sc = intensity_scale(ml.image, ml.mask)
    return f_n, (ml.image - off) / sc


# fixed-mask voxels sampled for the moving side's intensity percentiles (strided, so deterministic): ample for
# 0.5 / 99.5 % quantiles, and intensity_scale subsamples to 20 k values anyway
SCALE_POINTS = 100_000


def moving_sampled_values(fl: Level, ml: Level, linear: LinearTransform, min_points: int = 64) -> torch.Tensor | None:
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
