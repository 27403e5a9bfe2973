# Registration: the stage list of config["registration"] on the prepared masks; writes the ITK transform
# (fixed -> moving points) and a JSON report of every stage and level.


rule register:
    input:
        unpack(register_label_inputs),
        fixed=lambda wc: cohort_value(wc.subject, "fixed"),
        moving=lambda wc: cohort_value(wc.subject, "moving"),
        fixed_mask="results/{subject}/masks/fixed_mask.nii.gz",
        moving_mask="results/{subject}/masks/moving_mask.nii.gz",
        initial=cohort_files("initial_transform"),
    output:
        **register_outputs(),
    params:
        registration=config["registration"],
        kinds=lambda wc: [mask_options(wc.subject, r)["kind"] for r in ("fixed", "moving")],
        device=config["device"],
        seed=config["seed"],
    threads: RES["register"]["threads"]
    resources:
        **register_resources(),
    log:
        "logs/{subject}/register.log",
    benchmark:
        "logs/{subject}/register.benchmark.tsv"
    script:
        "../scripts/register.py"
