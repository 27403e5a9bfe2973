"""Learning-based registration (issue 27): the settings and the cohort plan (torch-free), training a network on
synthetic 2D pairs (NIfTI files, labels), the ``network`` stage and the model files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import maskreg
from maskreg.config import config_problems, load_yaml
from maskreg.errors import ConfigError, InputError
from maskreg.learning import LEARNING_DEFAULTS, learning_problems, plan, resolve_learning
from maskreg.stages import stage_list_problems

pytest.importorskip("monai")

FAST = {"steps": 150, "image_weight": 0.0, "label_weight": 1.0, "levels": 3, "learning_rate": 3e-3}


# ------------------------------------------------------------------------------------------- settings


def test_learning_settings_are_checked_with_every_problem_named():
    problems = learning_problems(
        {"folds": 0, "network": "unet3000", "image_loss": "ssd", "augment": {"rotation": 3}, "speed": 1}
    )
    text = "\n".join(problems)
    assert "learning.folds 0 must be an integer >= 1" in text
    assert "learning.network 'unet3000' must be one of localnet, regunet" in text
    assert "learning.image_loss: unknown loss 'ssd'" in text
    assert "learning.augment: unknown key 'rotation'" in text
    assert "learning: unknown key 'speed'" in text
    assert learning_problems({"image_weight": 0, "label_weight": 0}) == [
        "learning: image_weight and label_weight are both 0; nothing would drive the training"
    ]
    assert learning_problems(None) == [] and learning_problems({}) == []
    with pytest.raises(ConfigError):
        resolve_learning({"steps": -1})


def test_resolved_settings_fill_defaults_and_canonical_names():
    s = resolve_learning({"image_loss": "masked_mi", "augment": {"scale": 0.2}, "steps": None})
    assert s["image_loss"] == "mi" and s["steps"] == LEARNING_DEFAULTS["steps"]
    assert s["augment"]["scale"] == 0.2 and s["augment"]["rotation_deg"] == 5.0
    assert resolve_learning({"augment": False})["augment"] is False


def test_plan_trains_on_split_rows_and_cross_validates_out_of_fold():
    one = plan(["a", "b", "c", "d"], ["train", "TRAIN", "test", ""], 1)
    assert one.train == {"model": ["a", "b"]} and one.model_of == {"c": "model", "d": "model"}
    cv = plan(["a", "b", "c", "d", "e"], None, 2)  # no split column: every row trains
    for name, rows in cv.train.items():
        assert not {s for s, m in cv.model_of.items() if m == name} & set(rows), "a row saw its own model"
    assert sorted(cv.registered) == ["a", "b", "c", "d", "e"]
    with pytest.raises(ConfigError, match="model model has no training row"):
        plan(["a"], ["test"], 1)


def test_network_stage_rules_and_config_checks(repo):
    assert stage_list_problems([{"type": "rigid"}, {"type": "network", "model": "m.pt"}, {"type": "syn"}]) == []
    assert "linear stages must come before the network stage" in " ".join(
        stage_list_problems([{"type": "network", "model": "m.pt"}, {"type": "rigid"}])
    )
    schema = load_yaml(repo / "workflow" / "schemas" / "config.schema.yaml")
    cfg = {"cohort": "c.tsv", "registration": {"stages": [{"type": "rigid"}, {"type": "network"}]}}
    assert any("model is null and learning.enabled is false" in p for p in config_problems(cfg, schema))
    cfg["learning"] = {"enabled": True, "steps": 0}
    problems = config_problems(cfg, schema)
    assert any("learning.steps" in p for p in problems)
    assert not any("model is null" in p for p in problems)


# ------------------------------------------------------------------------------------------ training


def _ellipse(n: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    y, x = np.mgrid[:n, :n].astype(np.float32)
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1).astype(np.float32)


def synthetic_pairs(make_image, count: int, seed: int = 0, n: int = 40):
    """(fixed, moving, fixed labels, moving labels) images: an ellipse with a bright core, the moving one
    shifted by up to 6 px and stretched, on a 1.5 mm grid; label 1 is the ellipse."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        cx, cy = rng.uniform(16, 24, 2)
        rx, ry = rng.uniform(5, 8, 2)
        dx, dy = rng.uniform(-6, 6, 2)
        s = rng.uniform(0.8, 1.2)
        f, m = _ellipse(n, cx, cy, rx, ry), _ellipse(n, cx + dx, cy + dy, rx * s, ry / s)
        tex = [
            b * (0.6 + 0.4 * _ellipse(n, x, y, 3, 3)) + 0.05 * rng.normal(size=(n, n))
            for b, x, y in ((f, cx, cy), (m, cx + dx, cy + dy))
        ]
        out.append(
            tuple(make_image(a, spacing=(1.5, 1.5)) for a in tex)
            + tuple(make_image(a.astype(np.uint8), spacing=(1.5, 1.5)) for a in (f, m))
        )
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_image):
    """A model trained (labels only) on 9 synthetic pairs, written to disk, and a 10th pair it never saw."""
    from maskreg.engine.learn import TrainingPair, save_model, train
    from maskreg.transforms import LinearTransform

    data = synthetic_pairs(make_image, 10)
    pairs = [
        TrainingPair(f"s{i}", f, m, LinearTransform.identity(2), fixed_labels=fl, moving_labels=ml)
        for i, (f, m, fl, ml) in enumerate(data[:9])
    ]
    model = train(pairs, FAST, device="cpu", threads=2, progress=False)
    folder = tmp_path_factory.mktemp("model")
    save_model(model, folder)
    return model, folder, data[9]


@pytest.mark.slow
def test_a_trained_network_aligns_a_pair_it_never_saw(trained):
    model, folder, (f, m, fl, ml) = trained
    res = maskreg.register(f, m, stages=[{"type": "network", "model": str(folder)}], device="cpu")
    assert res.has_fields and res.jacobian_nonpositive_fraction == 0.0
    warped = sitk.Resample(ml, f, res.transform(), sitk.sitkLinear)
    a = sitk.GetArrayFromImage
    before, after = _dice(a(fl), a(ml)), _dice(a(fl), a(warped) > 0.5)
    assert after > before + 0.2, (before, after)  # measured 0.47 -> 0.78
    # the written transform is what SimpleITK applies: the displacement read back gives the same warp
    disp = sitk.DisplacementFieldTransform(sitk.Cast(res.displacement, sitk.sitkVectorFloat64))
    composite = sitk.CompositeTransform([res.linear.to_sitk(), disp])
    again = sitk.Resample(ml, f, composite, sitk.sitkLinear)
    assert np.abs(a(again) - a(warped)).max() < 1e-5
    meta = json.loads((folder / "training.json").read_text())
    assert meta["subjects"] == [f"s{i}" for i in range(9)] and meta["shape"] == [40, 40]
    assert len(meta["history"]) == FAST["steps"] and meta["maskreg_version"] == maskreg.__version__


@pytest.mark.slow
def test_an_engine_stage_after_the_network_starts_from_its_field(trained):
    _, folder, (f, m, fl, ml) = trained
    net = maskreg.register(f, m, stages=[{"type": "network", "model": str(folder)}], device="cpu")
    refined = maskreg.register(
        f,
        m,
        stages=[
            {"type": "network", "model": str(folder)},
            {"type": "syn", "loss": "mse", "scales": [1], "iterations": [0]},
        ],
        device="cpu",
    )
    # a syn stage with no iterations, at full resolution (the network's grid here), keeps the network's velocity
    a = sitk.GetArrayFromImage
    assert np.abs(a(refined.displacement) - a(net.displacement)).max() < 0.05
    greedy = maskreg.register(
        f,
        m,
        stages=[
            {"type": "network", "model": str(folder)},
            {"type": "greedy", "loss": "mse", "scales": [1], "iterations": [0]},
        ],
        device="cpu",
    )
    assert np.abs(a(greedy.displacement) - a(net.displacement)).max() < 0.05  # its exponential, as a displacement
    tuned = maskreg.register(
        f, m, stages=[{"type": "network", "model": str(folder)}, {"type": "syn", "loss": "mse"}], device="cpu"
    )
    a_net = sitk.GetArrayFromImage(sitk.Resample(ml, f, net.transform(), sitk.sitkLinear)) > 0.5
    a_tuned = sitk.GetArrayFromImage(sitk.Resample(ml, f, tuned.transform(), sitk.sitkLinear)) > 0.5
    assert _dice(a(fl), a_tuned) >= _dice(a(fl), a_net) - 0.02  # instance optimisation keeps what it was given


@pytest.mark.slow
def test_training_is_deterministic_on_the_cpu_for_a_seed(make_image):
    from maskreg.engine.learn import TrainingPair, train
    from maskreg.transforms import LinearTransform

    data = synthetic_pairs(make_image, 3, seed=1)
    pairs = [
        TrainingPair(f"s{i}", f, m, LinearTransform.identity(2), fixed_labels=fl, moving_labels=ml)
        for i, (f, m, fl, ml) in enumerate(data)
    ]
    settings = {**FAST, "steps": 5, "image_weight": 1.0}
    runs = [train(pairs, settings, device="cpu", progress=False) for _ in range(2)]
    other = train(pairs, {**settings, "seed": 7}, device="cpu", progress=False)
    states = [r.net.state_dict() for r in runs + [other]]
    assert all((states[0][k] == states[1][k]).all() for k in states[0])
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    assert any((states[0][k] != states[2][k]).any() for k in states[0])


def test_model_files_are_read_as_data_and_checked(tmp_path, trained):
    from maskreg.engine.learn import load_model

    _, folder, _ = trained
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nothing" / "model.pt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "training.json").write_text((folder / "training.json").read_text())
    import torch

    torch.save({"not": torch.zeros(1)}, broken / "model.pt")
    with pytest.raises(InputError, match="does not hold the network"):
        load_model(broken)
    (broken / "training.json").unlink()
    with pytest.raises(InputError, match="training.json"):
        load_model(broken)
    # a pickled object is refused: weights_only=True never runs code from a model file
    import pickle

    (broken / "training.json").write_text((folder / "training.json").read_text())
    (broken / "model.pt").write_bytes(pickle.dumps(Exception("code")))
    with pytest.raises(InputError, match="does not hold the network"):
        load_model(broken)


def test_the_network_stage_needs_a_model(make_image):
    f = make_image(np.random.default_rng(0).random((32, 32)).astype(np.float32))
    with pytest.raises(ConfigError, match="network stage needs model"):
        maskreg.register(f, f, stages=[{"type": "network"}], device="cpu")


def test_maskreg_train_on_the_command_line(tmp_path, make_image, capsys):
    from maskreg.cli import main

    rows = []
    for i, (f, m, fl, ml) in enumerate(synthetic_pairs(make_image, 3, seed=2)):
        row = {"subject": f"s{i}", "split": "train" if i < 2 else "test"}
        for key, img in (("fixed", f), ("moving", m), ("fixed_labels", fl), ("moving_labels", ml)):
            sitk.WriteImage(img, str(tmp_path / f"s{i}_{key}.nii.gz"))
            row[key] = f"s{i}_{key}.nii.gz"
        rows.append(row)
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "cohort.tsv", sep="\t", index=False)
    cfg = {"registration": {"stages": [{"type": "rigid", "iterations": [5, 5, 5]}, {"type": "network"}]}}
    cfg["learning"] = {"enabled": True, "steps": 3, "levels": 3}
    import yaml

    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "model"
    assert (
        main(["train", str(tmp_path / "cohort.tsv"), "--config", str(tmp_path / "study.yaml"), "--out", str(out)]) == 0
    )
    meta = json.loads((out / "training.json").read_text())
    assert meta["subjects"] == ["s0", "s1"] and meta["linear_stages"] == [cfg["registration"]["stages"][0]]
    assert (out / "model.pt").is_file() and (out / "training.png").is_file()
    assert (
        main(
            [
                "train",
                str(tmp_path / "cohort.tsv"),
                "--config",
                str(tmp_path / "study.yaml"),
                "--out",
                str(out),
                "--fold",
                "3",
            ]
        )
        == 1
    )
    assert "learning.folds is 1: give no --fold" in capsys.readouterr().err


def test_the_example_learning_config_passes_the_workflow_checks(repo):
    schema = load_yaml(repo / "workflow" / "schemas" / "config.schema.yaml")
    cfg = load_yaml(repo / "config" / "examples" / "learning.yaml")
    assert config_problems(cfg, schema) == []
    assert cfg["learning"]["enabled"] and any(s["type"] == "network" for s in cfg["registration"]["stages"])
