"""What :func:`maskreg.register` returns: the transform chain (fixed → moving points, LPS mm) with a report of
every stage and level, and the displacement fields as ITK images."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import SimpleITK as sitk
import torch

from maskreg import provenance
from maskreg.engine.grid import Grid
from maskreg.transforms import LinearTransform, chain


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
        read (a device → host copy and a new image buffer, whose page faults cost most of the time), so a caller
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
            "software": provenance.software(),
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


def field_image(u: torch.Tensor, grid: Grid) -> sitk.Image:
    """A ``[1, dim, *shape]`` mm displacement tensor as an ITK displacement-field image (VectorFloat32, LPS
    mm components x, y[, z]) on ``grid``. Float32 as computed (and as written: ANTs' warps are float32 too);
    :func:`maskreg.transforms.displacement_transform` casts to the float64 that ITK's transform needs."""
    v = u[0].detach()
    perm = v.permute(*range(1, v.dim()), 0).to(torch.float32).contiguous()  # [*shape, dim], one copy
    if perm.is_cuda:  # through page-locked memory: much faster to copy into than pageable memory
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
