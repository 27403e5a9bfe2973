"""maskreg.stages: one set of stage rules for maskreg.register, the CLI and the workflow's config validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from maskreg import loss_names, stages
from maskreg.config import load_and_validate, load_yaml
from maskreg.errors import ConfigError, MaskregError
from maskreg.stages import check_stages, resolve_stage, stage_list_problems

SCHEMAS = Path(__file__).resolve().parents[1] / "workflow" / "schemas"  # read at import
CONFIG_SCHEMA = load_yaml(SCHEMAS / "config.schema.yaml")
COHORT_SCHEMA = load_yaml(SCHEMAS / "cohort.schema.yaml")

# one bad list, three problems: a level dropped by smoothing_sigmas, a misspelt key, an unknown mask use
BAD = [
    {"type": "moments"},
    {"type": "rigid", "loss": "mi", "scales": [4, 2], "iterations": [100, 50], "smoothing_sigmas": [1.0]},
    {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [100, 50], "lerning_rate": 0.1},
    {"type": "syn", "loss": "cc", "scales": [4, 2, 1], "iterations": [40, 40, 10], "masks": "left"},
]
BAD_TEXT = [
    "1 (rigid): smoothing_sigmas [1.0] must have one value per scale [4, 2]",
    "2 (affine): unknown key 'lerning_rate'; did you mean 'learning_rate'?",
    "3 (syn): masks 'left' must be one of both, fixed, moving, none",
]


def _same_problems(label: str, problems: list[str]) -> None:
    """Each problem is ``label`` followed by BAD_TEXT's text (same order, same words)."""
    assert all(p.startswith(label) for p in problems), problems
    got = [p[len(label) :] for p in problems]
    assert len(got) == len(BAD_TEXT), got
    for want, p in zip(BAD_TEXT, got, strict=True):
        assert p.startswith(want), (want, p)


def test_importing_stages_does_not_import_torch():
    code = (
        "import sys, maskreg.stages, maskreg.config; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_same_bad_list_same_messages_from_register_cli_and_workflow(tmp_path, repo):
    import SimpleITK as sitk

    import maskreg

    # the library: before any work (the images are never looked at)
    img = sitk.Image(8, 8, sitk.sitkFloat32)
    with pytest.raises(ConfigError) as info:
        maskreg.register(img, img, stages=BAD, device="cpu", subject="s1")
    assert str(info.value).startswith("3 problem(s) in the stage list (subject 's1'):")
    _same_problems("stage ", info.value.problems)

    # the command line: a clean list on stderr, exit status 1, no traceback, before the images are read
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump({"stages": BAD}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskreg.cli",
            "register",
            "no_fixed.nii.gz",
            "no_moving.nii.gz",
            "--out",
            str(tmp_path / "out"),
            "--stages",
            str(tmp_path / "stages.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"maskreg register: 3 problem(s) in the stage list ({tmp_path / 'stages.yaml'}):"
    _same_problems("  - stage ", lines[1:])
    assert not (tmp_path / "out").exists()

    # the workflow's config validation (what the Snakefile runs before any job)
    cfg = load_yaml(repo / "config/config.yaml")
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    cfg["registration"]["stages"] = BAD
    with pytest.raises(ConfigError) as info:
        load_and_validate(cfg, CONFIG_SCHEMA, COHORT_SCHEMA)
    # one message per problem: the schema's own words for these stages are left out
    _same_problems("config registration.stages.", info.value.problems)


def test_cli_stage_file_problems_are_messages(tmp_path):
    def run(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "maskreg.cli",
                "register",
                "f.nii.gz",
                "m.nii.gz",
                "--out",
                str(tmp_path / "out"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    (tmp_path / "bad.yaml").write_text("stages: [{type: rigid\n")
    (tmp_path / "map.yaml").write_text("type: rigid\n")
    (tmp_path / "cc.yaml").write_text("stages: [{type: rigid, loss: cc}]\n")
    for args, says in [
        (("--stages", str(tmp_path / "missing.yaml")), "cannot be read"),
        (("--stages", str(tmp_path / "bad.yaml")), "not valid YAML"),
        (("--stages", str(tmp_path / "map.yaml")), "expected a 'stages:' list"),
        (("--stages", str(tmp_path / "cc.yaml"), "--random", "500"), "stage 0 (rigid): loss 'cc' needs dense sampling"),
    ]:
        proc = run(*args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr


# what engine.resolved_stage returned before maskreg.stages (recorded), for the default lists and variants
_LIN = {
    "loss": "mi",
    "scales": [4, 2, 1],
    "iterations": [100, 50, 25],
    "learning_rate": [0.25, 0.25, 0.25],
    "optimizer": "regular_step",
    "tolerance": 1e-05,
    "window": 5,
    "bins": 32,
    "smoothing_sigmas": None,
    "use_mask": True,
}
_DEF = {
    "loss": "cc",
    "scales": [4, 2, 1],
    "iterations": [80, 40, 20],
    "learning_rate": [0.5, 0.5, 0.5],
    "fluid_sigma": 1.5,
    "elastic_sigma": 0.5,
    "jacobian_floor": 0.04,
    "tolerance": 0.0001,
    "window": 5,
    "bins": 16,
    "smoothing_sigmas": None,
    "use_mask": True,
    "bending_weight": 0.0,
    "gradient_weight": 0.0,
    "label_weight": 0.0,
}
_SYN = {**_DEF, "iterations": [40, 40, 10], "learning_rate": [1.5, 1.5, 3.0]}
RECORDED = [
    ({"type": "moments"}, {"type": "moments"}),
    ({"type": "moments", "principal_axes": True}, {"type": "moments", "principal_axes": True}),
    ({"type": "rigid", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]}, {**_LIN, "type": "rigid"}),
    ({"type": "affine", "loss": "mi", "scales": [4, 2, 1], "iterations": [100, 50, 25]}, {**_LIN, "type": "affine"}),
    (
        {"type": "rigid", "loss": "mi", "scales": [4, 2], "iterations": [100, 50]},
        {**_LIN, "type": "rigid", "scales": [4, 2], "iterations": [100, 50], "learning_rate": [0.25, 0.25]},
    ),
    (
        {"type": "affine", "loss": "mi", "scales": [4, 2], "iterations": [100, 50]},
        {**_LIN, "type": "affine", "scales": [4, 2], "iterations": [100, 50], "learning_rate": [0.25, 0.25]},
    ),
    (
        {"type": "syn", "loss": "cc", "window": 5, "scales": [4, 2, 1], "iterations": [40, 40, 10]},
        {**_SYN, "type": "syn"},
    ),
    ({"type": "syn"}, {**_SYN, "type": "syn"}),
    ({"type": "greedy"}, {**_DEF, "type": "greedy"}),
    (
        {"type": "syn", "scales": [8, 4, 2, 1], "iterations": [5, 5, 5, 5]},
        {
            **_SYN,
            "type": "syn",
            "scales": [8, 4, 2, 1],
            "iterations": [5, 5, 5, 5],
            "learning_rate": [1.5, 1.5, 1.5, 3.0],
        },
    ),
    (
        {"type": "rigid", "learning_rate": [0.5, 0.25, 0.125]},
        {**_LIN, "type": "rigid", "learning_rate": [0.5, 0.25, 0.125]},
    ),
    ({"type": "affine", "use_mask": False}, {**_LIN, "type": "affine", "use_mask": False}),
    (
        {"type": "similarity", "smoothing_sigmas": [2, 1, 0], "optimizer": "adam"},
        {**_LIN, "type": "similarity", "smoothing_sigmas": [2, 1, 0], "optimizer": "adam"},
    ),
    (
        {"type": "translation", "loss": "masked_mse", "scales": [2, 1], "iterations": [10, 5]},
        {
            **_LIN,
            "type": "translation",
            "loss": "masked_mse",
            "scales": [2, 1],
            "iterations": [10, 5],
            "learning_rate": [0.25, 0.25],
        },
    ),
    (
        {"type": "greedy", "fluid_sigma": 2.0, "label_weight": 0.5, "learning_rate": 1.0},
        {**_DEF, "type": "greedy", "fluid_sigma": 2.0, "label_weight": 0.5, "learning_rate": [1.0, 1.0, 1.0]},
    ),
]


@pytest.mark.parametrize("stage, before", RECORDED)
def test_resolution_is_what_it_was_plus_masks_and_search(stage, before):
    from maskreg.engine import resolved_stage

    got = resolve_stage(stage)
    assert resolved_stage(stage) == got
    new = {k: got.pop(k) for k in ("masks", "search") if k in got and k not in before}
    assert got == before
    if stage["type"] != "moments":
        assert new.pop("masks") == ("none" if stage.get("use_mask") is False else "both")
    if stage["type"] in stages.LINEAR_STAGES:
        assert new.pop("search") is False
    assert new == {}
    # a resolved stage is a valid stage that resolves to itself, for every entry point
    again = resolve_stage(stage)
    assert stage_list_problems([again]) == [] and resolve_stage(again) == again
    jsonschema.validate(
        {"stages": [again]},
        {
            "$defs": CONFIG_SCHEMA["definitions"],
            "type": "object",
            "properties": {"stages": {"type": "array", "items": {"$ref": "#/$defs/stage"}}},
        },
    )


def test_default_stage_lists_have_no_problems(repo):
    cfg = load_yaml(repo / "config/config.yaml")
    schema_default = CONFIG_SCHEMA["properties"]["registration"]["properties"]["stages"]["default"]
    for lst in (stages.DEFAULT_STAGES, cfg["registration"]["stages"], schema_default, None, []):
        assert stage_list_problems(lst) == []


def test_masks_and_use_mask():
    assert resolve_stage({"type": "rigid", "masks": "fixed"})["masks"] == "fixed"
    assert resolve_stage({"type": "rigid", "masks": "fixed"})["use_mask"] is True
    assert resolve_stage({"type": "syn", "masks": "none"})["use_mask"] is False
    assert resolve_stage({"type": "syn", "use_mask": False, "masks": "none"})["masks"] == "none"
    assert resolve_stage({"type": "moments", "use_mask": False}) == {
        "type": "moments",
        "use_mask": False,
        "masks": "none",
    }
    assert stage_list_problems([{"type": "affine", "use_mask": True, "masks": "moving"}]) == []
    assert stage_list_problems([{"type": "affine", "use_mask": False, "masks": "both"}]) == [
        "stage 0 (affine): use_mask false and masks 'both' disagree; give masks alone (use_mask: false is masks: none)"
    ]
    assert stage_list_problems([{"type": "affine", "use_mask": "no"}]) == [
        "stage 0 (affine): use_mask 'no' must be true or false"
    ]


def test_search_resolution_and_problems():
    full = {"candidates": 200, "angle_deg": 30.0, "translation_mm": 20.0, "keep": 3}
    assert resolve_stage({"type": "rigid", "search": True})["search"] == full
    assert resolve_stage({"type": "rigid", "search": {"angle_deg": 90}})["search"] == {**full, "angle_deg": 90.0}
    assert resolve_stage({"type": "affine", "search": False})["search"] is False
    assert "search" not in resolve_stage({"type": "syn"})
    ps = stage_list_problems(
        [
            {"type": "rigid", "search": {"candidates": 0, "keep": 1.5, "angles": 3}},
            {"type": "rigid", "search": "yes"},
            {"type": "syn", "search": True},
        ]
    )
    assert "stage 0 (rigid): search.candidates 0 must be an integer >= 1" in ps
    assert "stage 0 (rigid): search.keep 1.5 must be an integer >= 1" in ps
    assert any(p.startswith("stage 0 (rigid): search: unknown key 'angles'") for p in ps)
    assert any(p.startswith("stage 1 (rigid): search 'yes' must be true, false or a mapping") for p in ps)
    assert (
        ps[-1] == "stage 2 (syn): 'search' does not apply to a syn stage (only to translation, rigid, "
        "similarity, affine)"
    )
    assert len(ps) == 5


def test_every_problem_of_a_list_at_once():
    ps = stage_list_problems(
        [
            {"type": "warp"},
            {"scales": [2]},
            "rigid",
            {"type": "rigid", "label_weight": 1.0, "principal_axes": True, "loss": "ssd"},
            {"type": "syn", "scales": [1, 2], "iterations": [5, 5, 5], "learning_rate": [1, 2, 3], "window": 2},
            {"type": "greedy", "scales": [2, 1], "iterations": [5, 5], "bins": 300, "optimizer": "adam"},
            {"type": "affine", "loss": "cc"},
        ],
        {"random": 500},
        at="registration.stages.{i}",
    )
    want = [
        "registration.stages.0 (warp): unknown stage type 'warp'; choose one of moments, translation, rigid, "
        "similarity, affine, network, greedy, syn",
        "registration.stages.1 (?): 'type' is missing",
        "registration.stages.2: expected a mapping",
        "registration.stages.3 (rigid): 'label_weight' does not apply to a rigid stage (only to greedy, syn)",
        "registration.stages.3 (rigid): 'principal_axes' does not apply to a rigid stage (only to moments)",
        "registration.stages.3 (rigid): unknown loss 'ssd'",
        "registration.stages.4 (syn): window 2 must be an integer >= 3",
        "registration.stages.4 (syn): scales [1, 2] must not increase",
        "registration.stages.4 (syn): scales [1, 2] and iterations [5, 5, 5] must have the same length",
        "registration.stages.4 (syn): learning_rate [1, 2, 3] must be one number or one value per scale [1, 2]",
        "registration.stages.5 (greedy): cannot follow a syn stage; use one deformable type",
        "registration.stages.5 (greedy): 'optimizer' does not apply to a greedy stage",
        "registration.stages.5 (greedy): bins 300 must be an integer from 8 to 256",
        "registration.stages.6 (affine): linear stages must come before deformable ones",
        "registration.stages.6 (affine): loss 'cc' needs dense sampling",
    ]
    assert len(ps) == len(want), ps
    for w in want:
        assert any(p.startswith(w) for p in ps), (w, ps)
    # cc under random sampling is a problem for the linear stages only: deformable stages use every voxel
    assert stage_list_problems([{"type": "syn", "loss": "cc"}], {"random": 500}) == []
    assert stage_list_problems([{"type": "rigid", "loss": "cc"}], {"fraction": 0.5}) == []


def test_check_stages_and_resolve_raise_maskreg_errors():
    with pytest.raises(
        MaskregError,
        match=r"1 problem\(s\) in the stage list:\n  - stage 0 \(rigid\): "
        r"scales \[4, 2, 1\] and iterations \[1, 2\] must have the same length",
    ):
        check_stages([{"type": "rigid", "iterations": [1, 2]}])
    check_stages(None)
    with pytest.raises(
        MaskregError,
        match=r"learning_rate \[1.0, 2.0\] must be one number or one value per scale "
        r"\[4, 2, 1\]",
    ):
        resolve_stage({"type": "syn", "learning_rate": [1.0, 2.0]})
    # None means the default, as before
    assert (
        resolve_stage({"type": "rigid", "learning_rate": None, "smoothing_sigmas": None})["learning_rate"] == [0.25] * 3
    )


def test_schema_is_in_step_with_the_stage_rules():
    stage = CONFIG_SCHEMA["definitions"]["stage"]
    props = stage["properties"]
    assert props["type"]["enum"] == list(stages.STAGE_TYPES)
    assert set(props) == {k for t in stages.STAGE_TYPES for k in stages.stage_keys(t)}
    assert set(props["loss"]["enum"]) - {None} == set(loss_names.LOSS_NAMES) | set(loss_names.ALIASES)
    assert set(props["masks"]["enum"]) - {None} == set(stages.MASK_USES)
    search = next(b for b in props["search"]["oneOf"] if b.get("type") == "object")
    assert set(search["properties"]) == set(stages.SEARCH_DEFAULTS)
    # no stage defaults in the schema: snakemake's validate(set_default=True) would write them into every stage
    assert not any("default" in p for p in props.values())


def test_workflow_dry_run_takes_masks_and_search(tmp_path, repo, demo, snakemake):
    """snakemake's own schema validation accepts the new keys (and the stage list reaches the jobs as written)."""
    cfg = load_yaml(repo / "config/config.yaml")
    (tmp_path / "cohort.tsv").write_text(
        "subject\tfixed\tmoving\n"
        f"s1\t{demo / 'antspy_brain2d' / 'r64.nii.gz'}\t{demo / 'antspy_brain2d' / 'r16.nii.gz'}\n"
    )
    cfg["cohort"] = str(tmp_path / "cohort.tsv")
    cfg["registration"]["stages"] = [
        {"type": "moments", "masks": "fixed"},
        {"type": "rigid", "scales": [4, 2], "iterations": [10, 5], "search": {"angle_deg": 90}, "masks": "none"},
        {"type": "affine", "scales": [4, 2], "iterations": [10, 5], "search": True, "use_mask": True},
        {"type": "syn", "scales": [2, 1], "iterations": [5, 5], "masks": "both"},
    ]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", "-n", "--quiet", "rules", profile=None, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "register" in proc.stdout + proc.stderr


def test_moments_centre_takes_mass_or_geometry_and_geometry_has_no_principal_axes():
    ok = [{"type": "moments", "centre": "geometry"}, {"type": "moments", "centre": "mass", "principal_axes": True}]
    assert stage_list_problems(ok) == []
    ps = stage_list_problems(
        [
            {"type": "moments", "centre": "image"},
            {"type": "moments", "centre": "geometry", "principal_axes": True},
            {"type": "rigid", "centre": "geometry"},
        ]
    )
    assert ps[0] == "stage 0 (moments): centre 'image' must be one of mass, geometry"
    assert ps[1].startswith("stage 1 (moments): principal_axes turns the images about their centres of mass")
    assert ps[2] == "stage 2 (rigid): 'centre' does not apply to a rigid stage (only to moments)"
    assert len(ps) == 3
    both = stage_list_problems([{"type": "moments", "centre": "geometry", "principal_axes": True, "scales": [2, 4]}])
    assert len(both) == 2 and "must not increase" in both[0] and "principal_axes" in both[1], both
