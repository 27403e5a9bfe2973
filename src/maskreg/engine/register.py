"""The entry point: :func:`register` runs a stage list on a pair and returns a
:class:`~maskreg.engine.result.RegistrationResult`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from maskreg.engine import fields as dfm
from maskreg.engine import linear as lin
from maskreg.engine.deformable_stage import FieldState, full_resolution_fields, run_deformable_stage
from maskreg.engine.initial import moments_stage, recenter
from maskreg.engine.linear_stage import run_linear_stage
from maskreg.engine.losses import get_loss
from maskreg.engine.problem import Problem, check_pair
from maskreg.engine.result import RegistrationResult, StageReport
from maskreg.errors import MaskregError, OverlapError, where
from maskreg.stages import DEFAULT_STAGES, NETWORK, check_stages, resolve_stage
from maskreg.transforms import LinearTransform

log = logging.getLogger("maskreg")


def warm_up(device: str = "auto") -> None:
    """Pay a fresh process's first-call costs before the first registration: when ``device`` resolves to the
    CPU, numba's start-up and the compiled kernels' first calls (:func:`maskreg.engine.cpu_kernels.warm_up`,
    ~0.5 s), which the first pyramid level would otherwise pay."""
    if pick_device(device).type == "cpu":
        from maskreg.engine import cpu_kernels

        cpu_kernels.warm_up()


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
    ``--initial-moving-transform`` does; the result is the whole chain (see :func:`register_after_nonlinear_initial`).

    A bad stage list raises :class:`~maskreg.errors.ConfigError` listing every problem before any work is done
    (:func:`maskreg.stages.stage_list_problems`, the checks of the CLI and the workflow's config validation).
    """
    check_stages(stages, sampling, where(subject))
    if initial is not None and not isinstance(initial, LinearTransform):
        try:
            initial = LinearTransform.from_sitk(initial)
        except ValueError:
            return register_after_nonlinear_initial(
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
    t_start = time.perf_counter()
    prob = _problem(fixed, moving, fixed_mask, moving_mask, device, threads, seed, subject, mask_kinds)
    if fixed_labels is not None and moving_labels is not None and any(_label_weight(s) > 0 for s in stages or []):
        common = prob.set_labels(fixed_labels, moving_labels)
        log.info("%slabel term over %d label(s): %s", where(subject), len(common), common)
    t_setup = synced_clock(prob.device)
    start = (
        LinearTransform.identity(prob.dim, prob.center.copy()) if initial is None else recenter(initial, prob.center)
    )
    run = StageRun(prob, sampling, min_overlap_voxels, seed, start)
    for i, raw in enumerate(stages if stages is not None else DEFAULT_STAGES):
        run.stage(i, raw)
    return _result(prob, run, t_start, t_setup)


def _result(prob: Problem, run: StageRun, t_start: float, t_setup: float) -> RegistrationResult:
    """The registration's result: the stages' transform and reports, the full-resolution fields of a
    deformable part, and the wall time of each phase (s)."""
    dev = prob.device
    result = RegistrationResult(run.current, prob.fgrid, str(dev), 0.0, run.reports)
    t_stages = synced_clock(dev)
    result.phase_seconds["set-up"] = round(t_setup - t_start, 3)
    result.phase_seconds["stages"] = round(t_stages - t_setup, 3)
    if run.state is not None:
        _set_fields(result, prob, run.state)
        result.phase_seconds["full-resolution fields"] = round(synced_clock(dev) - t_stages, 3)
    result.seconds = time.perf_counter() - t_start
    return result


def _problem(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    device: str,
    threads: int | None,
    seed: int,
    subject: str | None,
    mask_kinds: tuple[str, str],
) -> Problem:
    """The checked pair on its device, with torch's threads and seed set."""
    for k in mask_kinds:
        if k not in ("roi", "valid"):
            raise MaskregError(f"unknown mask kind '{k}'; choose roi or valid")
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    check_pair(fixed, moving, subject)
    return Problem(fixed, moving, fixed_mask, moving_mask, dev, subject, tuple(mask_kinds))


def _label_weight(stage: dict) -> float:
    return float(stage.get("label_weight", 0) or 0)


class StageRun:
    """A stage list run in order on one problem: the linear transform so far (fixed → moving points), the
    deformable field so far, the reports, and the other starts the moments stage offers the next linear stage."""

    def __init__(self, prob: Problem, sampling, min_overlap: int, seed: int, start: LinearTransform):
        self.prob, self.sampling, self.min_overlap, self.seed = prob, sampling, min_overlap, seed
        self.current = start
        self.reports: list[StageReport] = []
        self.alternatives: list[LinearTransform] = []  # other starts for the next linear stage (from moments)
        self.state: FieldState | None = None

    def stage(self, i: int, raw: dict) -> None:
        """Run stage ``i`` (as given; settings resolved here) and append its report."""
        kind = raw["type"]
        t0 = time.perf_counter()
        if kind in dfm.DEFORMABLE_STAGES:
            self._deformable(resolve_stage(raw), t0)
        elif kind == NETWORK:
            self._network(resolve_stage(raw))
        elif self.state is not None:
            raise MaskregError(f"stage {i + 1} ({kind}): linear stages must come before deformable ones.")
        elif kind == "moments":
            self._moments(raw, t0)
        elif kind in lin.LINEAR_STAGES:
            self._linear(resolve_stage(raw), i, t0)
        else:
            raise MaskregError(
                f"stage {i + 1}: unknown type '{kind}' (this engine runs moments, "
                f"{', '.join(lin.LINEAR_STAGES + (NETWORK,) + dfm.DEFORMABLE_STAGES)})"
            )

    def _deformable(self, stage: dict, t0: float) -> None:
        rep = StageReport(stage["type"], get_loss(stage["loss"])[0], 0.0)
        self.state = run_deformable_stage(self.prob, stage, self.current, self.state, self.min_overlap, rep)
        rep.seconds = round(time.perf_counter() - t0, 3)
        self.reports.append(rep)

    def _network(self, stage: dict) -> None:
        from maskreg.engine.network_stage import run_network_stage  # imports MONAI: only when a model is used

        rep = StageReport(NETWORK, None, 0.0)
        self.state = run_network_stage(self.prob, stage, self.current, rep)
        self.reports.append(rep)

    def _moments(self, raw: dict, t0: float) -> None:
        self.alternatives = []
        self.current = moments_stage(self.prob, self.current, raw, self.alternatives)
        self.reports.append(StageReport("moments", None, round(time.perf_counter() - t0, 3)))
        log.info(
            "%sstage moments: translation %s mm",
            where(self.prob.subject),
            np.array2string(self.current.translation, precision=2),
        )

    def _linear(self, stage: dict, i: int, t0: float) -> None:
        rep = StageReport(stage["type"], get_loss(stage["loss"])[0], 0.0)
        self.current = run_linear_stage(
            self.prob, stage, self.current, self.sampling, self.min_overlap, self.seed + i, rep, self.alternatives
        )
        self.alternatives = []
        rep.seconds = round(time.perf_counter() - t0, 3)
        self.reports.append(rep)


def _set_fields(result: RegistrationResult, prob: Problem, state: FieldState) -> None:
    """The full-resolution forward and inverse fields and their Jacobian's summary, into ``result``."""
    fwd, inv, ops = full_resolution_fields(prob, state)
    det = dfm.jacobian_determinant(fwd, ops)
    result.jacobian_min = float(det.min())
    result.jacobian_nonpositive_fraction = float((det <= 0).float().mean())
    result.set_fields(fwd, inv)  # SimpleITK images on first read of result.displacement


def synced_clock(dev: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work (phase timings)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def register_after_nonlinear_initial(
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


def resolved_stage(stage: dict) -> dict:
    """A stage as :func:`register` runs it (:func:`maskreg.stages.resolve_stage`): every setting, the defaults
    filled in and ``learning_rate`` one value per scale (``moments`` comes back as given). For reports and
    benchmarks."""
    return resolve_stage(stage)
