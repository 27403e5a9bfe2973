"""The network: MONAI's registration networks (DeepReg's LocalNet, or RegUNet) from two input channels (fixed,
moving) to one field channel per axis.

The output is a field in voxels of the training grid along its index axes (x, y[, z]); :func:`to_mm` turns it into
LPS mm components. The last layer starts at zero, so an untrained network predicts the identity.
"""

from __future__ import annotations

import torch

from maskreg.engine.grid import Grid


def build_network(name: str, dim: int, channels: int, levels: int) -> torch.nn.Module:
    """A fresh network: ``localnet`` (extraction at every level) or ``regunet`` (depth ``levels - 1``)."""
    from monai.networks.nets import LocalNet, RegUNet

    if name == "localnet":
        return LocalNet(
            spatial_dims=dim,
            in_channels=2,
            num_channel_initial=channels,
            extract_levels=tuple(range(levels)),
            out_channels=dim,
            out_kernel_initializer="zeros",
            out_activation=None,
        )
    if name == "regunet":
        return RegUNet(
            spatial_dims=dim,
            in_channels=2,
            num_channel_initial=channels,
            depth=max(levels - 1, 1),
            out_channels=dim,
            out_kernel_initializer="zeros",
            out_activation=None,
        )
    raise ValueError(f"unknown network '{name}'")


def voxel_field(net: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """The network's field ``[B, dim, *shape]`` for images ``[B, 1, *shape]``: channel ``a`` is the displacement
    (or velocity) along index axis ``a`` (x first), in voxels."""
    return net(torch.cat([fixed, moving], 1))


def to_mm(u_vox: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A voxel-unit field of ``grid`` (channel ``a``: along index axis ``a``) as LPS mm components:
    ``u_mm = D · diag(spacing) · u_vox`` at every voxel."""
    m = torch.as_tensor(grid.index_to_physical()[: grid.dim, : grid.dim], dtype=u_vox.dtype, device=u_vox.device)
    return torch.einsum("ka,ba...->bk...", m, u_vox)
