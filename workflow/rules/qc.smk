# Quality control: a mask figure and a registration figure with metrics per subject (and the Jacobian
# determinant map of the transform, results/{subject}/transforms/jacobian.nii.gz), then the cohort tables
# and plots. Figures are registered with report() for `snakemake --report report.html`.


rule qc_masks:
    input:
        fixed=lambda wc: cohort_value(wc.subject, "fixed"),
        moving=lambda wc: cohort_value(wc.subject, "moving"),
        fixed_mask="results/{subject}/masks/fixed_mask.nii.gz",
        moving_mask="results/{subject}/masks/moving_mask.nii.gz",
    output:
        report(
            "results/{subject}/qc/masks.png",
            caption="../report/masks.rst",
            category="Subjects",
            subcategory="{subject}",
            labels={"subject": "{subject}", "figure": "masks"},
        ),
    log:
        "logs/{subject}/qc_masks.log",
    benchmark:
        "logs/{subject}/qc_masks.benchmark.tsv"
    conda:
        CONDA_ENV
    resources:
        mem_mb=RES["default"]["mem_mb"],
        runtime=RES["default"]["runtime"],
    params:
        # not the flag thresholds nor the Jacobian map's options: changing them reruns only qc_subject (and cohort)
        qc={k: v for k, v in config["qc"].items() if k not in ("flags", "jacobian")},
    script:
        "../scripts/qc_masks.py"


rule qc_subject:
    input:
        unpack(qc_label_inputs),
        unpack(qc_landmark_inputs),
        unpack(transform_inputs),
        fixed=lambda wc: cohort_value(wc.subject, "fixed"),
        moving=lambda wc: cohort_value(wc.subject, "moving"),
        fixed_mask="results/{subject}/masks/fixed_mask.nii.gz",
        moving_mask="results/{subject}/masks/moving_mask.nii.gz",
        warped="results/{subject}/warped/image.nii.gz",
        warped_mask="results/{subject}/warped/mask.nii.gz",
        report="results/{subject}/transforms/registration.json",
    output:
        metrics="results/{subject}/qc/metrics.tsv",
        dice="results/{subject}/qc/dice.tsv",
        # every subject, linear-only included (then constant det A): QC has the map in hand already
        jacobian="results/{subject}/transforms/jacobian.nii.gz",
        figure=report(
            "results/{subject}/qc/registration.png",
            caption="../report/registration.rst",
            category="Subjects",
            subcategory="{subject}",
            labels={"subject": "{subject}", "figure": "registration"},
        ),
    log:
        "logs/{subject}/qc_subject.log",
    benchmark:
        "logs/{subject}/qc_subject.benchmark.tsv"
    conda:
        CONDA_ENV
    resources:
        mem_mb=RES["default"]["mem_mb"],
        runtime=RES["default"]["runtime"],
    params:
        qc=config["qc"],
        flags=config["qc"]["flags"],  # thresholds of the flags column (maskreg.qc.flags)
        jacobian=config["qc"]["jacobian"],  # include_linear, log: the form of transforms/jacobian.nii.gz
    script:
        "../scripts/qc_subject.py"


rule cohort:
    input:
        metrics=expand("results/{subject}/qc/metrics.tsv", subject=done_subjects()),
        dice=expand("results/{subject}/qc/dice.tsv", subject=done_subjects()),
    output:
        metrics=report(
            "results/cohort/metrics.tsv",
            caption="../report/cohort_metrics.rst",
            category="Cohort",
            labels={"table": "metrics"},
        ),
        dice="results/cohort/dice.tsv",
        summary=report(
            "results/cohort/summary.png",
            caption="../report/cohort_summary.rst",
            category="Cohort",
            labels={"figure": "summary"},
        ),
        failures=report(
            "results/cohort/failures.png",
            caption="../report/cohort_failures.rst",
            category="Cohort",
            labels={"figure": "failures"},
        ),
    log:
        "logs/cohort.log",
    conda:
        CONDA_ENV
    params:
        subjects=REGISTERED,
    script:
        "../scripts/cohort.py"
