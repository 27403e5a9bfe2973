# maskreg: masked registration of a cohort. Run from the repository (or a project) folder:
#   snakemake --profile profiles/default            # the demo cohort, config/config.yaml
#   snakemake --profile profiles/default --configfile my_study.yaml
#   snakemake --report report.html                  # one browsable QC report
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/warp.smk"
include: "workflow/rules/qc.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
