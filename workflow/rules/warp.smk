# Warping moving-space data onto the fixed grid with the registration's transform.


rule warp_image:
    input:
        unpack(transform_inputs),
        fixed=lambda wc: cohort_value(wc.subject, "fixed"),
        moving=lambda wc: cohort_value(wc.subject, "moving"),
        moving_mask="results/{subject}/masks/moving_mask.nii.gz",
    output:
        image="results/{subject}/warped/image.nii.gz",
        mask="results/{subject}/warped/mask.nii.gz",
    log:
        "logs/{subject}/warp_image.log",
    benchmark:
        "logs/{subject}/warp_image.benchmark.tsv"
    conda:
        CONDA_ENV
    resources:
        mem_mb=RES["default"]["mem_mb"],
        runtime=RES["default"]["runtime"],
    params:
        interpolation=config["warp"]["image"],
    script:
        "../scripts/warp_image.py"


rule warp_labels:
    input:
        unpack(transform_inputs),
        fixed=lambda wc: cohort_value(wc.subject, "fixed"),
        labels=lambda wc: cohort_value(wc.subject, "moving_labels"),
    output:
        "results/{subject}/warped/labels.nii.gz",
    log:
        "logs/{subject}/warp_labels.log",
    benchmark:
        "logs/{subject}/warp_labels.benchmark.tsv"
    conda:
        CONDA_ENV
    resources:
        mem_mb=RES["default"]["mem_mb"],
        runtime=RES["default"]["runtime"],
    params:
        method=config["warp"]["labels"],
    script:
        "../scripts/warp_labels.py"
