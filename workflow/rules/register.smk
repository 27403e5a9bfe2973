# Registration: the stage list of config["registration"] on the prepared masks; writes the ITK transform
# (fixed -> moving points) and a JSON report of every stage and level.
#
# resources.register.batch_size = 1 (default): one job per subject. Above 1: `register_batch` registers
# batch_size subjects in one process (the interpreter, the imports and the CUDA context paid once), each
# into its own folder with its own log and status, and `register` only publishes a subject's files (a
# local job, no new process), failing for that subject alone when its registration failed. The batch folders
# (results/.batches/) hold the files that `register` hard-links into results/{subject}/transforms/.

if BATCH_SIZE == 1:

    rule register:
        input:
            unpack(register_label_inputs),
            unpack(model_input),
            fixed=lambda wc: cohort_value(wc.subject, "fixed"),
            moving=lambda wc: cohort_value(wc.subject, "moving"),
            fixed_mask="results/{subject}/masks/fixed_mask.nii.gz",
            moving_mask="results/{subject}/masks/moving_mask.nii.gz",
            initial=cohort_files("initial_transform"),
        output:
            **register_outputs(),
        log:
            "logs/{subject}/register.log",
        benchmark:
            "logs/{subject}/register.benchmark.tsv"
        conda:
            CONDA_ENV
        threads: RES["register"]["threads"]
        resources:
            **register_resources(),
        params:
            registration=config["registration"],
            kinds=lambda wc: mask_kinds(wc.subject),
            device=config["device"],
            seed=config["seed"],
            software=SOFTWARE,  # an upgrade of maskreg reruns the registrations
        script:
            "../scripts/register.py"

else:

    rule register_batch:
        input:
            batch_inputs,
        output:
            directory("results/.batches/{batch}"),
        log:
            "logs/batches/{batch}.log",
        benchmark:
            "logs/batches/{batch}.benchmark.tsv"
        conda:
            CONDA_ENV
        threads: RES["register"]["threads"]
        resources:
            **register_resources(batched=True),
        params:
            jobs=lambda wc: {s: registration_job(s) for s in BATCHES[wc.batch]},
            with_fields=DEFORMABLE,
            registration=config["registration"],
            device=config["device"],
            seed=config["seed"],
            software=SOFTWARE,  # an upgrade of maskreg reruns the registrations
        script:
            "../scripts/register_batch.py"

    rule register:
        input:
            batch=lambda wc: f"results/.batches/{SUBJECT_BATCH[wc.subject]}",
        output:
            **register_outputs(),
        log:
            "logs/{subject}/register.log",
        localrule: True
        conda:
            CONDA_ENV
        params:  # the batch's settings for this subject: a change reruns it (and so its batch)
            registration=config["registration"],
            kinds=lambda wc: mask_kinds(wc.subject),
            device=config["device"],
            seed=config["seed"],
            software=SOFTWARE,  # an upgrade of maskreg reruns the registrations
        # a shell job, not run: (Snakemake 9 runs a run: block by re-invoking itself, ~3 s a job); the
        # publisher imports the standard library only
        shell:
            "{PYTHON} -m maskreg.jobs publish {input.batch} {wildcards.subject} {log} "
            + " ".join(f"{k}={{output.{k}}}" for k in register_outputs())
