"""Training a cohort's model from files: what the workflow's ``train_model`` job and ``maskreg train`` run
(as ``maskreg.train_model``).

For each training row, the images (and masks, labels) are read and registered with the stage list's linear
stages (those before its ``network`` stage); the network then learns the deformation left
(:func:`maskreg.engine.learn.train.train`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskreg.engine.learn.model import save_model
from maskreg.engine.learn.train import TrainingPair, train
from maskreg.errors import InputError, MaskregError, where
from maskreg.learning import linear_part

log = logging.getLogger("maskreg")

ROW_FILES = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels")


def training_pair(
    row: Mapping[str, Any],
    linear_stages: list[dict],
    *,
    registration: Mapping[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
    threads: int | None = None,
):
    """One :class:`maskreg.engine.learn.TrainingPair` from a row (``subject`` and the paths of
    :data:`ROW_FILES`; empty or missing masks and labels are absent), after its linear stages."""
    import maskreg
    from maskreg import io
    from maskreg.transforms import LinearTransform

    subject = str(row["subject"])
    images = {}
    for key in ROW_FILES:
        path = row.get(key)
        if path:
            images[key] = io.read_image(path, subject=subject, role=key, check_finite=not key.endswith("labels"))
        elif key in ("fixed", "moving"):
            raise InputError(f"{where(subject)}the training row has no {key} image.")
    reg = registration or {}
    if linear_stages:
        res = maskreg.register(
            images["fixed"],
            images["moving"],
            images.get("fixed_mask"),
            images.get("moving_mask"),
            stages=linear_stages,
            device=device,
            seed=seed,
            sampling=reg.get("sampling", "dense"),
            min_overlap_voxels=reg.get("min_overlap_voxels", 100),
            subject=subject,
            threads=threads,
        )
        linear = res.linear
    else:
        linear = LinearTransform.identity(images["fixed"].GetDimension())  # the headers' alignment
    return TrainingPair(subject, linear=linear, **images)


def train_model(
    rows: Sequence[Mapping[str, Any]],
    registration: Mapping[str, Any],
    learning: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Train a model on ``rows`` (their linear stages first, from ``registration['stages']``) and write
    ``model.pt``, ``training.json`` and ``training.png`` (the loss curve) into ``out_dir``; returns the path of
    ``model.pt``. A row that cannot be read fails the training with its subject named."""
    from maskreg.qc.figures import training_curve

    linear_stages = linear_part(registration.get("stages"))
    pairs = []
    for row in rows:
        try:
            pairs.append(
                training_pair(row, linear_stages, registration=registration, device=device, seed=seed, threads=threads)
            )
        except MaskregError as exc:
            raise MaskregError(f"training row {row.get('subject')!r}: {exc}") from exc
    model = train(pairs, dict(learning or {}), device=device, threads=threads, progress=progress)
    model.meta["linear_stages"] = linear_stages
    path = save_model(model, out_dir)
    training_curve(model.history, Path(out_dir) / "training.png")
    log.info("model of %d pairs written to %s (%.0f s)", len(pairs), path, model.meta["seconds"])
    return path
