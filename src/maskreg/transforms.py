"""Transforms and their files, in ITK's conventions.

A transform maps **fixed-space points to moving-space points** (LPS mm): ``warped(x) = moving(T(x))``, as
ITK's and ANTs' resamplers use it. The linear part is ITK's ``AffineTransform`` with a centre ``c``:
``T(x) = A (x - c) + c + t``. Files are ITK transform files written and read by SimpleITK: ``.mat`` (the
binary MATLAB format ANTs writes and reads) or ``.txt``/``.tfm``. A deformable part, when present, is a
displacement field on the fixed grid (vector image, components x, y[, z] in LPS mm) applied *before* the
linear part in point terms: ``T(x) = L(x + u(x))``. ANTs writes the same chain as
``antsApplyTransforms -t warp.nii.gz -t affine.mat``: the moving *image* is transformed last-listed first
(affine, then warp), so fixed-space *points* pass through the list first-listed first (warp, then affine).
A list of transform files in this module is always in that ``-t`` order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    def identity(cls, dim: int, center=None) -> LinearTransform:
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

    def inverse(self) -> LinearTransform:
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
    def from_sitk(cls, tx: sitk.Transform) -> LinearTransform:
        """From any SimpleITK linear transform (Euler, Similarity, Affine, Translation, composite of them)."""
        dim = tx.GetDimension()
        if tx.GetName() == "CompositeTransform":
            comp = sitk.CompositeTransform(tx)
            out = cls.identity(dim)
            # ITK applies the last-added transform first to points
            for i in range(comp.GetNumberOfTransforms()):
                out = compose(out, cls.from_sitk(comp.GetNthTransform(i)))
            return out
        if tx.GetName() not in (
            "AffineTransform",
            "Euler2DTransform",
            "Euler3DTransform",
            "VersorRigid3DTransform",
            "Similarity2DTransform",
            "Similarity3DTransform",
            "TranslationTransform",
            "ScaleTransform",
            "ScaleVersor3DTransform",
            "ScaleSkewVersor3DTransform",
            "AffineTransform_double_2_2",
            "AffineTransform_double_3_3",
            "IdentityTransform",
            "MatrixOffsetTransformBase",
            "VersorTransform",
            "QuaternionRigidTransform",
            "Rigid2DTransform",
            "Similarity2DTransform",
        ):
            raise ValueError(f"not a linear transform: {tx.GetName()}")
        # probe the map at dim+1 points: exact for any affine map
        o = np.array(tx.TransformPoint([0.0] * dim))
        cols = [np.array(tx.TransformPoint(list(e))) - o for e in np.eye(dim)]
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


def read_linear(path: str | os.PathLike, *, subject: str | None = None, role: str = "transform") -> LinearTransform:
    """Read an ITK/ANTs linear transform file (``.mat``, ``.txt``, ``.tfm``)."""
    p = str(path)
    if not os.path.exists(p):
        raise InputError(f"{where(subject, role, p)}file not found.")
    try:
        tx = sitk.ReadTransform(p)
    except RuntimeError as exc:
        raise InputError(
            f"{where(subject, role, p)}is not an ITK transform file ({str(exc).strip().splitlines()[-1]})."
        ) from None
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
    comp.AddTransform(linear.to_sitk())  # applied last to points
    comp.AddTransform(displacement_transform(displacement))  # applied first
    return comp


def write_composite(linear: LinearTransform, displacement: sitk.Image | None, path: str | os.PathLike) -> None:
    """Write the whole fixed → moving chain ``T(x) = L(x + u(x))`` as one ITK composite transform file (HDF5
    ``.h5``, atomically), for tools that take a single transform: SimpleITK's ``ReadTransform``,
    ``antsApplyTransforms -t composite.h5`` (what ``antsRegistration --write-composite-transform`` writes).
    Applying it equals applying ``-t warp.nii.gz -t affine.mat``. ITK stores the field uncompressed in
    float64: about ``8 · dim`` bytes per fixed voxel (a 1 mm brain: ~200 MB), hence not written by default."""
    if not str(path).lower().endswith((".h5", ".hdf5")):
        raise ValueError(f"a composite transform is written as .h5 (HDF5), not {path}")
    with atomic_path(path) as tmp:
        sitk.WriteTransform(chain(linear, displacement), str(tmp))


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
        raise InputError(
            f"{where(subject, role, p)}is not a displacement field: {img.GetDimension()}D image "
            f"with {img.GetNumberOfComponentsPerPixel()} component(s) per voxel."
        )
    return img


def read_chain(
    linear_path: str | os.PathLike, warp_path: str | os.PathLike | None = None, *, subject: str | None = None
) -> tuple[LinearTransform, sitk.Image | None, sitk.Transform]:
    """The files of one registration: linear part, optional field and the whole fixed → moving chain."""
    lin = read_linear(linear_path, subject=subject)
    field = read_field(warp_path, subject=subject) if warp_path else None
    return lin, field, chain(lin, field)


LINEAR_SUFFIXES = (".mat", ".txt", ".tfm")
LIST_SEPARATOR = ";"


def split_list(value: str) -> list[str]:
    """The files of a ``;``-separated transform list (cohort column ``initial_transform``), ``-t`` order."""
    return [v.strip() for v in str(value).split(LIST_SEPARATOR) if v.strip()]


def may_be_nonlinear(value: str) -> bool:
    """Whether a transform list could hold a displacement field, judged by file names only (cheap enough for
    a cohort of thousands at workflow start): anything but ``.mat``/``.txt``/``.tfm`` files."""
    return any(not p.lower().endswith(LINEAR_SUFFIXES) for p in split_list(value))


def read_transform(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    subject: str | None = None,
    role: str = "initial_transform",
) -> LinearTransform | sitk.Transform:
    """Read one transform or an ANTs-ordered list of them (fixed → moving points; the first listed is applied
    first to points, as ``antsApplyTransforms -t a -t b``). Each file is an ITK transform file (``.mat``,
    ``.txt``, ``.tfm``, a composite ``.h5`` as ``antsRegistration --write-composite-transform`` writes) or a
    displacement-field image (vector components x, y[, z] in LPS mm, e.g. ANTs' ``1Warp.nii.gz``). A chain of
    linear transforms only is returned collapsed as a :class:`LinearTransform`; anything else as one
    SimpleITK transform."""
    if isinstance(paths, (str, os.PathLike)):
        paths = split_list(str(paths))
    parts: list[sitk.Transform] = []
    for p in map(str, paths):
        if not os.path.exists(p):
            raise InputError(f"{where(subject, role, p)}file not found.")
        if p.lower().endswith(LINEAR_SUFFIXES + (".h5", ".hdf5", ".xfm")):
            try:
                parts.append(sitk.ReadTransform(p))
            except RuntimeError as exc:
                raise InputError(
                    f"{where(subject, role, p)}is not an ITK transform file ({str(exc).strip().splitlines()[-1]})."
                ) from None
        else:
            try:
                img = sitk.ReadImage(p)
            except RuntimeError as exc:
                raise InputError(
                    f"{where(subject, role, p)}is neither an ITK transform file nor a readable "
                    f"displacement-field image ({str(exc).strip().splitlines()[-1]})."
                ) from None
            if img.GetNumberOfComponentsPerPixel() != img.GetDimension():
                raise InputError(
                    f"{where(subject, role, p)}is not a displacement field: {img.GetDimension()}D "
                    f"image with {img.GetNumberOfComponentsPerPixel()} component(s) per voxel."
                )
            parts.append(displacement_transform(img))
    if not parts:
        raise InputError(f"{where(subject, role)}no transform file given.")
    dims = {t.GetDimension() for t in parts}
    if len(dims) > 1:
        raise InputError(f"{where(subject, role)}the transforms mix dimensions {sorted(dims)}.")
    comp = compose_sitk(parts)
    try:
        return LinearTransform.from_sitk(comp)
    except ValueError:
        return comp


def flatten(tx: sitk.Transform) -> list[sitk.Transform]:
    """The transforms of a (nested) composite in the order they are applied to points."""
    if tx.GetName() != "CompositeTransform":
        return [tx]
    comp = sitk.CompositeTransform(tx)
    out: list[sitk.Transform] = []
    for i in reversed(range(comp.GetNumberOfTransforms())):
        out += flatten(comp.GetNthTransform(i))
    return out


def compose_sitk(parts: Sequence[sitk.Transform]) -> sitk.Transform:
    """One SimpleITK transform applying ``parts`` to points in the given order."""
    comp = sitk.CompositeTransform(parts[0].GetDimension())
    for t in reversed(parts):  # ITK applies the last added first: add the first-listed last
        comp.AddTransform(t)
    return comp


def split_trailing_linear(tx: sitk.Transform) -> tuple[LinearTransform, list[sitk.Transform]]:
    """``tx = A ∘ rest``: the linear transforms applied last to points (collapsed into ``A``) and the rest in
    point order; ``A`` is the identity when the last transform is not linear."""
    parts = flatten(tx)
    dim = tx.GetDimension()
    a = LinearTransform.identity(dim)
    while parts:
        try:
            last = LinearTransform.from_sitk(parts[-1])
        except ValueError:
            break
        a = compose(a, last)  # the popped one runs before what is already in A
        parts.pop()
    return a, parts


def inverse_chain(linear: LinearTransform, inverse_displacement: sitk.Image | None = None) -> sitk.Transform:
    """The moving → fixed map ``T⁻¹(y) = φ⁻¹(A⁻¹ y)`` (``A⁻¹`` first, then the inverse field), for mapping
    moving-space landmarks to fixed space; ANTs: ``-t inverse_warp.nii.gz -t [affine.mat, 1]``."""
    inv = linear.inverse()
    if inverse_displacement is None:
        return inv.to_sitk()
    comp = sitk.CompositeTransform(linear.dim)
    comp.AddTransform(displacement_transform(inverse_displacement))  # applied last
    comp.AddTransform(inv.to_sitk())  # applied first
    return comp
