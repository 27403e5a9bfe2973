"""Training a registration network on a cohort's pairs (unsupervised by an image loss, weakly supervised by
labels, or both), after each pair's linear stages.

Everything in training is in voxels of the training grid: every pair is resampled onto a grid of the same
``shape`` (:mod:`maskreg.engine.learn.grids`), the network's field is in voxels along the grid's index axes, and
it is integrated (velocity) and applied on a unit grid of that shape. In mm the same field is ``D · diag(spacing)``
times it, per pair (:func:`maskreg.engine.learn.network.to_mm`), which is how registration uses it.

Loss of a batch, each term's weight 0 switching it off:

* image: the chosen maskreg loss over ``w = m_f · m_m(T) · inside(T)`` (held constant, as in the engine);
* label: ``1 −`` the mean soft Dice of one label (drawn per pair and step among the labels the pair's two maps
  share) over Gaussian scales ``label_scales`` (voxels; DeepReg's multi-scale Dice);
* regulariser: bending energy or the L2 norm of the field's gradient, in voxels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

import maskreg
from maskreg.engine import fields as dfm
from maskreg.engine.grid import Grid
from maskreg.engine.learn import augment
from maskreg.engine.learn.grids import network_shape, training_grid
from maskreg.engine.learn.inputs import network_inputs, on_grid
from maskreg.engine.learn.model import Model
from maskreg.engine.learn.network import build_network, voxel_field
from maskreg.engine.losses import get_loss, local_cc_autograd
from maskreg.engine.pyramid import gaussian_blur
from maskreg.engine.sampling import grid_sample_inside
from maskreg.errors import InputError, where
from maskreg.learning import resolve_learning
from maskreg.stages import LINEAR_DEFAULTS
from maskreg.transforms import LinearTransform

log = logging.getLogger("maskreg")

# the image loss's window (cc) and bins (mi, nmi): the linear stages' defaults
LOSS_SETTINGS = {"window": LINEAR_DEFAULTS["window"], "bins": LINEAR_DEFAULTS["bins"]}


@dataclass
class TrainingPair:
    """One training pair as read from the cohort, with its linear transform (fixed → moving points, LPS mm) from
    its linear stages. Masks and label maps lie on their images' grids; labels correspond by value."""

    subject: str
    fixed: sitk.Image
    moving: sitk.Image
    linear: LinearTransform
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None
    fixed_labels: sitk.Image | None = None
    moving_labels: sitk.Image | None = None


@dataclass
class Sample:
    """A pair on its training grid: images ``[1, 1, *shape]`` (normalised), the fixed mask and the moving side's
    weight (its mask where it is defined), one-hot labels ``[1, K, *shape]`` (``K = 0`` without labels), and the
    grid's spacing (mm, x first)."""

    subject: str
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor
    moving_weight: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    spacing: tuple[float, ...]


def _tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None].to(device)


def _common_labels(pair: TrainingPair) -> list[int]:
    if pair.fixed_labels is None or pair.moving_labels is None:
        return []
    fa, ma = (np.unique(sitk.GetArrayViewFromImage(x)) for x in (pair.fixed_labels, pair.moving_labels))
    return sorted(set(fa.tolist()) & set(ma.tolist()) - {0})


def _onehot(labels: sitk.Image, values: list[int], device: torch.device) -> torch.Tensor:
    a = sitk.GetArrayFromImage(labels)
    return torch.stack([torch.from_numpy((a == v).astype(np.float32)) for v in values])[None].to(device)


def prepare(pair: TrainingPair, shape: tuple[int, ...], settings: dict, device: torch.device) -> Sample:
    """``pair`` resampled onto its training grid (``shape`` voxels, x first)."""
    fgrid, mgrid = Grid.of(pair.fixed), Grid.of(pair.moving)
    f, m = _tensor(pair.fixed, device), _tensor(pair.moving, device)
    fm = (_tensor(pair.fixed_mask, device) > 0).float() if pair.fixed_mask is not None else None
    if settings["grid"] == "box" and fm is None:
        raise InputError(f"{where(pair.subject)}learning.grid is 'box' but the pair has no fixed mask.")
    grid = training_grid(fgrid, shape, fm if settings["grid"] == "box" else None, float(settings["margin_mm"]))
    f_n, m_n, m_in = network_inputs(f, fgrid, m, mgrid, pair.linear, grid)
    fixed_mask = on_grid(fm, fgrid, grid)[0] if fm is not None else on_grid(torch.ones_like(f), fgrid, grid)[1]
    mm = (_tensor(pair.moving_mask, device) > 0).float() if pair.moving_mask is not None else torch.ones_like(m)
    moving_weight = on_grid(mm, mgrid, grid, pair.linear)[0] * m_in
    values = _common_labels(pair)
    if values:
        fl = on_grid(_onehot(pair.fixed_labels, values, device), fgrid, grid)[0]
        ml = on_grid(_onehot(pair.moving_labels, values, device), mgrid, grid, pair.linear)[0]
    else:
        fl = ml = torch.zeros(1, 0, *grid.shape, device=device)
    return Sample(pair.subject, f_n, m_n, fixed_mask, moving_weight, fl, ml, grid.spacing)


def multiscale_dice_loss(fixed: torch.Tensor, warped: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """``1 −`` the soft Dice of ``[B, 1, *shape]`` label fractions, averaged over Gaussian blurs of ``scales``
    voxels (0: none) and the batch."""
    dim = fixed.dim() - 2
    dims = tuple(range(1, fixed.dim()))
    total = fixed.new_zeros(())
    for s in scales:
        f = gaussian_blur(fixed, (float(s),) * dim) if s > 0 else fixed
        w = gaussian_blur(warped, (float(s),) * dim) if s > 0 else warped
        dice = 2 * (f * w).sum(dims) / (f.sum(dims) + w.sum(dims)).clamp_min(1e-6)
        total = total + (1 - dice).mean()
    return total / len(scales)


class Trainer:
    """The training loop's state: the network, its optimiser, the prepared samples, the random streams."""

    def __init__(self, samples: list[Sample], settings: dict, dim: int, shape: tuple[int, ...], device: torch.device):
        self.samples, self.s, self.dim, self.device = samples, settings, dim, device
        seed = int(settings["seed"])
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.net = build_network(settings["network"], dim, int(settings["channels"]), int(settings["levels"]))
        self.net.to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=float(settings["learning_rate"]))
        unit = Grid(tuple(shape), (1.0,) * dim, (0.0,) * dim, tuple(np.eye(dim).flatten().tolist()))
        self.ops = dfm.FieldOps(unit, device)  # voxel units: a displacement of 1 is one voxel of the grid
        self.loss_name, self.loss_fn = get_loss(settings["image_loss"])
        if self.loss_name == "cc":  # the compiled CC keeps one evaluation's work arrays: a batch needs autograd's
            self.loss_fn = lambda f, m, w, window, **_: local_cc_autograd(f, m, w, window)

    def _sample(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fixed stack, moving stack, has-label flag) of one pair: image, mask[, one label], augmented."""
        k = sample.fixed_labels.shape[1]
        if k:
            pick = [int(self.rng.integers(k))]
            fl, ml = sample.fixed_labels[:, pick], sample.moving_labels[:, pick]
        else:  # a zero label channel keeps the batch's shape; the flag switches its Dice term off
            fl, ml = torch.zeros_like(sample.fixed), torch.zeros_like(sample.moving)
        fixed = torch.cat([sample.fixed, sample.fixed_mask, fl], 1)
        moving = torch.cat([sample.moving, sample.moving_weight, ml], 1)
        ranges = self.s["augment"]
        if ranges:
            shape = tuple(sample.fixed.shape[2:])
            fixed = augment.affine(fixed, augment.random_theta(shape, sample.spacing, ranges, self.rng))
            moving = augment.affine(moving, augment.random_theta(shape, sample.spacing, ranges, self.rng))
            fixed[:, :1] = augment.intensity(fixed[:, :1], ranges["intensity"], self.rng)
            moving[:, :1] = augment.intensity(moving[:, :1], ranges["intensity"], self.rng)
        return fixed, moving, torch.tensor(float(bool(k)), device=self.device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batch_size`` pairs drawn with replacement: fixed and moving stacks ``[B, 3, *shape]``, label flags."""
        picks = self.rng.integers(len(self.samples), size=int(self.s["batch_size"]))
        parts = [self._sample(self.samples[int(i)]) for i in picks]
        return tuple(torch.cat([p[j] if j < 2 else p[j][None] for p in parts], 0) for j in range(3))

    def losses(self, fixed: torch.Tensor, moving: torch.Tensor, flags: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (unweighted) and their weighted total."""
        s = self.s
        out = voxel_field(self.net, fixed[:, :1], moving[:, :1])
        u = self.ops.exp(out) if s["field"] == "velocity" else out
        warped, inside = grid_sample_inside(moving, self.ops.identity + self.ops.offsets(u))
        terms = {"image": out.new_zeros(()), "label": out.new_zeros(()), "regulariser": out.new_zeros(())}
        if s["image_weight"] > 0:
            w = (fixed[:, 1:2] * warped[:, 1:2] * inside).detach()
            n = fixed.shape[0]
            terms["image"] = (
                sum(
                    self.loss_fn(fixed[b : b + 1, :1], warped[b : b + 1, :1], w[b : b + 1], **LOSS_SETTINGS)
                    for b in range(n)
                )
                / n
            )
        if s["label_weight"] > 0 and bool(flags.any()):
            keep = flags > 0
            terms["label"] = multiscale_dice_loss(fixed[keep, 2:3], warped[keep, 2:3], s["label_scales"])
        if s["regulariser_weight"] > 0:
            reg = dfm.bending_energy if s["regulariser"] == "bending" else dfm.gradient_l2
            terms["regulariser"] = reg(out)
        terms["loss"] = (
            s["image_weight"] * terms["image"]
            + s["label_weight"] * terms["label"]
            + s["regulariser_weight"] * terms["regulariser"]
        )
        return terms

    def step(self) -> dict[str, float]:
        """One optimiser step on a fresh batch; returns its loss terms."""
        self.net.train()
        terms = self.losses(*self.batch())
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.opt.step()
        return {k: float(v.detach()) for k, v in terms.items()}


def train(
    pairs: list[TrainingPair],
    settings: dict | None = None,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> Model:
    """A network trained on ``pairs`` with the learning ``settings`` (:mod:`maskreg.learning`; defaults filled
    in). Deterministic on the CPU for a seed. The returned model holds its settings, the training grid's shape,
    the training subjects and the loss of every step (:func:`maskreg.engine.learn.save_model` writes it)."""
    from maskreg.engine.register import pick_device

    s = resolve_learning(settings)
    if not pairs:
        raise InputError("no training pairs: mark cohort rows with split 'train' (or give pairs to train).")
    dims = {p.fixed.GetDimension() for p in pairs} | {p.moving.GetDimension() for p in pairs}
    if len(dims) != 1:
        raise InputError(f"training pairs mix dimensions {sorted(dims)}; a model is 2D or 3D.")
    dim = dims.pop()
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    shape = tuple(s["shape"]) if s["shape"] else network_shape(tuple(pairs[0].fixed.GetSize()), int(s["levels"]))
    if len(shape) != dim:
        raise InputError(f"learning.shape {list(shape)} has {len(shape)} values for {dim}D images.")
    t0 = time.perf_counter()
    samples = [prepare(p, shape, s, dev) for p in pairs]
    trainer = Trainer(samples, s, dim, shape, dev)
    history = _run(trainer, int(s["steps"]), progress)
    meta = {
        "dim": dim,
        "shape": list(shape),
        "settings": s,
        "subjects": [p.subject for p in pairs],
        "labelled_subjects": [x.subject for x in samples if x.fixed_labels.shape[1]],
        "maskreg_version": maskreg.__version__,
        "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    trainer.net.eval()
    return Model(trainer.net, meta, history)


def _run(trainer: Trainer, steps: int, progress: bool) -> list[dict[str, float]]:
    """``steps`` optimiser steps with a progress bar; the loss terms of each."""
    from tqdm import tqdm

    history = []
    bar = tqdm(range(steps), desc="training", disable=not progress, mininterval=1.0)
    for i in bar:
        terms = trainer.step()
        history.append({"step": i + 1, **{k: round(v, 6) for k, v in terms.items()}})
        if i % 10 == 0:
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
    log.info("trained %d steps: loss %.4f -> %.4f", steps, history[0]["loss"], history[-1]["loss"])
    return history
