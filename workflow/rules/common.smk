# Load and validate the configuration and the cohort before any job runs; helpers the rules use.
import os
import re
import sys

import maskreg.config as mcfg
from maskreg.learning import plan, resolve_learning
from maskreg.provenance import software_tag
from maskreg.stages import DEFORMABLE_STAGES, NETWORK
from maskreg.transforms import may_be_nonlinear, split_list
from snakemake.utils import validate

CONFIG_SCHEMA = mcfg.load_yaml(workflow.source_path("../schemas/config.schema.yaml"))
COHORT_SCHEMA = mcfg.load_yaml(workflow.source_path("../schemas/cohort.schema.yaml"))

# every problem of config and cohort at once (raises maskreg.errors.ConfigError), then the schema defaults
COHORT = mcfg.load_and_validate(config, CONFIG_SCHEMA, COHORT_SCHEMA)
validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=True)
SUBJECTS = list(COHORT.index)
# learning (config learning:): which rows train which model, which model registers which row; without it every
# row is registered and none trains
LEARNING = resolve_learning(config.get("learning"))
if LEARNING["enabled"]:
    PLAN = plan(SUBJECTS, list(COHORT["split"]) if "split" in COHORT.columns else None, LEARNING["folds"])
    REGISTERED = [s for s in SUBJECTS if s in PLAN.model_of]
else:
    PLAN, REGISTERED = None, SUBJECTS
PYTHON = sys.executable  # the interpreter running Snakemake (and maskreg): for shell jobs
# --sdm conda: every job's environment (requirements.lock's versions); the path is relative to the rule files
CONDA_ENV = "../envs/maskreg.yaml"
# jobs import maskreg from this repository's src/ (a conda env or a container holds only its dependencies)
mcfg.import_from(f"{workflow.basedir}/src")
# maskreg's version (+ the commit of a checkout): in the params of the jobs whose outputs it can change
SOFTWARE = software_tag()
RES = config["resources"]
# a deformable stage, or an initial transform that may hold a displacement field (judged by file names),
# adds the displacement fields to the outputs and to the warp and QC inputs
DEFORMABLE = any(s["type"] in DEFORMABLE_STAGES + (NETWORK,) for s in config["registration"]["stages"]) or any(
    may_be_nonlinear(v) for v in COHORT["initial_transform"] if v
)

# batched registration (resources.register.batch_size > 1): consecutive cohort rows, batch_size at a time, are
# registered by one job (one process, one CUDA context); `register` then publishes each subject's files
BATCH_SIZE = RES["register"]["batch_size"]
BATCHES = {f"batch{i // BATCH_SIZE:04d}": REGISTERED[i : i + BATCH_SIZE] for i in range(0, len(REGISTERED), BATCH_SIZE)}
SUBJECT_BATCH = {s: b for b, members in BATCHES.items() for s in members}


wildcard_constraints:
    subject="|".join(map(re.escape, SUBJECTS)) if SUBJECTS else "[A-Za-z0-9._-]+",
    model="model|fold[0-9]+",
    role="fixed|moving",
    batch="batch[0-9]+",


def cohort_value(subject, column):
    """The cohort cell (absolute path for path columns) or '' when empty."""
    return COHORT.loc[subject, column] if column in COHORT.columns else ""


def has(subject, column):
    return bool(cohort_value(subject, column))


def cohort_file(column):
    """Input function: the subject's file in ``column`` (an empty list when the cell is empty)."""
    return lambda wc: cohort_value(wc.subject, column) or []


def cohort_files(column):
    """Input function: the subject's ";"-separated files in ``column`` (``initial_transform``), in order."""
    return lambda wc: split_list(cohort_value(wc.subject, column))


def has_labels(subject):
    return has(subject, "fixed_labels") and has(subject, "moving_labels")


def mask_options(subject, role):
    """The study-wide mask options of ``role``, overridden by the subject's cohort columns
    ``{role}_mask_{option}`` where those cells are filled (see config/README.md)."""
    return mcfg.mask_options(config["masks"][role], COHORT.loc[subject].to_dict(), role)


def register_resources(batched=False):
    """Resources of GPU rules; no GPU is requested when the config says device: cpu.

    mem_mb and runtime grow with the attempt (`--retries N`): attempt 2 asks for twice the configured
    memory and time, so a job killed for exceeding them on a cluster is resubmitted with more. A batch job
    (`batched`) asks for the runtime of one registration times its number of subjects."""
    r = RES["register"]
    mem_mb, runtime = r["mem_mb"], r["runtime"]
    n = (lambda wc: len(BATCHES[wc.batch])) if batched else (lambda wc: 1)
    out = {"mem_mb": lambda wc, attempt: mem_mb * attempt, "runtime": lambda wc, attempt: runtime * attempt * n(wc)}
    if config["device"] != "cpu" and r["gpu"] > 0:
        out["gpu"] = r["gpu"]
        if r.get("gpu_model"):
            out["gpu_model"] = r["gpu_model"]
    return out


def transform_inputs(wc):
    """The transform files of a subject, as named inputs: the linear part and, when a deformable stage
    runs, the displacement field (applied first to points)."""
    out = {"linear": f"results/{wc.subject}/transforms/affine.mat"}
    if DEFORMABLE:
        out["warp"] = f"results/{wc.subject}/transforms/warp.nii.gz"
    return out


LABEL_TERM = any(float(s.get("label_weight", 0) or 0) > 0 for s in config["registration"]["stages"])


def register_label_inputs(wc):
    """Both label maps, when a stage uses the label term and the subject has them."""
    if not (LABEL_TERM and has_labels(wc.subject)):
        return {}
    return {
        "fixed_labels": cohort_value(wc.subject, "fixed_labels"),
        "moving_labels": cohort_value(wc.subject, "moving_labels"),
    }


def qc_label_inputs(wc):
    """The QC job's label inputs (both label maps and the warped one) when the subject has labels."""
    if not has_labels(wc.subject):
        return {}
    return {
        "fixed_labels": cohort_value(wc.subject, "fixed_labels"),
        "moving_labels": cohort_value(wc.subject, "moving_labels"),
        "warped_labels": f"results/{wc.subject}/warped/labels.nii.gz",
    }


def qc_landmark_inputs(wc):
    """Both landmark files, when the subject has them (TRE in QC)."""
    if not has(wc.subject, "fixed_landmarks"):
        return {}
    return {
        "fixed_landmarks": cohort_value(wc.subject, "fixed_landmarks"),
        "moving_landmarks": cohort_value(wc.subject, "moving_landmarks"),
    }


def mask_kinds(subject):
    """The subject's (fixed, moving) mask kinds, roi or valid, as the engine takes them."""
    return [mask_options(subject, r)["kind"] for r in ("fixed", "moving")]


def model_file(name):
    return f"results/model/{name}/model.pt"


def model_input(wc):
    """The model a subject's network stage uses (the cohort's, of the subject's fold), when it trains one."""
    if PLAN is None:
        return {}
    return {"model": model_file(PLAN.model_of[wc.subject])}


def training_rows(name):
    """The rows that train model ``name``: subject, image, prepared mask and label paths."""
    rows = []
    for s in PLAN.train[name]:
        row = {"subject": s, "fixed": cohort_value(s, "fixed"), "moving": cohort_value(s, "moving")}
        row["fixed_mask"] = f"results/{s}/masks/fixed_mask.nii.gz"
        row["moving_mask"] = f"results/{s}/masks/moving_mask.nii.gz"
        if has_labels(s):
            row.update(fixed_labels=cohort_value(s, "fixed_labels"), moving_labels=cohort_value(s, "moving_labels"))
        rows.append(row)
    return rows


def training_inputs(wc):
    """Every file of the rows that train model ``wc.model`` (the DAG's edges; the script reads params.rows)."""
    return [v for row in training_rows(wc.model) for k, v in row.items() if k != "subject"]


def registration_job(subject):
    """What maskreg.jobs.register_subject needs for a subject (paths and mask kinds), for batch jobs."""
    job = {
        "fixed": cohort_value(subject, "fixed"),
        "moving": cohort_value(subject, "moving"),
        "fixed_mask": f"results/{subject}/masks/fixed_mask.nii.gz",
        "moving_mask": f"results/{subject}/masks/moving_mask.nii.gz",
        "initial": split_list(cohort_value(subject, "initial_transform")),
        "kinds": mask_kinds(subject),
    }
    if LABEL_TERM and has_labels(subject):
        job.update(
            fixed_labels=cohort_value(subject, "fixed_labels"), moving_labels=cohort_value(subject, "moving_labels")
        )
    if PLAN is not None:
        job["model"] = model_file(PLAN.model_of[subject])
    return job


def batch_inputs(wc):
    """Every input file of every subject of a batch (the DAG's edges; the script reads params.jobs)."""
    out = []
    for s in BATCHES[wc.batch]:
        job = registration_job(s)
        out += [job[k] for k in ("fixed", "moving", "fixed_mask", "moving_mask")] + job["initial"]
        out += [job[k] for k in ("fixed_labels", "moving_labels", "model") if k in job]
    return out


def register_outputs():
    out = {
        "linear": "results/{subject}/transforms/affine.mat",
        "report": "results/{subject}/transforms/registration.json",
    }
    if DEFORMABLE:
        out["warp"] = "results/{subject}/transforms/warp.nii.gz"
        out["inverse_warp"] = "results/{subject}/transforms/inverse_warp.nii.gz"
    return out


def subject_outputs(subject):
    out = [
        f"results/{subject}/masks/fixed_mask.nii.gz",
        f"results/{subject}/masks/moving_mask.nii.gz",
        f"results/{subject}/transforms/affine.mat",
        f"results/{subject}/transforms/jacobian.nii.gz",
        f"results/{subject}/warped/image.nii.gz",
        f"results/{subject}/warped/mask.nii.gz",
        f"results/{subject}/qc/metrics.tsv",
        f"results/{subject}/qc/registration.png",
        f"results/{subject}/qc/masks.png",
    ]
    if has(subject, "moving_labels"):
        out.append(f"results/{subject}/warped/labels.nii.gz")
    if DEFORMABLE:
        out.append(f"results/{subject}/transforms/inverse_warp.nii.gz")
    return out


def report_mode():
    """True while Snakemake builds the report (`--report`): then only subjects whose outputs all exist
    enter the DAG, so one failed subject does not stop the report of the others (the cohort table, written
    by the error hook after a failed run, lists it with its error)."""
    return any(a == "--report" or a.startswith("--report=") for a in sys.argv)


def done_subjects():
    if not report_mode():
        return REGISTERED
    return [s for s in REGISTERED if all(os.path.exists(p) for p in subject_outputs(s))]


def all_outputs():
    out = [p for s in done_subjects() for p in subject_outputs(s)]
    if PLAN is not None:
        out += [f"results/model/{name}/training.png" for name in PLAN.train]
    out += [
        "results/cohort/metrics.tsv",
        "results/cohort/dice.tsv",
        "results/cohort/summary.png",
        "results/cohort/failures.png",
    ]
    return out
