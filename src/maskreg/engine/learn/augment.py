"""Training augmentation: each image of a pair, with its mask and labels, moved by its own small random affine
map, and its intensities by a random gain and gamma (DeepReg's affine augmentation, with maskreg's ranges).

The affine map acts on voxel coordinates of the training grid about its centre (rotation per axis up to
``rotation_deg``, scale ``1 ± scale``, shift up to ``translation_mm`` along each axis, in mm of the grid);
stacks are resampled linearly with zero padding, so masks and one-hot labels stay fractions in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from maskreg.engine.sampling import grid_sample


def _rotation(angles: np.ndarray) -> np.ndarray:
    """A rotation matrix from one angle (2D) or three (3D, about x, y then z), radians."""
    if angles.size == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    out = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def random_theta(shape: tuple[int, ...], spacing: tuple[float, ...], ranges: dict, rng: np.random.Generator):
    """``(dim, dim+1)`` affine_grid matrix (normalised output → normalised input coordinates, x first) of a random
    affine map of a grid of ``shape`` (tensor order) and ``spacing`` (mm, x first)."""
    dim = len(shape)
    n = np.asarray(list(reversed(shape)), dtype=np.float64)  # x first
    angles = rng.uniform(-1, 1, 1 if dim == 2 else 3) * math.radians(ranges["rotation_deg"])
    scale = 1.0 + rng.uniform(-1, 1, dim) * ranges["scale"]
    shift = rng.uniform(-1, 1, dim) * ranges["translation_mm"] / np.asarray(spacing)  # voxels
    a = _rotation(angles) @ np.diag(scale)  # in voxel units about the grid's centre
    half = (n - 1) / 2  # normalised = (index - half) / half
    lin = np.diag(1 / half) @ a @ np.diag(half)
    t = shift / half
    return np.concatenate([lin, t[:, None]], 1)


def affine(stack: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    """``stack`` ``[1, C, *shape]`` resampled through ``theta`` (linear, zero padding)."""
    th = torch.as_tensor(theta, dtype=stack.dtype, device=stack.device)[None]
    grid = F.affine_grid(th, [1, 1, *stack.shape[2:]], align_corners=True)
    return grid_sample(stack, grid)


def intensity(image: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """``gain · max(image, 0)^gamma`` with ``gain = 1 ± strength`` and ``gamma = exp(± strength)``."""
    if strength <= 0:
        return image
    gain = 1.0 + rng.uniform(-strength, strength)
    gamma = math.exp(rng.uniform(-strength, strength))
    return gain * image.clamp_min(0).pow(gamma)
