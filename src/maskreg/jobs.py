"""One subject's registration from files to files, alone or as part of a batch in one warm process.

The workflow's scripts call these; nothing here knows Snakemake. ``python -m maskreg.jobs publish ...`` runs
:func:`publish` with the standard library alone (no torch, no SimpleITK, so it starts fast). A *batch*
registers several subjects in one process, so the interpreter, the imports and (on a GPU) the CUDA context
are paid once per batch instead of once per subject. Each subject's results go to its own folder inside the
batch folder with its own log and a status, so one failed subject does not lose the others: :func:`publish`
then moves each subject's files to their final place, or fails for that subject alone with its error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from maskreg import logs
from maskreg.errors import MaskregError, where

log = logging.getLogger("maskreg")

# output name -> file name inside a subject's folder (and under results/{subject}/transforms/)
OUTPUT_FILES = {
    "linear": "affine.mat",
    "report": "registration.json",
    "warp": "warp.nii.gz",
    "inverse_warp": "inverse_warp.nii.gz",
}
STATUS_FILE = "status.json"


def start_warm_up(device: str) -> threading.Thread:
    """A started thread that loads the engine and, when ``device`` resolves to the CPU, makes the first calls of
    its compiled kernels (:func:`maskreg.engine.cpu_kernels.warm_up`: numba's start-up and the kernels' cache,
    ~0.5 s in a fresh process): a cost of the process, like its imports, paid here beside the reading of the
    images instead of inside the first pyramid level of ``maskreg.register``. Errors are left for the
    registration to meet and report."""

    def warm() -> None:
        try:
            import maskreg

            maskreg.warm_up(device)
        except Exception:  # noqa: BLE001 (the registration itself raises it, with its subject)
            log.debug("kernel warm-up failed", exc_info=True)

    thread = threading.Thread(target=warm, name="maskreg-warm-up", daemon=True)
    thread.start()
    return thread


def concurrently(calls: Sequence[tuple[Any, tuple]]) -> None:
    """Run ``fn(*args)`` for each ``(fn, args)`` in threads and wait for all; the first error (in call order)
    is raised. For SimpleITK's writers, which release the GIL while they compress."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(fn, *args) for fn, args in calls]
    for future in futures:
        future.result()


def register_subject(
    subject: str,
    *,
    fixed: str,
    moving: str,
    fixed_mask: str,
    moving_mask: str,
    outputs: Mapping[str, str],
    registration: Mapping[str, Any],
    device: str = "auto",
    seed: int = 0,
    threads: int | None = None,
    kinds: Sequence[str] = ("roi", "roi"),
    initial: Sequence[str] = (),
    fixed_labels: str | None = None,
    moving_labels: str | None = None,
    model: str | None = None,
):
    """Read one subject's images, masks (and labels, initial transform), register them with the stages of
    ``registration`` and write ``outputs``: ``linear`` (ITK .mat), ``report`` (JSON) and, when present,
    ``warp``/``inverse_warp`` (displacement fields, zero where the subject has no deformable part). Every
    file is written atomically. Returns the :class:`maskreg.RegistrationResult`."""
    import maskreg
    from maskreg import io, transforms

    warming = start_warm_up(device)  # the process's first kernel calls, beside the reading (it frees the GIL)
    read = io.read_image
    images = {
        "fixed": read(fixed, subject=subject, role="fixed"),
        "moving": read(moving, subject=subject, role="moving"),
        "fixed_mask": read(fixed_mask, subject=subject, role="fixed_mask"),
        "moving_mask": read(moving_mask, subject=subject, role="moving_mask"),
    }
    start = transforms.read_transform(list(initial), subject=subject, role="initial_transform") if initial else None
    labels = {}
    if fixed_labels and moving_labels:
        labels = {
            k: read(p, subject=subject, role=k, check_finite=False)
            for k, p in (("fixed_labels", fixed_labels), ("moving_labels", moving_labels))
        }
    warming.join()
    result = maskreg.register(
        images["fixed"],
        images["moving"],
        images["fixed_mask"],
        images["moving_mask"],
        stages=with_model(registration.get("stages"), model),
        device=device,
        seed=seed,
        sampling=registration.get("sampling", "dense"),
        min_overlap_voxels=registration.get("min_overlap_voxels", 100),
        initial=start,
        subject=subject,
        threads=threads,
        mask_kinds=tuple(kinds),
        **labels,
    )
    log.info("%sregistered on %s in %.1f s", where(subject), result.device, result.seconds)
    transforms.write_linear(result.linear, outputs["linear"])
    if "warp" in outputs:  # a linear-only subject in a deformable cohort gets zero fields
        result.ensure_fields()
        fields = {"warp": result.displacement, "inverse_warp": result.inverse_displacement}
        concurrently([(transforms.write_field, (image, outputs[name])) for name, image in fields.items()])
    with io.atomic_path(outputs["report"]) as tmp:
        tmp.write_text(json.dumps({"subject": subject, **result.summary()}, indent=1))
    return result


def with_model(stages: Sequence[Mapping[str, Any]] | None, model: str | None) -> list | None:
    """``stages`` with ``model`` (the cohort's model.pt) filled into network stages that name none."""
    if stages is None or model is None:
        return stages
    return [{**st, "model": model} if st.get("type") == "network" and not st.get("model") else st for st in stages]


def register_batch(
    jobs: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike, *, with_fields: bool, **common: Any
) -> dict[str, dict]:
    """Register every subject of ``jobs`` (``{subject: keyword arguments of register_subject}``, without
    ``outputs``) in this process, into ``out_dir/{subject}/`` (the :data:`OUTPUT_FILES` and ``register.log``).
    A subject that fails is logged (its log ends with ``ERROR: ...``) and recorded; the others go on.
    Returns and writes ``out_dir/status.json``: ``{subject: {"ok": bool, "error": str, "seconds": float}}``."""
    from maskreg import io

    out = Path(out_dir)
    status: dict[str, dict] = {}
    for subject, kw in jobs.items():
        folder = out / subject
        folder.mkdir(parents=True, exist_ok=True)
        names = [k for k in OUTPUT_FILES if with_fields or k not in ("warp", "inverse_warp")]
        outputs = {k: str(folder / OUTPUT_FILES[k]) for k in names}
        try:
            with logs.job(folder / "register.log"):
                res = register_subject(subject, outputs=outputs, **common, **kw)
            status[subject] = {"ok": True, "error": "", "seconds": round(res.seconds, 3)}
        except Exception as exc:  # noqa: BLE001 - recorded for this subject; the batch goes on
            status[subject] = {"ok": False, "error": logs.one_line(exc), "seconds": None}
    with io.atomic_path(out / STATUS_FILE) as tmp:
        tmp.write_text(json.dumps(status, indent=1))
    return status


def publish(batch_dir: str | os.PathLike, subject: str, outputs: Mapping[str, str], log_path: str) -> None:
    """Move one subject's results out of its batch folder to ``outputs`` (hard links where the file system
    allows, else copies; each file appears atomically) and its log to ``log_path``. Raises
    :class:`MaskregError` with the subject's own error when its registration failed in the batch."""
    folder = Path(batch_dir) / subject
    status_path = Path(batch_dir) / STATUS_FILE
    try:
        status = json.loads(status_path.read_text())[subject]
    except (OSError, ValueError, KeyError) as exc:
        raise MaskregError(f"{where(subject)}no result in the batch folder {batch_dir} ({exc}).") from exc
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    _place(folder / "register.log", log_path)
    if not status["ok"]:
        raise MaskregError(status["error"])
    for key, dest in outputs.items():
        _place(folder / OUTPUT_FILES[key], dest)


def _place(src: Path, dest: str) -> None:
    """``src`` at ``dest``, atomically: a hard link (or a copy) under a temporary name, then a rename."""
    import shutil

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m maskreg.jobs publish BATCH_DIR SUBJECT LOG NAME=PATH ...``: :func:`publish`; exit 1 with
    the subject's error on stderr when its registration failed."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "publish" or any("=" not in a for a in args[4:]):
        print("usage: python -m maskreg.jobs publish BATCH_DIR SUBJECT LOG NAME=PATH ...", file=sys.stderr)
        return 2
    outputs = dict(a.split("=", 1) for a in args[4:])
    try:
        publish(args[1], args[2], outputs, args[3])
    except MaskregError as exc:
        print(f"maskreg: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
