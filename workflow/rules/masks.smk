# Mask preparation per image: the cohort's mask, or (when the cell is empty) the config's `missing` choice
# (all-ones or automatic), then binarise / largest component / fill holes / dilate / erode in mm.


rule prepare_mask:
    input:
        image=lambda wc: cohort_value(wc.subject, wc.role),
        mask=lambda wc: cohort_value(wc.subject, f"{wc.role}_mask") or [],
    output:
        "results/{subject}/masks/{role}_mask.nii.gz",
    log:
        "logs/{subject}/prepare_mask_{role}.log",
    benchmark:
        "logs/{subject}/prepare_mask_{role}.benchmark.tsv"
    conda:
        CONDA_ENV
    resources:
        mem_mb=RES["default"]["mem_mb"],
        runtime=RES["default"]["runtime"],
    params:
        options=lambda wc: mask_options(wc.subject, wc.role),
    script:
        "../scripts/prepare_mask.py"
