"""A trained model on disk: ``model.pt`` (the network's state dict, plain tensors, read with
``weights_only=True``) and ``training.json`` beside it (the settings that rebuild the network, the training
grid's rule, the training subjects, the seed, the maskreg version and the loss history)."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskreg.engine.grid import Grid
from maskreg.engine.learn.grids import training_grid
from maskreg.engine.learn.inputs import network_inputs
from maskreg.engine.learn.network import build_network, to_mm, voxel_field
from maskreg.errors import InputError
from maskreg.transforms import LinearTransform

MODEL_FILE = "model.pt"
META_FILE = "training.json"


@dataclass
class Model:
    """A network and what it was trained with (``meta``: the resolved learning settings under ``settings``, the
    training grid's ``shape`` (x first) and ``dim``, and provenance)."""

    net: torch.nn.Module
    meta: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, Any]:
        return self.meta["settings"]

    @property
    def velocity(self) -> bool:
        return self.settings["field"] == "velocity"

    def grid_for(self, fixed_grid: Grid, fixed_mask: torch.Tensor | None) -> Grid:
        """The training grid of a pair whose fixed image lies on ``fixed_grid`` (``fixed_mask`` is read only
        when the model was trained on the fixed mask's box)."""
        box = self.settings["grid"] == "box"
        return training_grid(
            fixed_grid, tuple(self.meta["shape"]), fixed_mask if box else None, float(self.settings["margin_mm"])
        )

    @torch.no_grad()
    def predict(
        self,
        fixed: torch.Tensor,
        fixed_grid: Grid,
        moving: torch.Tensor,
        moving_grid: Grid,
        linear: LinearTransform,
        grid: Grid,
    ) -> torch.Tensor:
        """The field ``[1, dim, *grid.shape]`` (LPS mm; a velocity or a displacement, as trained) that completes
        ``linear`` (fixed → moving points) for this pair: ``T(x) = linear(x + exp(v)(x))`` (or ``+ u(x)``)."""
        self.net.eval()
        f, m, _ = network_inputs(fixed, fixed_grid, moving, moving_grid, linear, grid)
        return to_mm(voxel_field(self.net, f, m), grid)


def save_model(model: Model, folder: str | os.PathLike) -> Path:
    """Write ``model.pt`` and ``training.json`` into ``folder`` (each written whole, then renamed into place);
    returns the path of ``model.pt``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    tmp = out / (MODEL_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / MODEL_FILE)
    meta = {**model.meta, "history": model.history}
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META_FILE)
    return out / MODEL_FILE


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """The model at ``path`` (``model.pt`` or its folder), on ``device``. The state dict is read with
    ``weights_only=True``: a model file is data, never code."""
    p = Path(path)
    pt = p / MODEL_FILE if p.is_dir() else p
    meta_path = pt.parent / META_FILE
    if not pt.is_file():
        raise InputError(f"model file {pt} does not exist; train a model first (maskreg train) or fix the path.")
    if not meta_path.is_file():
        raise InputError(f"{meta_path} is missing: a model needs the training.json written beside its model.pt.")
    meta = json.loads(meta_path.read_text())
    s = meta["settings"]
    net = build_network(s["network"], int(meta["dim"]), int(s["channels"]), int(s["levels"]))
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise InputError(f"{pt} does not hold the network its training.json describes: {exc}") from exc
    history = meta.pop("history", [])
    return Model(net.to(device), meta, history)
