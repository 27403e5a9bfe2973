# Learning (config learning:, cohort column split): a model trained on the training rows after their linear
# stages (maskreg.training); with learning.folds k >= 2, one model per fold, each leaving its fold out. The
# register jobs of the rows it registers take it as an input, so retraining reruns them.


rule train_model:
    input:
        training_inputs,
    output:
        model="results/model/{model}/model.pt",
        meta="results/model/{model}/training.json",
        curve=report(
            "results/model/{model}/training.png",
            caption="../report/training.rst",
            category="Model",
            labels={"model": "{model}"},
        ),
    log:
        "logs/model/{model}.log",
    benchmark:
        "logs/model/{model}.benchmark.tsv"
    conda:
        CONDA_ENV
    threads: RES["register"]["threads"]
    resources:
        **register_resources(),
    params:
        rows=lambda wc: training_rows(wc.model),
        registration=config["registration"],
        learning=LEARNING,
        device=config["device"],
        seed=config["seed"],
        software=SOFTWARE,  # an upgrade of maskreg retrains
    script:
        "../scripts/train_model.py"
