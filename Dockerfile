# maskreg's jobs in a container: `snakemake --sdm apptainer` with `container: docker://REGISTRY/maskreg:0.1.0`
# in the config (README, "Ways to run"). The versions of requirements.lock, which make and CI install; torch
# 2.13.0 from PyPI (on x86-64 Linux a CUDA build: GPU jobs get the node's driver through apptainer --nv).
#   docker build -t maskreg:0.1.0 .   (or: podman build; apptainer build maskreg.sif docker-daemon://maskreg:0.1.0)
# Untested: the development and CI machines have no container runtime and reach no image registry.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /opt/maskreg
COPY pyproject.toml README.md requirements.lock ./
COPY src ./src
# torch first, as make does (a bare torch requirement would not pick the version the lock was made with)
RUN pip install torch==2.13.0 \
    && pip install -c requirements.lock ".[learn,bids]" \
    && python -c "import maskreg, monai, SimpleITK, snakemake; print('maskreg', maskreg.__version__)"
# the workflow itself (Snakefile, rules, scripts) stays in the repository: Snakemake runs each job's script in
# this image, and the jobs import maskreg from the repository's src/ when it is mounted, else this copy
