"""Transforms and their files, in ITK's conventions.

A transform maps **fixed-space points to moving-space points** (LPS mm): ``warped(x) = moving(T(x))``, as
ITK's and ANTs' resamplers use it. The linear part is ITK's ``AffineTransform`` with a centre ``c``:
``T(x) = A (x - c) + c + t``. Files are ITK transform files written and read by SimpleITK: ``.mat`` (the
binary MATLAB format ANTs writes and reads) or ``.txt``/``.tfm``. A deformable part, when present, is a
displacement field on the fixed grid (vector image, components x, y[, z] in LPS mm) applied *before* the
linear part in point terms: ``T(x) = L(x + u(x))`` — with ANTs' list order ``[affine.mat, warp.nii.gz]``
(ANTs applies the list last-first to points: warp first, then affine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from maskreg.errors import InputError, where
from maskreg.io import atomic_path


@dataclass
class LinearTransform:
    """``T(x) = matrix @ (x - center) + center + translation`` in LPS mm (fixed → moving points)."""

    matrix: np.ndarray
    translation: np.ndarray
    center: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        self.translation = np.asarray(self.translation, dtype=np.float64)
        dim = self.matrix.shape[0]
        self.center = np.zeros(dim) if self.center is None else np.asarray(self.center, dtype=np.float64)

    @classmethod
    def identity(cls, dim: int, center=None) -> "LinearTransform":
        return cls(np.eye(dim), np.zeros(dim), center)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def homogeneous(self) -> np.ndarray:
        """``(dim+1, dim+1)`` matrix of the map x → T(x)."""
        h = np.eye(self.dim + 1)
        h[: self.dim, : self.dim] = self.matrix
        h[: self.dim, self.dim] = self.center + self.translation - self.matrix @ self.center
        return h

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, dim)`` fixed-space points to moving space."""
        return (points - self.center) @ self.matrix.T + self.center + self.translation

    def inverse(self) -> "LinearTransform":
        inv = np.linalg.inv(self.matrix)
        # x = A^-1 (y - c - t) + c  ->  same centre, translation -A^-1 t
        return LinearTransform(inv, -inv @ self.translation, self.center.copy())

    def to_sitk(self) -> sitk.AffineTransform:
        tx = sitk.AffineTransform(self.dim)
        tx.SetMatrix(self.matrix.flatten().tolist())
        tx.SetTranslation(self.translation.tolist())
        tx.SetCenter(self.center.tolist())
        return tx

    @classmethod
    def from_sitk(cls, tx: sitk.Transform) -> "LinearTransform":
        """From any SimpleITK linear transform (Euler, Similarity, Affine, Translation, composite of them)."""
        dim = tx.GetDimension()
        if tx.GetName() == "CompositeTransform":
            comp = sitk.CompositeTransform(tx)
            out = cls.identity(dim)
            # ITK applies the last-added transform first to points
            for i in range(comp.GetNumberOfTransforms()):
                out = compose(out, cls.from_sitk(comp.GetNthTransform(i)))
            return out
        # probe the map at dim+1 points: exact for any affine map
        o = np.array(tx.TransformPoint([0.0] * dim))
        cols = [np.array(tx.TransformPoint(list(e))) - o for e in np.eye(dim)]
        if tx.GetName() not in ("AffineTransform", "Euler2DTransform", "Euler3DTransform", "VersorRigid3DTransform",
                                "Similarity2DTransform", "Similarity3DTransform", "TranslationTransform",
                                "ScaleTransform", "ScaleVersor3DTransform", "ScaleSkewVersor3DTransform",
                                "AffineTransform_double_2_2", "AffineTransform_double_3_3", "IdentityTransform",
                                "MatrixOffsetTransformBase"):
            raise ValueError(f"not a linear transform: {tx.GetName()}")
        return cls(np.stack(cols, axis=1), o)


def compose(outer: LinearTransform, inner: LinearTransform) -> LinearTransform:
    """``outer ∘ inner`` (apply ``inner`` first to points), keeping ``inner``'s centre."""
    h = outer.homogeneous() @ inner.homogeneous()
    a = h[: outer.dim, : outer.dim]
    c = inner.center
    t = h[: outer.dim, outer.dim] + a @ c - c
    return LinearTransform(a, t, c)


def write_linear(tx: LinearTransform, path: str | os.PathLike) -> None:
    """Write an ITK ``AffineTransform`` file (``.mat`` binary as ANTs uses, or ``.txt``) atomically."""
    with atomic_path(path) as tmp:
        sitk.WriteTransform(tx.to_sitk(), str(tmp))


def read_linear(path: str | os.PathLike, *, subject: str | None = None, role: str = "transform"
                ) -> LinearTransform:
    """Read an ITK/ANTs linear transform file (``.mat``, ``.txt``, ``.tfm``)."""
    p = str(path)
    if not os.path.exists(p):
        raise InputError(f"{where(subject, role, p)}file not found.")
    try:
        tx = sitk.ReadTransform(p)
    except RuntimeError as exc:
        raise InputError(f"{where(subject, role, p)}is not an ITK transform file "
                         f"({str(exc).strip().splitlines()[-1]}).") from None
    return LinearTransform.from_sitk(tx)


def displacement_transform(field_image: sitk.Image) -> sitk.DisplacementFieldTransform:
    """An ITK ``DisplacementFieldTransform`` from a vector image (LPS mm), as ``antsApplyTransforms`` uses."""
    f = sitk.Cast(field_image, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(f)


def chain(linear: LinearTransform, displacement: sitk.Image | None = None) -> sitk.Transform:
    """The full fixed → moving map as one SimpleITK transform: ``T(x) = L(x + u(x))``."""
    if displacement is None:
        return linear.to_sitk()
    comp = sitk.CompositeTransform(linear.dim)
    comp.AddTransform(linear.to_sitk())          # applied last to points
    comp.AddTransform(displacement_transform(displacement))  # applied first
    return comp


def write_field(field_image: sitk.Image, path: str | os.PathLike) -> None:
    """Write a displacement field (vector image, LPS mm) as float32 NIfTI, atomically; ITK and ANTs read it as
    a displacement field (ANTs writes its own warps as float32 too)."""
    from maskreg.io import write_image

    write_image(sitk.Cast(field_image, sitk.sitkVectorFloat32), path)


def read_field(path: str | os.PathLike, *, subject: str | None = None, role: str = "warp") -> sitk.Image:
    """Read a displacement-field image (vector components x, y[, z] in LPS mm)."""
    p = str(path)
    if not os.path.exists(p):
        raise InputError(f"{where(subject, role, p)}file not found.")
    img = sitk.ReadImage(p)
    if img.GetNumberOfComponentsPerPixel() != img.GetDimension():
        raise InputError(f"{where(subject, role, p)}is not a displacement field: {img.GetDimension()}D image "
                         f"with {img.GetNumberOfComponentsPerPixel()} component(s) per voxel.")
    return img


def read_chain(linear_path: str | os.PathLike, warp_path: str | os.PathLike | None = None, *,
               subject: str | None = None) -> tuple[LinearTransform, sitk.Image | None, sitk.Transform]:
    """The files of one registration: linear part, optional field and the whole fixed → moving chain."""
    lin = read_linear(linear_path, subject=subject)
    field = read_field(warp_path, subject=subject) if warp_path else None
    return lin, field, chain(lin, field)


def inverse_chain(linear: LinearTransform, inverse_displacement: sitk.Image | None = None) -> sitk.Transform:
    """The moving → fixed map ``T⁻¹(y) = φ⁻¹(A⁻¹ y)`` (``A⁻¹`` first, then the inverse field), for mapping
    moving-space landmarks to fixed space; ANTs: ``-t inverse_warp.nii.gz -t [affine.mat, 1]``."""
    inv = linear.inverse()
    if inverse_displacement is None:
        return inv.to_sitk()
    comp = sitk.CompositeTransform(linear.dim)
    comp.AddTransform(displacement_transform(inverse_displacement))  # applied last
    comp.AddTransform(inv.to_sitk())                                  # applied first
    return comp
