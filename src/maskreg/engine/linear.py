"""Parameterisations of the linear stages, as differentiable torch maps (fixed → moving points, LPS mm).

Each stage *updates* the transform it starts from: ``T = U(p) ∘ T0`` in the sense ``A = L(p) A0``,
``t = t0 + p_t``, with the centre ``c`` (the fixed mask's centroid) kept: ``T(x) = A (x - c) + c + t``.
``p = 0`` is the identity update. Parameters are scaled so one learning rate (mm) suits them all: a
rotation angle is ``p_rot / r`` and a linear-matrix entry ``p_lin / r`` where ``r`` (mm) is the RMS radius of
the fixed mask about ``c``, so a unit step of any parameter moves points at that radius by about 1 mm.
"""

from __future__ import annotations

import math

import torch

from maskreg.stages import LINEAR_STAGES  # noqa: F401 (the stage types live in maskreg.stages)
from maskreg.transforms import LinearTransform


def n_params(kind: str, dim: int) -> int:
    rot = 1 if dim == 2 else 3
    return {"translation": dim, "rigid": rot + dim, "similarity": rot + 1 + dim, "affine": dim * dim + dim}[kind]


def _rotation(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotation matrix of angle ``p[0]`` (2D) or of the rotation vector ``p`` (3D, radians: axis × angle).

    3D: Rodrigues' formula ``R = I + a K + b K²`` with ``K`` the cross-product matrix of ``p``,
    ``a = sin θ / θ`` and ``b = (1 − cos θ) / θ² = ½ (sin(θ/2) / (θ/2))²``, through ``sinc`` at
    ``θ = sqrt(|p|² + 10⁻¹²)`` (smooth at ``p = 0``, where the gradient stays finite): the same map as
    ``matrix_exp(K)`` with fewer operations and no host synchronisation (a GPU iteration replayed as a CUDA
    graph must not read values back)."""
    if dim == 2:
        c, s = torch.cos(p[0]), torch.sin(p[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    z = torch.zeros((), dtype=p.dtype, device=p.device)
    k = torch.stack([torch.stack([z, -p[2], p[1]]), torch.stack([p[2], z, -p[0]]), torch.stack([-p[1], p[0], z])])
    theta = ((p[:3] * p[:3]).sum() + 1e-12).sqrt()
    a = torch.sinc(theta / math.pi)
    b = 0.5 * torch.sinc(theta / (2 * math.pi)) ** 2
    return torch.eye(3, dtype=p.dtype, device=p.device) + a * k + b * (k @ k)


def update_matrix(kind: str, p: torch.Tensor, dim: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, translation)`` of the update for parameters ``p`` (see module doc for units)."""
    eye = torch.eye(dim, dtype=p.dtype, device=p.device)
    if kind == "translation":
        return eye, p
    rot = 1 if dim == 2 else 3
    if kind == "rigid":
        return _rotation(p[:rot] / radius, dim), p[rot:]
    if kind == "similarity":
        scale = torch.exp(p[rot] / radius)
        return scale * _rotation(p[:rot] / radius, dim), p[rot + 1 :]
    if kind == "affine":
        return eye + p[: dim * dim].reshape(dim, dim) / radius, p[dim * dim :]
    raise ValueError(f"unknown linear stage '{kind}'")


def start_tensors(start: LinearTransform, device: torch.device, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """``(A0, t0, c)`` of ``start`` as tensors on ``device``, for :func:`homogeneous` (copied once per level,
    not per iteration)."""
    return tuple(
        torch.as_tensor(v, dtype=dtype, device=device) for v in (start.matrix, start.translation, start.center)
    )


def homogeneous(
    kind: str, p: torch.Tensor, start: LinearTransform | tuple[torch.Tensor, ...], radius: float
) -> torch.Tensor:
    """Homogeneous ``(dim+1, dim+1)`` torch matrix of ``U(p) ∘ start`` (float32 on ``p``'s device); ``start``
    may be given as :func:`start_tensors`."""
    a0, t0, c = start_tensors(start, p.device, p.dtype) if isinstance(start, LinearTransform) else start
    dim = a0.shape[0]
    l_mat, dt = update_matrix(kind, p, dim, radius)
    a = l_mat @ a0
    t = t0 + dt
    top = torch.cat([a, (c + t - a @ c)[:, None]], dim=1)
    bottom = torch.eye(dim + 1, dtype=p.dtype, device=p.device)[dim:]  # (0, ..., 0, 1), made on the device
    return torch.cat([top, bottom], dim=0)


def to_linear(kind: str, p: torch.Tensor, start: LinearTransform, radius: float) -> LinearTransform:
    """The resulting :class:`LinearTransform` (float64, on the host)."""
    with torch.no_grad():
        l_mat, dt = update_matrix(kind, p.double().cpu(), start.dim, radius)
    a = l_mat.numpy() @ start.matrix
    return LinearTransform(a, start.translation + dt.numpy(), start.center.copy())
