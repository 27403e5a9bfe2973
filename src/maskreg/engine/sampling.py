"""``grid_sample`` as every part of maskreg calls it: ``align_corners=True`` (see :mod:`maskreg.engine.grid` for the
normalised coordinates), and on the CPU split into batch items so that all cores work.

PyTorch's CPU kernels for 3D ``grid_sample`` (forward and backward) run one thread per batch item, so the
usual call, one image (``N = 1``), uses one core whatever ``torch.get_num_threads()`` says. Cutting the
sampling grid along its first spatial axis into ``k`` pieces, stacked as a batch over the same input
(``expand``: a view, no copy), gives the kernel ``k`` items to share among its threads and smaller working
sets per item. The result is the same to the bit: every output point is interpolated by the same arithmetic,
only by another thread. On CUDA, and where the input needs its own gradient (the expanded input's backward
would add ``k`` full-size copies), the call is passed through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskreg.engine import cpu_kernels

# pieces per call: about twice the thread count (fewer leave threads idle on uneven pieces, more add calls)
PIECES_PER_THREAD = 2


def _pieces(n_rows: int) -> int:
    return max(1, min(n_rows, PIECES_PER_THREAD * torch.get_num_threads()))


def grid_sample(
    input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """``F.grid_sample(input, grid, mode, padding_mode, align_corners=True)``, the same values.

    ``input``: ``[N, C, *in_shape]``; ``grid``: ``[N, *out_shape, dim]`` normalised ``(x, y[, z])``; returns
    ``[N, C, *out_shape]``. Only 3D inputs are split (the case the split was made and checked for). 3D trilinear
    sampling on the CPU runs the compiled kernel of :mod:`maskreg.engine.cpu_kernels` when it is enabled (faster
    than the split call)."""
    if input.dim() == 5 and mode == "bilinear" and cpu_kernels.enabled(input, grid):
        return cpu_kernels.sample(input, grid, padding_mode)[0]
    k = _pieces(grid.shape[1])
    if input.device.type != "cpu" or k < 2 or input.requires_grad or input.dim() != 5:
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    outs = [_split_call(input[i : i + 1], grid[i : i + 1], k, mode, padding_mode) for i in range(input.shape[0])]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _split_call(input: torch.Tensor, grid: torch.Tensor, k: int, mode: str, padding_mode: str) -> torch.Tensor:
    """One batch item: ``grid`` ``[1, R, ...]`` cut into ``k`` equal runs of rows (padded with copies of the
    last row to a multiple of ``k``), sampled as a batch of ``k``, then put back in order."""
    rows = grid.shape[1]
    per = -(-rows // k)
    pad = per * k - rows
    if pad:
        grid = torch.cat([grid, grid[:, -1:].expand(1, pad, *grid.shape[2:])], 1)
    g = grid.reshape(k, per, *grid.shape[2:])
    out = F.grid_sample(
        input.expand(k, *input.shape[1:]), g, mode=mode, padding_mode=padding_mode, align_corners=True
    )  # [k, C, per, ...]
    out = out.transpose(0, 1).reshape(1, input.shape[1], per * k, *out.shape[3:])
    return out[:, :, :rows] if pad else out


def grid_sample_inside(input: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grid_sample(input, grid), inside(grid))`` (zero padding), from one pass where the compiled CPU kernel
    serves the call."""
    if input.dim() == 5 and cpu_kernels.enabled(input, grid):
        out, ins = cpu_kernels.sample(input, grid, "zeros", with_inside=True)
        return out, ins
    return grid_sample(input, grid), inside(grid)


def inside(grid: torch.Tensor) -> torch.Tensor:
    """``[N, 1, *shape]``: 1 where a normalised sampling point lies inside the sampled grid, else 0 (so the
    zero padding of ``grid_sample`` never reaches a loss: those points weigh 0)."""
    return (grid.abs() <= 1.0 + 1e-6).all(dim=-1).to(grid.dtype)[:, None]
