# maskreg: masked registration of a cohort. Run from the repository (or a project) folder:
#   snakemake --profile profiles/local              # the demo cohort, config/config.yaml
#   snakemake --profile profiles/local --configfile my_study.yaml
#   snakemake --profile profiles/slurm ...          # a SLURM cluster (profiles/README.md)
#   snakemake --report report.html                  # one browsable QC report
# Software: this environment (make setup), or --sdm conda (workflow/envs/maskreg.yaml), or --sdm apptainer
# with config container: an image built from the Dockerfile (README, "Ways to run").
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# --sdm apptainer: every job runs in this image (config key container, e.g. the Dockerfile's image pushed to
# a registry the cluster reaches); --sdm conda: workflow/envs/maskreg.yaml; neither: this environment
if config.get("container"):

    container: config["container"]


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/learn.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/warp.smk"
include: "workflow/rules/qc.smk"


onerror:
    # a failed job (with --keep-going, after the others finished): write the cohort tables and figure
    # anyway, listing each failed subject with the ERROR line of its log; the run still exits non-zero
    from maskreg.qc.evaluate import write_cohort

    m = write_cohort(
        REGISTERED,
        "results/cohort/metrics.tsv",
        "results/cohort/dice.tsv",
        "results/cohort/summary.png",
        "results/cohort/failures.png",
    )
    failed = m[m.status == "failed"]
    print(f"maskreg: {len(failed)} of {len(m)} subject(s) failed; see results/cohort/metrics.tsv", file=sys.stderr)
    for _, row in failed.iterrows():
        print(f"  {row.subject}: {row.error}", file=sys.stderr)


rule all:
    default_target: True
    input:
        all_outputs(),
